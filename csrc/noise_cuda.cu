// CUDA kernels of the noise-schedule ops (launched by noise_cuda_ops.cpp on the current stream).
// No torch headers here (nvcc compile time): plain pointers, see noise_kernels.h.
//
// Elementwise kernels are grid-stride loops; each thread handles a pack of V = 16 / sizeof(T)
// elements with 16-byte loads and stores when every pointer is 16-byte aligned and a pack never
// straddles two examples, else one element at a time. Philox kernels give each thread one
// stream block of 4 elements (one Philox call, two Box-Muller pairs). Timesteps outside [0, T)
// (t_prev outside [-1, T)) fail a device-side assert, like an out-of-range torch index.
#undef NDEBUG
#include <cassert>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "noise_kernels.h"
#include "philox.h"
#include "step_rules.h"

namespace jdm_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxPartials = 1024;  // eps_mse first-pass blocks (a function of n only)

template <typename T>
__device__ __forceinline__ float to_f(T v);
template <>
__device__ __forceinline__ float to_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}
template <typename T, int V>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, V>& v) {
  *reinterpret_cast<Pack<T, V>*>(p) = v;
}

__device__ __forceinline__ int64_t load_t(const int64_t* t, int64_t e, int64_t low, int64_t T) {
  const int64_t v = t[e];
  assert(v >= low && v < T && "jdm_fast: timestep out of range");
  return v;
}

__device__ __forceinline__ int64_t thread_id() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t thread_stride() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

inline bool aligned(const void* p, int bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

inline int grid_for(int64_t work, int max_blocks) {
  int64_t b = (work + kThreads - 1) / kThreads;
  if (b > max_blocks) b = max_blocks;
  return static_cast<int>(b < 1 ? 1 : b);
}

// Clamp to [-1, 1] that lets NaN through (as torch.clamp; fminf/fmaxf would drop it).
__device__ __forceinline__ float clamp1(float v) { return v < -1.f ? -1.f : (v > 1.f ? 1.f : v); }

inline int finish() { return static_cast<int>(cudaGetLastError()); }

// ------------------------------------------------------------------------------ q_sample
template <typename T, typename TabT, int V>
__global__ void q_sample_kernel(const T* __restrict__ x0, const T* __restrict__ nz,
                                T* __restrict__ out, const int64_t* __restrict__ t,
                                const TabT* __restrict__ a, const TabT* __restrict__ b, int64_t T_,
                                int64_t n, int64_t per) {
  const int64_t packs = n / V;
  for (int64_t p = thread_id(); p < packs; p += thread_stride()) {
    const int64_t j = p * V;
    const int64_t tt = load_t(t, j / per, 0, T_);
    const float ca = static_cast<float>(a[tt]), cb = static_cast<float>(b[tt]);
    const Pack<T, V> xv = load_pack<T, V>(x0 + j), zv = load_pack<T, V>(nz + j);
    Pack<T, V> ov;
#pragma unroll
    for (int k = 0; k < V; ++k) ov.v[k] = from_f<T>(ca * to_f(xv.v[k]) + cb * to_f(zv.v[k]));
    store_pack<T, V>(out + j, ov);
  }
}

template <typename T, typename TabT>
int launch_q_sample(Launch l, const void* x0, const void* noise, void* out, const int64_t* t,
                    const void* a, const void* b, int64_t T_len, int64_t n, int64_t per) {
  constexpr int V = 16 / sizeof(T);
  const auto s = static_cast<cudaStream_t>(l.stream);
  const bool vec = per % V == 0 && aligned(x0, 16) && aligned(noise, 16) && aligned(out, 16);
  if (vec) {
    q_sample_kernel<T, TabT, V><<<grid_for(n / V, l.max_blocks), kThreads, 0, s>>>(
        static_cast<const T*>(x0), static_cast<const T*>(noise), static_cast<T*>(out), t,
        static_cast<const TabT*>(a), static_cast<const TabT*>(b), T_len, n, per);
  } else {
    q_sample_kernel<T, TabT, 1><<<grid_for(n, l.max_blocks), kThreads, 0, s>>>(
        static_cast<const T*>(x0), static_cast<const T*>(noise), static_cast<T*>(out), t,
        static_cast<const TabT*>(a), static_cast<const TabT*>(b), T_len, n, per);
  }
  return finish();
}

// Thread k of a Philox kernel owns stream block first_block + k, i.e. flat elements
// j = 4 * (first_block + k) + lane - offset that fall in [0, n). With `first_example` (the keyed
// form), offset = *first_example * per is read on the device: the host never needs its value.
template <typename T, typename TabT, bool VEC4>
__global__ void q_sample_philox_kernel(const T* __restrict__ x0, T* __restrict__ out,
                                       T* __restrict__ zout, const int64_t* __restrict__ t,
                                       const TabT* __restrict__ a, const TabT* __restrict__ b,
                                       int64_t T_, int64_t n, int64_t per, uint64_t seed,
                                       uint64_t offset, const int64_t* __restrict__ first_example) {
  if (first_example != nullptr) {
    const int64_t f = *first_example;
    assert(f >= 0 && "jdm_fast: the first example index must be >= 0");
    offset = static_cast<uint64_t>(f) * static_cast<uint64_t>(per);
  }
  const uint64_t first = offset / 4;
  const uint64_t blocks = (offset + static_cast<uint64_t>(n) + 3) / 4 - first;
  for (uint64_t k = thread_id(); k < blocks; k += thread_stride()) {
    const uint64_t blk = first + k;
    float z[4];
    philox_normal4(seed, blk, z);
    if (VEC4) {  // offset % 4 == 0, per % 4 == 0, aligned: the 4 elements share an example
      const int64_t j = static_cast<int64_t>(4 * k);
      const int64_t tt = load_t(t, j / per, 0, T_);
      const float ca = static_cast<float>(a[tt]), cb = static_cast<float>(b[tt]);
      const Pack<T, 4> xv = load_pack<T, 4>(x0 + j);
      Pack<T, 4> zv, ov;
#pragma unroll
      for (int lane = 0; lane < 4; ++lane) {
        zv.v[lane] = from_f<T>(z[lane]);
        ov.v[lane] = from_f<T>(ca * to_f(xv.v[lane]) + cb * to_f(zv.v[lane]));
      }
      store_pack<T, 4>(zout + j, zv);
      store_pack<T, 4>(out + j, ov);
    } else {
#pragma unroll
      for (int lane = 0; lane < 4; ++lane) {
        const uint64_t g = 4 * blk + lane;
        if (g < offset || g >= offset + static_cast<uint64_t>(n)) continue;
        const int64_t j = static_cast<int64_t>(g - offset);
        const int64_t tt = load_t(t, j / per, 0, T_);
        const T zq = from_f<T>(z[lane]);
        zout[j] = zq;
        out[j] = from_f<T>(static_cast<float>(a[tt]) * to_f(x0[j]) + static_cast<float>(b[tt]) * to_f(zq));
      }
    }
  }
}

template <typename T, typename TabT>
int launch_q_sample_philox(Launch l, const void* x0, void* out, void* zout, const int64_t* t,
                           const void* a, const void* b, int64_t T_len, int64_t n, int64_t per,
                           uint64_t seed, uint64_t offset, const int64_t* first_example) {
  const auto s = static_cast<cudaStream_t>(l.stream);
  const int bytes = 4 * static_cast<int>(sizeof(T));
  // Keyed: offset = first * per is a multiple of 4 whenever per is; the block count is at most
  // one more than for an aligned offset (the kernel stops at its own bound).
  const bool vec = (first_example != nullptr || offset % 4 == 0) && per % 4 == 0 &&
                   aligned(x0, bytes) && aligned(out, bytes) && aligned(zout, bytes);
  const int64_t blocks = first_example != nullptr
                             ? (n + 3) / 4 + 1
                             : static_cast<int64_t>((offset + n + 3) / 4 - offset / 4);
  const int grid = grid_for(blocks, l.max_blocks);
  if (vec) {
    q_sample_philox_kernel<T, TabT, true><<<grid, kThreads, 0, s>>>(
        static_cast<const T*>(x0), static_cast<T*>(out), static_cast<T*>(zout), t,
        static_cast<const TabT*>(a), static_cast<const TabT*>(b), T_len, n, per, seed, offset,
        first_example);
  } else {
    q_sample_philox_kernel<T, TabT, false><<<grid, kThreads, 0, s>>>(
        static_cast<const T*>(x0), static_cast<T*>(out), static_cast<T*>(zout), t,
        static_cast<const TabT*>(a), static_cast<const TabT*>(b), T_len, n, per, seed, offset,
        first_example);
  }
  return finish();
}

// ------------------------------------------------------------------------------ counter draws
// Row i is global example g = *first + i (read on the device).
__global__ void counter_timesteps_kernel(const int64_t* __restrict__ first, uint64_t seed, int64_t n,
                                         uint64_t T_, int64_t* __restrict__ out) {
  const int64_t f = *first;
  assert(f >= 0 && "jdm_fast: the first example index must be >= 0");
  for (int64_t i = thread_id(); i < n; i += thread_stride()) {
    out[i] = counter_timestep(seed, static_cast<uint64_t>(f + i), T_);
  }
}

// Thread k owns row k / blocks_per_row, columns 4 * (k % blocks_per_row) .. + 3.
__global__ void counter_uniform_kernel(const int64_t* __restrict__ first, uint64_t seed, uint32_t tag,
                                       int64_t n, int64_t width, float* __restrict__ out) {
  const int64_t f = *first;
  assert(f >= 0 && "jdm_fast: the first example index must be >= 0");
  const int64_t per_row = (width + 3) / 4;
  for (int64_t k = thread_id(); k < n * per_row; k += thread_stride()) {
    const int64_t i = k / per_row, q = k % per_row;
    float u[4];
    counter_uniform4(seed, static_cast<uint64_t>(f + i), tag, static_cast<uint32_t>(q), u);
#pragma unroll
    for (int lane = 0; lane < 4; ++lane) {
      const int64_t j = 4 * q + lane;
      if (j < width) out[i * width + j] = u[lane];
    }
  }
}

// ------------------------------------------------------------------------------ eps_mse
template <typename TE, typename TN, int V>
__global__ void mse_partial_kernel(const TE* __restrict__ e, const TN* __restrict__ z, int64_t n,
                                   float* __restrict__ partials) {
  float acc = 0.f;
  const int64_t packs = n / V;
  for (int64_t p = thread_id(); p < packs; p += thread_stride()) {
    const Pack<TE, V> ev = load_pack<TE, V>(e + p * V);
    const Pack<TN, V> zv = load_pack<TN, V>(z + p * V);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const float d = to_f(ev.v[k]) - to_f(zv.v[k]);
      acc += d * d;
    }
  }
  for (int64_t j = packs * V + thread_id(); j < n; j += thread_stride()) {  // tail (< V)
    const float d = to_f(e[j]) - to_f(z[j]);
    acc += d * d;
  }
  __shared__ float s[kThreads];
  s[threadIdx.x] = acc;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w >>= 1) {  // fixed tree: deterministic
    if (threadIdx.x < w) s[threadIdx.x] += s[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) partials[blockIdx.x] = s[0];
}

__global__ void mse_final_kernel(const float* __restrict__ partials, int np, int64_t n,
                                 float* __restrict__ out) {
  __shared__ double s[kMaxPartials];
  s[threadIdx.x] = threadIdx.x < np ? static_cast<double>(partials[threadIdx.x]) : 0.0;
  __syncthreads();
  for (int w = kMaxPartials / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) s[threadIdx.x] += s[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[0] = static_cast<float>(s[0] / static_cast<double>(n));
}

template <typename TE, typename TN>
int launch_mse(Launch l, const void* e, const void* z, int64_t n, float* partials, float* out) {
  constexpr int V = 16 / sizeof(TE);
  const auto s = static_cast<cudaStream_t>(l.stream);
  const int np = eps_mse_num_partials(n);
  if (aligned(e, 16) && aligned(z, static_cast<int>(sizeof(TN)) * V)) {
    mse_partial_kernel<TE, TN, V><<<np, kThreads, 0, s>>>(static_cast<const TE*>(e),
                                                           static_cast<const TN*>(z), n, partials);
  } else {
    mse_partial_kernel<TE, TN, 1><<<np, kThreads, 0, s>>>(static_cast<const TE*>(e),
                                                           static_cast<const TN*>(z), n, partials);
  }
  mse_final_kernel<<<1, kMaxPartials, 0, s>>>(partials, np, n, out);
  return finish();
}

template <typename TE, typename TN, int V>
__global__ void mse_backward_kernel(const float* __restrict__ grad, const TE* __restrict__ e,
                                    const TN* __restrict__ z, TE* __restrict__ out, int64_t n) {
  const float scale = grad[0] * (2.0f / static_cast<float>(n));
  const int64_t packs = n / V;
  for (int64_t p = thread_id(); p < packs; p += thread_stride()) {
    const Pack<TE, V> ev = load_pack<TE, V>(e + p * V);
    const Pack<TN, V> zv = load_pack<TN, V>(z + p * V);
    Pack<TE, V> ov;
#pragma unroll
    for (int k = 0; k < V; ++k) ov.v[k] = from_f<TE>(scale * (to_f(ev.v[k]) - to_f(zv.v[k])));
    store_pack<TE, V>(out + p * V, ov);
  }
  for (int64_t j = packs * V + thread_id(); j < n; j += thread_stride()) {
    out[j] = from_f<TE>(scale * (to_f(e[j]) - to_f(z[j])));
  }
}

template <typename TE, typename TN>
int launch_mse_backward(Launch l, const float* grad, const void* e, const void* z, void* out,
                        int64_t n) {
  constexpr int V = 16 / sizeof(TE);
  const auto s = static_cast<cudaStream_t>(l.stream);
  if (aligned(e, 16) && aligned(out, 16) && aligned(z, static_cast<int>(sizeof(TN)) * V)) {
    mse_backward_kernel<TE, TN, V><<<grid_for(n / V + 1, l.max_blocks), kThreads, 0, s>>>(
        grad, static_cast<const TE*>(e), static_cast<const TN*>(z), static_cast<TE*>(out), n);
  } else {
    mse_backward_kernel<TE, TN, 1><<<grid_for(n, l.max_blocks), kThreads, 0, s>>>(
        grad, static_cast<const TE*>(e), static_cast<const TN*>(z), static_cast<TE*>(out), n);
  }
  return finish();
}

// ------------------------------------------------------------------------------ sampler steps
// Coefficients of example e for the ancestral step (tables indexed by t).
template <typename TabT>
struct AncestralCoefs {
  const int64_t* t;
  const TabT *recip, *recipm1, *coef1, *coef2, *log_var;
  int64_t T;
  __device__ __forceinline__ StepCoef operator()(int64_t e) const {
    const int64_t tt = load_t(t, e, 0, T);
    return ancestral_coef(static_cast<double>(recip[tt]), static_cast<double>(recipm1[tt]),
                          static_cast<double>(coef1[tt]), static_cast<double>(coef2[tt]),
                          static_cast<double>(log_var[tt]), tt);
  }
};

// Coefficients of example e for the DDIM step (alphas_cumprod at t and t_prev).
template <typename TabT>
struct DdimCoefs {
  const int64_t *t, *t_prev;
  const TabT* abar;
  int64_t T;
  double eta;
  __device__ __forceinline__ StepCoef operator()(int64_t e) const {
    const int64_t tt = load_t(t, e, 0, T);
    const int64_t tp = load_t(t_prev, e, -1, T);
    assert(tp < tt && "jdm_fast: t_prev must be smaller than t");
    return ddim_coef(static_cast<double>(abar[tt]), tp >= 0 ? static_cast<double>(abar[tp]) : 1.0,
                     eta);
  }
};

// One reverse step (step_rules.h): Coefs gives an example's coefficients, Rule the output.
// Each thread owns a group of 4 flat elements aligned to the Philox stream (the group of
// stream block `blk` when drawing noise, of 4 consecutive elements otherwise); per-example
// coefficients are recomputed in float64 only when the example changes.
template <typename T, typename Rule, typename Coefs>
__global__ void step_kernel(const T* __restrict__ x, const T* __restrict__ eps, int mode,
                            const T* __restrict__ noise, uint64_t seed, uint64_t offset,
                            T* __restrict__ out, Coefs coefs, bool clip, int64_t n, int64_t per) {
  const uint64_t off = mode == kNoisePhilox ? offset : 0;
  const uint64_t first = off / 4;
  const uint64_t groups = (off + static_cast<uint64_t>(n) + 3) / 4 - first;
  for (uint64_t k = thread_id(); k < groups; k += thread_stride()) {
    const uint64_t blk = first + k;
    float z[4] = {0.f, 0.f, 0.f, 0.f};
    if (mode == kNoisePhilox) philox_normal4(seed, blk, z);
    int64_t cur = -1;
    StepCoef c{};
#pragma unroll
    for (int lane = 0; lane < 4; ++lane) {
      const uint64_t g = 4 * blk + lane;
      if (g < off || g >= off + static_cast<uint64_t>(n)) continue;
      const int64_t j = static_cast<int64_t>(g - off);
      const int64_t e = j / per;
      if (e != cur) {
        cur = e;
        c = coefs(e);
      }
      const float zv = mode == kNoiseTensor ? to_f(noise[j]) : z[lane];
      const float xv = to_f(x[j]);
      const float ev = to_f(eps[j]);
      float x0 = c.recip * xv - c.recipm1 * ev;
      if (clip) x0 = clamp1(x0);
      out[j] = from_f<T>(Rule::out(c, xv, ev, x0, clip, zv));
    }
  }
}

int64_t step_groups(int mode, uint64_t offset, int64_t n) {
  const uint64_t off = mode == kNoisePhilox ? offset : 0;
  return static_cast<int64_t>((off + static_cast<uint64_t>(n) + 3) / 4 - off / 4);
}

template <typename Tx, typename Rule, typename Coefs>
int launch_step(Launch l, const void* x, const void* eps, int mode, const void* noise,
                uint64_t seed, uint64_t offset, void* out, const Coefs& coefs, bool clip,
                int64_t n, int64_t per) {
  const int grid = grid_for(step_groups(mode, offset, n), l.max_blocks);
  step_kernel<Tx, Rule, Coefs><<<grid, kThreads, 0, static_cast<cudaStream_t>(l.stream)>>>(
      static_cast<const Tx*>(x), static_cast<const Tx*>(eps), mode, static_cast<const Tx*>(noise),
      seed, offset, static_cast<Tx*>(out), coefs, clip, n, per);
  return finish();
}

// Calls f(T{}, TabT{}) with the element and table types.
template <typename F>
int dispatch(int dtype, bool f64, F f) {
  switch (dtype) {
    case kF32:
      return f64 ? f(float{}, double{}) : f(float{}, float{});
    case kF16:
      return f64 ? f(__half{}, double{}) : f(__half{}, float{});
    case kBF16:
      return f64 ? f(__nv_bfloat16{}, double{}) : f(__nv_bfloat16{}, float{});
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

template <typename F>
int dispatch_pair(int dtype, bool noise_f32, F f) {
  switch (dtype) {
    case kF32:
      return f(float{}, float{});
    case kF16:
      return noise_f32 ? f(__half{}, float{}) : f(__half{}, __half{});
    case kBF16:
      return noise_f32 ? f(__nv_bfloat16{}, float{}) : f(__nv_bfloat16{}, __nv_bfloat16{});
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace

int q_sample(Launch l, int dtype, const void* x0, const void* noise, void* out, const int64_t* t,
             Table a, Table b, int64_t T, int64_t n, int64_t per) {
  return dispatch(dtype, a.f64, [&](auto x, auto tab) {
    return launch_q_sample<decltype(x), decltype(tab)>(l, x0, noise, out, t, a.ptr, b.ptr, T, n, per);
  });
}

int q_sample_philox(Launch l, int dtype, const void* x0, void* out, void* noise_out,
                    const int64_t* t, Table a, Table b, int64_t T, int64_t n, int64_t per,
                    uint64_t seed, uint64_t offset, const int64_t* first_example) {
  return dispatch(dtype, a.f64, [&](auto x, auto tab) {
    return launch_q_sample_philox<decltype(x), decltype(tab)>(l, x0, out, noise_out, t, a.ptr,
                                                              b.ptr, T, n, per, seed, offset,
                                                              first_example);
  });
}

int counter_timesteps(Launch l, const int64_t* first, uint64_t seed, int64_t n, int64_t T,
                      int64_t* out) {
  counter_timesteps_kernel<<<grid_for(n, l.max_blocks), kThreads, 0, static_cast<cudaStream_t>(l.stream)>>>(
      first, seed, n, static_cast<uint64_t>(T), out);
  return finish();
}

int counter_uniform(Launch l, const int64_t* first, uint64_t seed, uint32_t tag, int64_t n,
                    int64_t width, float* out) {
  counter_uniform_kernel<<<grid_for(n * ((width + 3) / 4), l.max_blocks), kThreads, 0,
                           static_cast<cudaStream_t>(l.stream)>>>(first, seed, tag, n, width, out);
  return finish();
}

int eps_mse_num_partials(int64_t n) {
  int64_t b = (n + kThreads * 16 - 1) / (kThreads * 16);
  if (b > kMaxPartials) b = kMaxPartials;
  return static_cast<int>(b < 1 ? 1 : b);
}

int eps_mse(Launch l, int dtype, bool noise_f32, const void* e, const void* z, int64_t n,
            float* partials, float* out) {
  return dispatch_pair(dtype, noise_f32, [&](auto te, auto tn) {
    return launch_mse<decltype(te), decltype(tn)>(l, e, z, n, partials, out);
  });
}

int eps_mse_backward(Launch l, int dtype, bool noise_f32, const float* grad, const void* e,
                     const void* z, void* out, int64_t n) {
  return dispatch_pair(dtype, noise_f32, [&](auto te, auto tn) {
    return launch_mse_backward<decltype(te), decltype(tn)>(l, grad, e, z, out, n);
  });
}

int ancestral_step(Launch l, int dtype, const void* x, const void* eps, int mode,
                   const void* noise, uint64_t seed, uint64_t offset, void* out, const int64_t* t,
                   AncestralTables tabs, int64_t T, bool clip, int64_t n, int64_t per) {
  return dispatch(dtype, tabs.recip.f64, [&](auto xv, auto tab) {
    using Tt = decltype(tab);
    const AncestralCoefs<Tt> coefs{t,
                                   static_cast<const Tt*>(tabs.recip.ptr),
                                   static_cast<const Tt*>(tabs.recipm1.ptr),
                                   static_cast<const Tt*>(tabs.coef1.ptr),
                                   static_cast<const Tt*>(tabs.coef2.ptr),
                                   static_cast<const Tt*>(tabs.log_variance.ptr),
                                   T};
    return launch_step<decltype(xv), AncestralRule>(l, x, eps, mode, noise, seed, offset, out,
                                                    coefs, clip, n, per);
  });
}

int ddim_step(Launch l, int dtype, const void* x, const void* eps, int mode, const void* noise,
              uint64_t seed, uint64_t offset, void* out, const int64_t* t, const int64_t* t_prev,
              Table abar, int64_t T, double eta, bool clip, int64_t n, int64_t per) {
  return dispatch(dtype, abar.f64, [&](auto xv, auto tab) {
    using Tt = decltype(tab);
    const DdimCoefs<Tt> coefs{t, t_prev, static_cast<const Tt*>(abar.ptr), T, eta};
    return launch_step<decltype(xv), DdimRule>(l, x, eps, mode, noise, seed, offset, out, coefs,
                                               clip, n, per);
  });
}

}  // namespace cuda
}  // namespace jdm_fast
