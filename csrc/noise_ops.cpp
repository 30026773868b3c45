// jdm_fast._C: op schemas and CPU kernels of the noise-schedule ops.
//
// Ops (torch.ops.jdm_fast.<name>); fake implementations and autograd live in
// jdm_fast/ops/noise.py, the CUDA kernels in noise_cuda.cu (registered by noise_cuda_ops.cpp).
// Math is float32 per element with per-example coefficients computed in float64 from the
// schedule tables; outputs are in the input dtype (eps_mse: a float32 scalar). Inputs that are not
// contiguous are copied to contiguous (row-major) first; outputs are contiguous.
#include <Python.h>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_isa.h"
#include "noise_common.h"
#include "philox.h"
#include "step_rules.h"

#ifdef JDM_X86_DISPATCH
#include <immintrin.h>
#endif

namespace jdm_fast {
namespace {

constexpr int64_t kGrain = 16384;  // elements per parallel_for task (at least)
constexpr int64_t kChunk = 2048;   // elements per Philox scratch fill

// The stream values for global elements [start, start + count) of `seed` (see philox.h).
void fill_philox(uint64_t seed, uint64_t start, int64_t count, float* out) {
  int64_t i = 0;
  while (i < count) {
    const uint64_t g = start + static_cast<uint64_t>(i);
    float z[4];
    philox_normal4(seed, g / 4, z);
    for (uint64_t lane = g % 4; lane < 4 && i < count; ++lane, ++i) out[i] = z[lane];
  }
}

// Calls f(example, j0, j1) for each per-example segment of the flat range [begin, end).
template <typename F>
inline void for_segments(int64_t begin, int64_t end, int64_t per, F f) {
  int64_t i = begin;
  while (i < end) {
    const int64_t e = i / per;
    const int64_t stop = std::min(end, (e + 1) * per);
    f(e, i, stop);
    i = stop;
  }
}

template <typename F>
inline void dispatch_table(const at::Tensor& tab, F f) {
  if (tab.scalar_type() == at::kDouble) {
    f(tab.data_ptr<double>());
  } else {
    f(tab.data_ptr<float>());
  }
}

#define JDM_DISPATCH_FLOAT(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// ------------------------------------------------------------------------------------ q_sample
at::Tensor q_sample_cpu(const at::Tensor& x0_in, const at::Tensor& t_in, const at::Tensor& a_in,
                        const at::Tensor& b_in, const at::Tensor& noise_in) {
  const char* op = "jdm_fast::q_sample";
  const int64_t T = check_q_sample_args(op, x0_in, t_in, a_in, b_in);
  check_like(op, "noise", noise_in, "x0", x0_in);
  const auto x0 = x0_in.contiguous(), noise = noise_in.contiguous(), t = t_in.contiguous();
  const auto a = a_in.contiguous(), b = b_in.to(a_in.scalar_type()).contiguous();
  check_t_range_cpu(op, "t", t, 0, T);
  auto out = at::empty_like(x0, at::MemoryFormat::Contiguous);
  const int64_t n = x0.numel(), per = per_example(x0);
  if (n == 0) return out;
  const int64_t* tp = t.data_ptr<int64_t>();
  JDM_DISPATCH_FLOAT(x0.scalar_type(), "q_sample_cpu", [&] {
    const scalar_t* xp = x0.data_ptr<scalar_t>();
    const scalar_t* np_ = noise.data_ptr<scalar_t>();
    scalar_t* op_ = out.data_ptr<scalar_t>();
    dispatch_table(a, [&](auto* ap) {
      using tab_t = std::remove_const_t<std::remove_pointer_t<decltype(ap)>>;
      const tab_t* bp = b.data_ptr<tab_t>();
      at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
        for_segments(begin, end, per, [&](int64_t e, int64_t j0, int64_t j1) {
          const float ca = static_cast<float>(ap[tp[e]]), cb = static_cast<float>(bp[tp[e]]);
          for (int64_t j = j0; j < j1; ++j) {
            op_[j] = static_cast<scalar_t>(ca * static_cast<float>(xp[j]) +
                                           cb * static_cast<float>(np_[j]));
          }
        });
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> q_sample_philox_impl(const char* op, const at::Tensor& x0_in,
                                                        const at::Tensor& t_in,
                                                        const at::Tensor& a_in,
                                                        const at::Tensor& b_in, int64_t seed,
                                                        int64_t offset) {
  const int64_t T = check_q_sample_args(op, x0_in, t_in, a_in, b_in);
  check_offset(op, offset);
  const auto x0 = x0_in.contiguous(), t = t_in.contiguous();
  const auto a = a_in.contiguous(), b = b_in.to(a_in.scalar_type()).contiguous();
  check_t_range_cpu(op, "t", t, 0, T);
  auto out = at::empty_like(x0, at::MemoryFormat::Contiguous);
  auto noise = at::empty_like(x0, at::MemoryFormat::Contiguous);
  const int64_t n = x0.numel(), per = per_example(x0);
  if (n == 0) return {out, noise};
  const int64_t* tp = t.data_ptr<int64_t>();
  const uint64_t useed = static_cast<uint64_t>(seed), uoff = static_cast<uint64_t>(offset);
  JDM_DISPATCH_FLOAT(x0.scalar_type(), "q_sample_philox_cpu", [&] {
    const scalar_t* xp = x0.data_ptr<scalar_t>();
    scalar_t* op_ = out.data_ptr<scalar_t>();
    scalar_t* zp = noise.data_ptr<scalar_t>();
    dispatch_table(a, [&](auto* ap) {
      using tab_t = std::remove_const_t<std::remove_pointer_t<decltype(ap)>>;
      const tab_t* bp = b.data_ptr<tab_t>();
      at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
        float buf[kChunk];
        for (int64_t c0 = begin; c0 < end; c0 += kChunk) {
          const int64_t c1 = std::min(end, c0 + kChunk);
          fill_philox(useed, uoff + static_cast<uint64_t>(c0), c1 - c0, buf);
          for_segments(c0, c1, per, [&](int64_t e, int64_t j0, int64_t j1) {
            const float ca = static_cast<float>(ap[tp[e]]), cb = static_cast<float>(bp[tp[e]]);
            for (int64_t j = j0; j < j1; ++j) {
              const scalar_t z = static_cast<scalar_t>(buf[j - c0]);
              zp[j] = z;  // x_t uses the noise as returned (rounded to the dtype)
              op_[j] = static_cast<scalar_t>(ca * static_cast<float>(xp[j]) +
                                             cb * static_cast<float>(z));
            }
          });
        }
      });
    });
  });
  return {out, noise};
}

std::tuple<at::Tensor, at::Tensor> q_sample_philox_cpu(const at::Tensor& x0, const at::Tensor& t,
                                                       const at::Tensor& a, const at::Tensor& b,
                                                       int64_t seed, int64_t offset) {
  return q_sample_philox_impl("jdm_fast::q_sample_philox", x0, t, a, b, seed, offset);
}

// The keyed form: stream offset first_example * per_example (first_example is a CPU tensor here).
std::tuple<at::Tensor, at::Tensor> q_sample_keyed_cpu(const at::Tensor& x0, const at::Tensor& t,
                                                      const at::Tensor& a, const at::Tensor& b,
                                                      int64_t seed, const at::Tensor& first_example) {
  const char* op = "jdm_fast::q_sample_keyed";
  check_first_example(op, first_example, x0.device());
  check_x(op, "x0", x0);
  const int64_t first = first_example.reshape({}).item<int64_t>();
  return q_sample_philox_impl(op, x0, t, a, b, seed, first * per_example(x0));
}

// ------------------------------------------------------------------------------ counter draws
at::Tensor counter_timesteps_cpu(const at::Tensor& first_example, int64_t seed, int64_t n,
                                 int64_t num_timesteps) {
  check_counter_args("jdm_fast::counter_timesteps", first_example, n, num_timesteps, "num_timesteps");
  const uint64_t first = static_cast<uint64_t>(first_example.reshape({}).item<int64_t>());
  auto out = at::empty({n}, first_example.options());
  int64_t* op_ = out.data_ptr<int64_t>();
  const uint64_t useed = static_cast<uint64_t>(seed), T = static_cast<uint64_t>(num_timesteps);
  at::parallel_for(0, n, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) op_[i] = counter_timestep(useed, first + i, T);
  });
  return out;
}

// counter_uniform4 for 16 consecutive column blocks q0 .. q0 + 15 of row g at once (64 columns,
// out[4 l + k] = lane k of block q0 + l): Philox's rounds on 16 counters in AVX-512 registers,
// the 32 x 32 -> 64-bit products of even and odd lanes by vpmuludq, the four result words
// transposed to column order in registers. Bit-identical to counter_uniform4 (tests compare
// both with the NumPy reference); used where cpu_isa() is AVX-512 (cpu_isa.h), else the scalar loop.
constexpr int64_t kUniformSpan = 64;

#ifdef JDM_X86_DISPATCH

__attribute__((target("avx512f"))) inline __m512i mulhilo16(__m512i a, __m512i m, __m512i* hi) {
  const __m512i even = _mm512_mul_epu32(a, m), odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  *hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  return _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}

__attribute__((target("avx512f"))) inline __m512 unit24(__m512i c) {  // top 24 bits as [0, 1)
  return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(c, 8)), _mm512_set1_ps(kUniform24));
}

__attribute__((target("avx512f"))) inline __m512 unpack_pd(__m512 x, __m512 y, bool high) {
  const __m512d a = _mm512_castps_pd(x), b = _mm512_castps_pd(y);
  return _mm512_castpd_ps(high ? _mm512_unpackhi_pd(a, b) : _mm512_unpacklo_pd(a, b));
}

__attribute__((target("avx512f"))) void counter_uniform_x16(uint64_t g, uint32_t tag, uint32_t q0, uint64_t seed,
                                                            float* out) {
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(kPhiloxM1));
  __m512i c0 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(g)));
  __m512i c1 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(g >> 32)));
  __m512i c2 = _mm512_set1_epi32(static_cast<int>(tag));
  __m512i c3 = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(q0)),
                                _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    __m512i hi0, hi1;
    const __m512i lo0 = mulhilo16(c0, m0, &hi0), lo1 = mulhilo16(c2, m1, &hi1);
    c0 = _mm512_xor_si512(_mm512_xor_si512(hi1, c1), _mm512_set1_epi32(static_cast<int>(k0)));
    c2 = _mm512_xor_si512(_mm512_xor_si512(hi0, c3), _mm512_set1_epi32(static_cast<int>(k1)));
    c1 = lo1;
    c3 = lo0;
  }
  const __m512 a = unit24(c0), b = unit24(c1), c = unit24(c2), d = unit24(c3);
  // (a, b, c, d) lane-major -> column order: 4 x 4 transposes within and across 128-bit lanes
  const __m512 ab_lo = _mm512_unpacklo_ps(a, b), ab_hi = _mm512_unpackhi_ps(a, b);
  const __m512 cd_lo = _mm512_unpacklo_ps(c, d), cd_hi = _mm512_unpackhi_ps(c, d);
  const __m512 x0 = unpack_pd(ab_lo, cd_lo, false), x1 = unpack_pd(ab_lo, cd_lo, true);
  const __m512 x2 = unpack_pd(ab_hi, cd_hi, false), x3 = unpack_pd(ab_hi, cd_hi, true);
  const __m512 t0 = _mm512_shuffle_f32x4(x0, x1, 0x44), t1 = _mm512_shuffle_f32x4(x2, x3, 0x44);
  const __m512 t2 = _mm512_shuffle_f32x4(x0, x1, 0xEE), t3 = _mm512_shuffle_f32x4(x2, x3, 0xEE);
  _mm512_storeu_ps(out, _mm512_shuffle_f32x4(t0, t1, 0x88));
  _mm512_storeu_ps(out + 16, _mm512_shuffle_f32x4(t0, t1, 0xDD));
  _mm512_storeu_ps(out + 32, _mm512_shuffle_f32x4(t2, t3, 0x88));
  _mm512_storeu_ps(out + 48, _mm512_shuffle_f32x4(t2, t3, 0xDD));
}
#endif

// Columns [j0, j0 + cols) of row g (j0 a multiple of 4); x16: the AVX-512 path.
void counter_uniform_span(uint64_t seed, uint64_t g, uint32_t tag, int64_t j0, int64_t cols, float* dst, bool x16) {
#ifdef JDM_X86_DISPATCH
  if (x16) {
    float tail[kUniformSpan];
    counter_uniform_x16(g, tag, static_cast<uint32_t>(j0 / 4), seed, cols == kUniformSpan ? dst : tail);
    if (cols < kUniformSpan) std::copy(tail, tail + cols, dst);
    return;
  }
#endif
  for (int64_t q = 0; 4 * q < cols; ++q) {
    float u[4];
    counter_uniform4(seed, g, tag, static_cast<uint32_t>(j0 / 4 + q), u);
    for (int64_t k = 0; k < 4 && 4 * q + k < cols; ++k) dst[4 * q + k] = u[k];
  }
}

at::Tensor counter_uniform_cpu(const at::Tensor& first_example, int64_t seed, int64_t tag, int64_t n,
                               int64_t width) {
  const char* op = "jdm_fast::counter_uniform";
  check_counter_args(op, first_example, n, width, "width");
  check_tag(op, tag);
  const uint64_t first = static_cast<uint64_t>(first_example.reshape({}).item<int64_t>());
  auto out = at::empty({n, width}, first_example.options().dtype(at::kFloat));
  float* op_ = out.data_ptr<float>();
  const uint64_t useed = static_cast<uint64_t>(seed);
  const bool x16 = cpu_isa() == Isa::kAvx512;  // chosen once, on this thread (a bad JDM_FAST_CPU_ISA raises here)
  const int64_t spans = (width + kUniformSpan - 1) / kUniformSpan;
  // one task per (row, 64 columns): rows alone would leave threads idle (a batch of 8 rows)
  at::parallel_for(0, n * spans, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t i = t / spans, j0 = (t % spans) * kUniformSpan;
      counter_uniform_span(useed, first + static_cast<uint64_t>(i), static_cast<uint32_t>(tag), j0,
                           std::min(kUniformSpan, width - j0), op_ + i * width + j0, x16);
    }
  });
  return out;
}

// ------------------------------------------------------------------------------------ eps_mse
template <typename F>
inline void dispatch_mse(const at::Tensor& eps_hat, const at::Tensor& noise, F f) {
  JDM_DISPATCH_FLOAT(eps_hat.scalar_type(), "eps_mse_cpu", [&] {
    if (noise.scalar_type() == eps_hat.scalar_type()) {
      f(eps_hat.data_ptr<scalar_t>(), noise.data_ptr<scalar_t>());
    } else {
      f(eps_hat.data_ptr<scalar_t>(), noise.data_ptr<float>());
    }
  });
}

constexpr int64_t kMseChunk = 32768;  // fixed chunks: the sum order never depends on threads

at::Tensor eps_mse_cpu(const at::Tensor& eps_in, const at::Tensor& noise_in) {
  const char* op = "jdm_fast::eps_mse";
  check_mse_args(op, eps_in, noise_in);
  const auto eps = eps_in.contiguous(), noise = noise_in.contiguous();
  const int64_t n = eps.numel();
  auto out = at::empty({}, eps.options().dtype(at::kFloat));
  if (n == 0) {
    out.fill_(std::nan(""));  // mean of nothing, as torch.nn.functional.mse_loss
    return out;
  }
  const int64_t chunks = (n + kMseChunk - 1) / kMseChunk;
  std::vector<double> partial(chunks);
  dispatch_mse(eps, noise, [&](const auto* ep, const auto* np_) {
    at::parallel_for(0, chunks, 1, [&](int64_t c_begin, int64_t c_end) {
      for (int64_t c = c_begin; c < c_end; ++c) {
        const int64_t j0 = c * kMseChunk, j1 = std::min(n, j0 + kMseChunk);
        float acc[16] = {0};
        int64_t j = j0;
        for (; j + 16 <= j1; j += 16) {
          for (int l = 0; l < 16; ++l) {
            const float d = static_cast<float>(ep[j + l]) - static_cast<float>(np_[j + l]);
            acc[l] += d * d;
          }
        }
        double s = 0.0;
        for (; j < j1; ++j) {
          const float d = static_cast<float>(ep[j]) - static_cast<float>(np_[j]);
          s += static_cast<double>(d) * d;
        }
        for (int l = 0; l < 16; ++l) s += acc[l];
        partial[c] = s;
      }
    });
  });
  double total = 0.0;
  for (double p : partial) total += p;
  out.fill_(total / static_cast<double>(n));
  return out;
}

at::Tensor eps_mse_backward_cpu(const at::Tensor& grad, const at::Tensor& eps_in,
                                const at::Tensor& noise_in) {
  const char* op = "jdm_fast::eps_mse_backward";
  check_mse_args(op, eps_in, noise_in);
  TORCH_CHECK_VALUE(grad.numel() == 1, op, ": grad must be a scalar, got shape ", grad.sizes());
  const auto eps = eps_in.contiguous(), noise = noise_in.contiguous();
  auto out = at::empty_like(eps, at::MemoryFormat::Contiguous);
  const int64_t n = eps.numel();
  if (n == 0) return out;
  const float scale = static_cast<float>(grad.item<double>() * 2.0 / static_cast<double>(n));
  dispatch_mse(eps, noise, [&](const auto* ep, const auto* np_) {
    using out_t = std::remove_const_t<std::remove_pointer_t<decltype(ep)>>;
    out_t* op_ = out.data_ptr<out_t>();
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        op_[j] = static_cast<out_t>(scale * (static_cast<float>(ep[j]) - static_cast<float>(np_[j])));
      }
    });
  });
  return out;
}

// ----------------------------------------------------------------------------- sampler steps
using cuda::NoiseMode;  // the enum shared with the CUDA launch interface (plain C++)

// Clamp to [-1, 1] that lets NaN through (as torch.clamp), so a diverging sampler stays visible.
// Written as min/max plus a select so loops using it vectorize (a ternary chain did not).
inline float clamp1(float v) {
  const float c = std::min(1.f, std::max(-1.f, v));
  return v == v ? c : v;
}

// Runs seg(e, j0, j1, z) over the per-example segments of the flat range, z pointing at the
// segment's noise as float32 (Philox scratch, a converted copy of the noise tensor, or zeros).
// seg's inner loop is a plain branch-free contiguous loop the compiler vectorizes.
template <typename scalar_t, typename Seg>
void step_loop(int64_t n, int64_t per, NoiseMode mode, const scalar_t* zt, uint64_t seed,
               uint64_t offset, Seg seg) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    float buf[kChunk];
    for (int64_t c0 = begin; c0 < end; c0 += kChunk) {
      const int64_t c1 = std::min(end, c0 + kChunk);
      if (mode == cuda::kNoisePhilox) {
        fill_philox(seed, offset + static_cast<uint64_t>(c0), c1 - c0, buf);
      } else if (mode == cuda::kNoiseTensor) {
        for (int64_t j = c0; j < c1; ++j) buf[j - c0] = static_cast<float>(zt[j]);
      } else {
        std::fill(buf, buf + (c1 - c0), 0.f);
      }
      for_segments(c0, c1, per, [&](int64_t e, int64_t j0, int64_t j1) {
        seg(e, j0, j1, buf + (j0 - c0));
      });
    }
  });
}

// Runs Rule (step_rules.h) over every element: x0 = recip * x - recipm1 * eps, clamped when
// clip_denoised (the branch hoisted out of the loop so both loops stay branch-free), then
// out = Rule::out(...). coef holds each example's coefficients.
template <typename Rule>
at::Tensor reverse_step_cpu(const at::Tensor& x, const at::Tensor& eps,
                            const at::Tensor& noise, NoiseMode mode, c10::optional<int64_t> seed,
                            int64_t offset, const std::vector<StepCoef>& coef, bool clip_denoised) {
  auto out = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t n = x.numel(), per = per_example(x);
  if (n == 0) return out;
  JDM_DISPATCH_FLOAT(x.scalar_type(), "reverse_step_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* ep = eps.data_ptr<scalar_t>();
    const scalar_t* zt = noise.defined() ? noise.data_ptr<scalar_t>() : nullptr;
    scalar_t* op_ = out.data_ptr<scalar_t>();
    step_loop<scalar_t>(n, per, mode, zt, static_cast<uint64_t>(seed.value_or(0)),
                        static_cast<uint64_t>(offset),
                        [&](int64_t e, int64_t j0, int64_t j1, const float* z) {
      const StepCoef c = coef[e];
      const scalar_t* xs = xp + j0;
      const scalar_t* es = ep + j0;
      scalar_t* os = op_ + j0;
      const int64_t m = j1 - j0;
      if (clip_denoised) {
        for (int64_t j = 0; j < m; ++j) {
          const float xv = static_cast<float>(xs[j]), ev = static_cast<float>(es[j]);
          const float x0 = clamp1(c.recip * xv - c.recipm1 * ev);
          os[j] = static_cast<scalar_t>(Rule::out(c, xv, ev, x0, true, z[j]));
        }
      } else {
        for (int64_t j = 0; j < m; ++j) {
          const float xv = static_cast<float>(xs[j]), ev = static_cast<float>(es[j]);
          const float x0 = c.recip * xv - c.recipm1 * ev;
          os[j] = static_cast<scalar_t>(Rule::out(c, xv, ev, x0, false, z[j]));
        }
      }
    });
  });
  return out;
}

at::Tensor ancestral_step_cpu(const at::Tensor& x_in, const at::Tensor& eps_in,
                              const at::Tensor& t_in, const at::Tensor& recip_in,
                              const at::Tensor& recipm1_in, const at::Tensor& coef1_in,
                              const at::Tensor& coef2_in, const at::Tensor& logvar_in,
                              bool clip_denoised, const c10::optional<at::Tensor>& noise_in,
                              c10::optional<int64_t> seed, int64_t offset) {
  const char* op = "jdm_fast::ancestral_step";
  const int64_t T = check_ancestral_args(op, x_in, eps_in, t_in, recip_in, recipm1_in, coef1_in,
                                         coef2_in, logvar_in);
  const NoiseMode mode = check_step_noise(op, noise_in, seed, offset, x_in);
  const auto t = t_in.contiguous();
  check_t_range_cpu(op, "t", t, 0, T);
  const int64_t B = x_in.size(0);
  std::vector<StepCoef> coef(B);
  const int64_t* tp = t.data_ptr<int64_t>();
  const auto get = [&](const at::Tensor& tab, int64_t i) {
    return tab.scalar_type() == at::kDouble ? tab.data_ptr<double>()[i]
                                            : static_cast<double>(tab.data_ptr<float>()[i]);
  };
  const auto r = recip_in.contiguous(), rm = recipm1_in.contiguous(), c1 = coef1_in.contiguous(),
             c2 = coef2_in.contiguous(), lv = logvar_in.contiguous();
  for (int64_t e = 0; e < B; ++e) {
    const int64_t tt = tp[e];
    coef[e] = ancestral_coef(get(r, tt), get(rm, tt), get(c1, tt), get(c2, tt), get(lv, tt), tt);
  }
  const at::Tensor noise = mode == cuda::kNoiseTensor ? noise_in->contiguous() : at::Tensor();
  return reverse_step_cpu<AncestralRule>(x_in.contiguous(), eps_in.contiguous(), noise, mode,
                                         seed, offset, coef, clip_denoised);
}

at::Tensor ddim_step_cpu(const at::Tensor& x_in, const at::Tensor& eps_in, const at::Tensor& t_in,
                         const at::Tensor& tprev_in, const at::Tensor& abar_in, double eta,
                         bool clip_denoised, const c10::optional<at::Tensor>& noise_in,
                         c10::optional<int64_t> seed, int64_t offset) {
  const char* op = "jdm_fast::ddim_step";
  const int64_t T = check_ddim_args(op, x_in, eps_in, t_in, tprev_in, abar_in, eta);
  const NoiseMode mode = check_step_noise(op, noise_in, seed, offset, x_in);
  const auto t = t_in.contiguous(), tprev = tprev_in.contiguous();
  check_t_range_cpu(op, "t", t, 0, T);
  check_t_range_cpu(op, "t_prev", tprev, -1, T);
  const int64_t B = x_in.size(0);
  const int64_t* tp = t.data_ptr<int64_t>();
  const int64_t* pp = tprev.data_ptr<int64_t>();
  for (int64_t e = 0; e < B; ++e) {
    TORCH_CHECK_VALUE(pp[e] < tp[e], op, ": t_prev[", e, "] = ", pp[e], " must be smaller than t[",
                      e, "] = ", tp[e]);
  }
  std::vector<StepCoef> coef(B);
  const auto abar = abar_in.to(at::kDouble).contiguous();
  const double* ab = abar.data_ptr<double>();
  for (int64_t e = 0; e < B; ++e) {
    coef[e] = ddim_coef(ab[tp[e]], pp[e] >= 0 ? ab[pp[e]] : 1.0, eta);
  }
  const at::Tensor noise = mode == cuda::kNoiseTensor ? noise_in->contiguous() : at::Tensor();
  return reverse_step_cpu<DdimRule>(x_in.contiguous(), eps_in.contiguous(), noise, mode, seed,
                                    offset, coef, clip_denoised);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(jdm_fast, m) {
  m.def(
      "q_sample(Tensor x0, Tensor t, Tensor sqrt_alphas_cumprod, "
      "Tensor sqrt_one_minus_alphas_cumprod, Tensor noise) -> Tensor");
  m.def(
      "q_sample_philox(Tensor x0, Tensor t, Tensor sqrt_alphas_cumprod, "
      "Tensor sqrt_one_minus_alphas_cumprod, int seed, SymInt offset) -> (Tensor, Tensor)");
  m.def(
      "q_sample_keyed(Tensor x0, Tensor t, Tensor sqrt_alphas_cumprod, "
      "Tensor sqrt_one_minus_alphas_cumprod, int seed, Tensor first_example) -> (Tensor, Tensor)");
  m.def("counter_timesteps(Tensor first_example, int seed, SymInt n, int num_timesteps) -> Tensor");
  m.def("counter_uniform(Tensor first_example, int seed, int tag, SymInt n, SymInt width) -> Tensor");
  m.def("eps_mse(Tensor eps_hat, Tensor noise) -> Tensor");
  m.def("eps_mse_backward(Tensor grad, Tensor eps_hat, Tensor noise) -> Tensor");
  m.def(
      "ancestral_step(Tensor x_t, Tensor eps_hat, Tensor t, Tensor sqrt_recip_alphas_cumprod, "
      "Tensor sqrt_recipm1_alphas_cumprod, Tensor posterior_mean_coef1, "
      "Tensor posterior_mean_coef2, Tensor log_variance, bool clip_denoised, Tensor? noise, "
      "int? seed, SymInt offset) -> Tensor");
  m.def(
      "ddim_step(Tensor x_t, Tensor eps_hat, Tensor t, Tensor t_prev, Tensor alphas_cumprod, "
      "float eta, bool clip_denoised, Tensor? noise, int? seed, SymInt offset) -> Tensor");
}

TORCH_LIBRARY_IMPL(jdm_fast, CPU, m) {
  m.impl("q_sample", &q_sample_cpu);
  m.impl("q_sample_philox", &q_sample_philox_cpu);
  m.impl("q_sample_keyed", &q_sample_keyed_cpu);
  m.impl("counter_timesteps", &counter_timesteps_cpu);
  m.impl("counter_uniform", &counter_uniform_cpu);
  m.impl("eps_mse", &eps_mse_cpu);
  m.impl("eps_mse_backward", &eps_mse_backward_cpu);
  m.impl("ancestral_step", &ancestral_step_cpu);
  m.impl("ddim_step", &ddim_step_cpu);
}

}  // namespace jdm_fast

// A plain extension module: importing jdm_fast._C runs the registrations above. WITH_CUDA tells
// whether the CUDA kernels were compiled in.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* mod = PyModule_Create(&module_def);
  if (mod == nullptr) return nullptr;
#ifdef JDM_FAST_WITH_CUDA
  PyModule_AddIntConstant(mod, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(mod, "WITH_CUDA", 0);
#endif
  return mod;
}
}
