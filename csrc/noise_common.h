// Argument checks and helpers shared by the CPU (noise_ops.cpp) and CUDA (noise_cuda_ops.cpp) op
// implementations of jdm_fast._C. Host code only; the .cu kernels never include this.
#pragma once

#include <ATen/ATen.h>

#include "noise_kernels.h"  // NoiseMode (plain enum, no CUDA types)

#include <cstdint>
#include <string>

namespace jdm_fast {

inline bool is_supported_float(at::ScalarType s) {
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16;
}

// x: a float32/float16/bfloat16 tensor with a batch dimension.
inline void check_x(const char* op, const char* name, const at::Tensor& x) {
  TORCH_CHECK_TYPE(is_supported_float(x.scalar_type()), op, ": ", name,
                   " must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": ", name, " must have a batch dimension, got a 0-d tensor");
}

// y must match x in shape, dtype and device.
inline void check_like(const char* op, const char* name, const at::Tensor& y, const char* xname,
                       const at::Tensor& x, bool same_dtype = true) {
  TORCH_CHECK_VALUE(y.sizes() == x.sizes(), op, ": ", name, " must have the shape of ", xname, " ",
                    x.sizes(), ", got ", y.sizes());
  TORCH_CHECK_VALUE(y.device() == x.device(), op, ": ", name, " is on ", y.device(), " but ",
                    xname, " is on ", x.device());
  if (same_dtype) {
    TORCH_CHECK_TYPE(y.scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ",
                     y.scalar_type(), " but ", xname, " has dtype ", x.scalar_type(),
                     " (they must match)");
  }
}

// t: int64 of shape (batch,) on x's device.
inline void check_t(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, op, ": ", name,
                   " must be an int64 tensor of timesteps, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == x.size(0), op, ": ", name,
                    " must have shape (batch,) = (", x.size(0), ",), got ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", name, " is on ", t.device(),
                    " but the data is on ", x.device());
}

// A schedule table: 1-D float32/float64 on x's device; all tables of an op share one length T.
inline void check_table(const char* op, const char* name, const at::Tensor& tab, const at::Tensor& x,
                        int64_t* T) {
  TORCH_CHECK_TYPE(tab.scalar_type() == at::kFloat || tab.scalar_type() == at::kDouble, op, ": ",
                   name, " must be a float32 or float64 table, got ", tab.scalar_type());
  TORCH_CHECK_VALUE(tab.dim() == 1 && tab.numel() > 0, op, ": ", name,
                    " must be a non-empty 1-D table of length T, got shape ", tab.sizes());
  TORCH_CHECK_VALUE(tab.device() == x.device(), op, ": ", name, " is on ", tab.device(),
                    " but the data is on ", x.device());
  if (*T < 0) {
    *T = tab.numel();
  } else {
    TORCH_CHECK_VALUE(tab.numel() == *T, op, ": ", name, " has length ", tab.numel(),
                      " but the other schedule tables have length ", *T);
  }
}

// Values of a CPU t tensor lie in [low, T) (CUDA kernels assert this on the device instead).
inline void check_t_range_cpu(const char* op, const char* name, const at::Tensor& t, int64_t low,
                              int64_t T) {
  const int64_t* p = t.data_ptr<int64_t>();
  for (int64_t i = 0; i < t.numel(); ++i) {
    TORCH_CHECK_VALUE(p[i] >= low && p[i] < T, op, ": ", name, "[", i, "] = ", p[i],
                      " lies outside [", low, ", ", T, ")");
  }
}

inline void check_offset(const char* op, int64_t offset) {
  TORCH_CHECK_VALUE(offset >= 0, op, ": offset must be >= 0, got ", offset);
}

// The keyed ops' first_example: a one-element int64 tensor on `device` (its value, the global
// index of the batch's first example, is read by the kernels; CUDA asserts it is >= 0).
inline void check_first_example(const char* op, const at::Tensor& first, const c10::Device& device) {
  TORCH_CHECK_TYPE(first.scalar_type() == at::kLong, op, ": first_example must be an int64 tensor, got ",
                   first.scalar_type());
  TORCH_CHECK_VALUE(first.numel() == 1, op, ": first_example must hold one value, got shape ", first.sizes());
  TORCH_CHECK_VALUE(first.device() == device, op, ": first_example is on ", first.device(),
                    " but the data is on ", device);
  if (first.device().is_cpu()) {
    const int64_t f = first.reshape({}).item<int64_t>();
    TORCH_CHECK_VALUE(f >= 0, op, ": first_example must be >= 0, got ", f);
  }
}

inline void check_counter_args(const char* op, const at::Tensor& first, int64_t n, int64_t size,
                               const char* size_name) {
  check_first_example(op, first, first.device());
  TORCH_CHECK_VALUE(n >= 0, op, ": n must be >= 0, got ", n);
  TORCH_CHECK_VALUE(size >= 1, op, ": ", size_name, " must be >= 1, got ", size);
}

inline void check_tag(const char* op, int64_t tag) {
  TORCH_CHECK_VALUE(tag >= 0 && tag <= 0xFFFFFFFFLL, op, ": tag must be in [0, 2^32), got ", tag);
}

// Elements per example of x (numel / batch); x has batch >= 1 when called.
inline int64_t per_example(const at::Tensor& x) { return x.size(0) == 0 ? 0 : x.numel() / x.size(0); }

// ---------------------------------------------------------------- the checks of each op
// Each returns T (the tables' common length) where the op has tables. Value ranges of t are
// checked by the callers: on the CPU (check_t_range_cpu), on CUDA by a device-side assert.

inline int64_t check_q_sample_args(const char* op, const at::Tensor& x0, const at::Tensor& t,
                                   const at::Tensor& a, const at::Tensor& b) {
  check_x(op, "x0", x0);
  check_t(op, "t", t, x0);
  int64_t T = -1;
  check_table(op, "sqrt_alphas_cumprod", a, x0, &T);
  check_table(op, "sqrt_one_minus_alphas_cumprod", b, x0, &T);
  return T;
}

inline void check_mse_args(const char* op, const at::Tensor& eps_hat, const at::Tensor& noise) {
  check_x(op, "eps_hat", eps_hat);
  check_like(op, "noise", noise, "eps_hat", eps_hat, /*same_dtype=*/false);
  TORCH_CHECK_TYPE(noise.scalar_type() == eps_hat.scalar_type() || noise.scalar_type() == at::kFloat,
                   op, ": noise must have eps_hat's dtype (", eps_hat.scalar_type(),
                   ") or float32, got ", noise.scalar_type());
}

// Where a sampler step's noise comes from: the tensor, the Philox stream of seed, or none.
inline cuda::NoiseMode check_step_noise(const char* op, const c10::optional<at::Tensor>& noise,
                                        const c10::optional<int64_t>& seed, int64_t offset,
                                        const at::Tensor& x_t) {
  check_offset(op, offset);
  if (noise.has_value()) {
    TORCH_CHECK_VALUE(!seed.has_value(), op, ": pass either noise or seed, not both");
    check_like(op, "noise", *noise, "x_t", x_t);
    return cuda::kNoiseTensor;
  }
  return seed.has_value() ? cuda::kNoisePhilox : cuda::kNoNoise;
}

inline int64_t check_ancestral_args(const char* op, const at::Tensor& x, const at::Tensor& eps,
                                    const at::Tensor& t, const at::Tensor& r, const at::Tensor& rm,
                                    const at::Tensor& c1, const at::Tensor& c2,
                                    const at::Tensor& lv) {
  check_x(op, "x_t", x);
  check_like(op, "eps_hat", eps, "x_t", x);
  check_t(op, "t", t, x);
  int64_t T = -1;
  check_table(op, "sqrt_recip_alphas_cumprod", r, x, &T);
  check_table(op, "sqrt_recipm1_alphas_cumprod", rm, x, &T);
  check_table(op, "posterior_mean_coef1", c1, x, &T);
  check_table(op, "posterior_mean_coef2", c2, x, &T);
  check_table(op, "log_variance", lv, x, &T);
  return T;
}

inline int64_t check_ddim_args(const char* op, const at::Tensor& x, const at::Tensor& eps,
                               const at::Tensor& t, const at::Tensor& t_prev,
                               const at::Tensor& abar, double eta) {
  check_x(op, "x_t", x);
  check_like(op, "eps_hat", eps, "x_t", x);
  check_t(op, "t", t, x);
  check_t(op, "t_prev", t_prev, x);
  TORCH_CHECK_VALUE(eta >= 0.0 && eta <= 1.0, op, ": eta must lie in [0, 1], got ", eta);
  int64_t T = -1;
  check_table(op, "alphas_cumprod", abar, x, &T);
  return T;
}

}  // namespace jdm_fast
