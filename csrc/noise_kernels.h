// Launch interface of the CUDA kernels in noise_cuda.cu: plain pointers and sizes only, so that
// the .cu file needs no torch headers. noise_cuda_ops.cpp checks arguments, allocates outputs and
// calls these on the current stream. Each returns a cudaError_t as int (0 = success).
#pragma once

#include <cstdint>

namespace jdm_fast {
namespace cuda {

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// A schedule table of length T, float32 or float64.
struct Table {
  const void* ptr;
  bool f64;
};

enum NoiseMode : int { kNoNoise = 0, kNoiseTensor = 1, kNoisePhilox = 2 };

struct Launch {
  int max_blocks;  // grid-stride loops use at most this many blocks
  void* stream;    // cudaStream_t
};

int q_sample(Launch l, int dtype, const void* x0, const void* noise, void* out, const int64_t* t,
             Table a, Table b, int64_t T, int64_t n, int64_t per_example);

// first_example == nullptr: the stream offset is `offset`; else it is *first_example * per_example,
// read on the device (the keyed form, q_sample_keyed).
int q_sample_philox(Launch l, int dtype, const void* x0, void* out, void* noise_out,
                    const int64_t* t, Table a, Table b, int64_t T, int64_t n, int64_t per_example,
                    uint64_t seed, uint64_t offset, const int64_t* first_example);

// Counter-based draws of rows first .. first + n - 1 (*first read on the device; philox.h).
int counter_timesteps(Launch l, const int64_t* first, uint64_t seed, int64_t n, int64_t T,
                      int64_t* out);
int counter_uniform(Launch l, const int64_t* first, uint64_t seed, uint32_t tag, int64_t n,
                    int64_t width, float* out);

// Deterministic two-pass mean of squared differences: `partials` holds
// eps_mse_num_partials(n) floats; out is one float.
int eps_mse_num_partials(int64_t n);
int eps_mse(Launch l, int dtype_eps, bool noise_f32, const void* eps, const void* noise, int64_t n,
            float* partials, float* out);
int eps_mse_backward(Launch l, int dtype_eps, bool noise_f32, const float* grad, const void* eps,
                     const void* noise, void* out, int64_t n);

struct AncestralTables {
  Table recip, recipm1, coef1, coef2, log_variance;
};
int ancestral_step(Launch l, int dtype, const void* x, const void* eps, int noise_mode,
                   const void* noise, uint64_t seed, uint64_t offset, void* out, const int64_t* t,
                   AncestralTables tabs, int64_t T, bool clip, int64_t n, int64_t per_example);

int ddim_step(Launch l, int dtype, const void* x, const void* eps, int noise_mode,
              const void* noise, uint64_t seed, uint64_t offset, void* out, const int64_t* t,
              const int64_t* t_prev, Table abar, int64_t T, double eta, bool clip, int64_t n,
              int64_t per_example);

}  // namespace cuda
}  // namespace jdm_fast
