// CPU kernels of GroupNorm -> FiLM scale-shift -> SiLU (jdm_fast::group_norm_silu_cpu and its
// backward), the fused path of jdm_fast.ops.norm on CPU tensors (CUDA runs the Triton kernels;
// the PyTorch reference in jdm_fast/ops/norm.py is the test oracle for both).
//
//   y = act(((x - mean_g) * rstd_g * w_c + b_c) * (1 + s_nc) + sh_nc),  act = SiLU or identity
//
// x: (N, C, H, W), contiguous (NCHW) or channels-last (NHWC in memory); fp32, fp16 or bf16.
// Statistics (two-pass: mean, then centred squares) and all math in fp32, sums in fp64 across
// lanes. One pass over x per statistic and one for the output, each group (NCHW) or example
// (NHWC, in blocks of rows) read in its own dtype and converted in registers (the NHWC output of
// bf16/fp16 through a block-sized float buffer); the gradients of w, b are reduced over
// the batch in a fixed order (bit-identical across runs and thread counts).
//
// Backward (the same equations as the Triton kernels, kernels/group_norm.py):
//   v = u (1 + s) + sh, u = xhat w + b, xhat = (x - mean) rstd;  dv = dy * act'(v)
//   dsh_nc = sum_p dv, ds_nc = sum_p dv u, du = dv (1 + s), db_c = sum_np du, dw_c = sum_np du xhat
//   dx = rstd (w du - mean_g(w du) - xhat mean_g(w du xhat))
//
// The hot loops are plain float loops that the compiler vectorizes; on x86-64 they are compiled
// for AVX-512, AVX2 + FMA and the baseline and picked at the first call by what the CPU reports
// (or JDM_FAST_CPU_ISA: cpu_isa.h), so the extension still runs on any x86-64 CPU. SiLU uses a
// polynomial exp (relative error < 2e-7).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu_isa.h"

#if defined(__GNUC__)
#define JDM_INLINE __attribute__((always_inline)) inline
#else
#define JDM_INLINE inline
#endif

namespace jdm_fast {
namespace {

// exp(x), x clamped to [-87, 89]: 2^k e^f with k = round(x log2 e), f = x - k ln 2 in
// [-ln2/2, ln2/2], e^f by Cephes' degree-7 polynomial. Branch-free (selects, rounding by adding
// 1.5 * 2^23), so the loops over it vectorize; NaN still reaches the callers' results through
// their other operand. Above 88.7 it overflows to +inf (k = 128), so sigmoid(v < -89) is exactly
// 0: GCC evaluates the clamped branch as a constant for every lane and blends, and with a clamp
// at 88 that constant, 1 / (1 + e^88), was subnormal; a subnormal operand costs a microcode
// assist on Intel cores (the SiLU forward ran 4-5x slower there; AMD Zen showed no such cost).
JDM_INLINE float exp_approx(float x) {
  x = x < -87.0f ? -87.0f : x;  // branch-free once compiled with -fno-trapping-math (setup.py)
  x = x > 89.0f ? 89.0f : x;
  const float t = x * 1.44269504088896341f;
  const float k = (t + 12582912.0f) - 12582912.0f;  // round to nearest
  const float f = (x - k * 0.693145751953125f) - k * 1.428606765330187045e-06f;  // x - k ln2, split
  float p = 1.9875691500e-4f;
  p = p * f + 1.3981999507e-3f;
  p = p * f + 8.3334519073e-3f;
  p = p * f + 4.1665795894e-2f;
  p = p * f + 1.6666665459e-1f;
  p = p * f + 5.0000001201e-1f;
  p = p * f * f + f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) * 8388608;  // 2^k as float bits
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

JDM_INLINE float sigmoid(float v) { return 1.0f / (1.0f + exp_approx(-v)); }

// ----------------------------------------------------------------------- hot loops
// Each reads and writes the tensors' own dtype T (float, Half, BFloat16: converted in registers)
// and computes in float; sums are kept in 16 float lanes (or per-channel float accumulators)
// and combined in double.
template <typename T>
JDM_INLINE float f32(T v) {
  return static_cast<float>(v);
}

template <typename T>
JDM_INLINE void sum_impl(const T* __restrict x, int64_t n, double* out) {
  float acc[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int k = 0; k < 16; ++k) acc[k] += f32(x[i + k]);
  double s = 0;
  for (; i < n; ++i) s += f32(x[i]);
  for (int k = 0; k < 16; ++k) s += acc[k];
  *out = s;
}

template <typename T>
JDM_INLINE void sumsq_impl(const T* __restrict x, int64_t n, float mean, double* out) {
  float acc[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int k = 0; k < 16; ++k) {
      const float d = f32(x[i + k]) - mean;
      acc[k] += d * d;
    }
  double s = 0;
  for (; i < n; ++i) {
    const double d = f32(x[i]) - mean;
    s += d * d;
  }
  for (int k = 0; k < 16; ++k) s += acc[k];
  *out = s;
}

// Channels-last loops run over blocks of ``rpb`` rows of c channels (rpb * c >= 512 elements, see
// rows_per_block): per-channel vectors (factors, accumulators) come repeated rpb times, so each
// block is one long loop; with c = 32..128, one short loop per row spent more on loop entry and
// tails than on the arithmetic. Accumulators are folded back to c channels by fold_rows.
inline int64_t rows_per_block(int64_t c) { return std::max<int64_t>(1, (512 + c - 1) / c); }

// per-channel sums (and centred squares) into acc
template <typename T>
JDM_INLINE void add_rows_impl(const T* __restrict x, int64_t rows, int64_t c, float* __restrict acc, int64_t rpb) {
  for (int64_t r = 0; r < rows; r += rpb) {
    const int64_t n = std::min(rpb, rows - r) * c;
    const T* __restrict xr = x + r * c;
    for (int64_t j = 0; j < n; ++j) acc[j] += f32(xr[j]);
  }
}

template <typename T>
JDM_INLINE void add_sq_rows_impl(const T* __restrict x, int64_t rows, int64_t c, const float* __restrict mean,
                                 float* __restrict acc, int64_t rpb) {
  for (int64_t r = 0; r < rows; r += rpb) {
    const int64_t n = std::min(rpb, rows - r) * c;
    const T* __restrict xr = x + r * c;
    for (int64_t j = 0; j < n; ++j) {
      const float d = f32(xr[j]) - mean[j];
      acc[j] += d * d;
    }
  }
}

// y = act(a x + b): one NCHW row (scalar a, b) or channels-last rows (per-channel a, b)
template <typename T, bool ACT>
JDM_INLINE void affine_impl(const T* __restrict x, T* __restrict y, int64_t n, float a, float b) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = a * f32(x[i]) + b;
    y[i] = static_cast<T>(ACT ? v * sigmoid(v) : v);
  }
}

// Channels-last (blocks of rpb rows); bf16 / fp16 go through a float buffer (convert, activate,
// store: three loops that vectorize; one loop with the SiLU and a 16-bit store stayed slower).
template <typename T, bool ACT>
JDM_INLINE void affine_rows_impl(const T* __restrict x, T* __restrict y, int64_t rows, int64_t c,
                                 const float* __restrict a, const float* __restrict b, float* __restrict buf,
                                 int64_t rpb) {
  for (int64_t r = 0; r < rows; r += rpb) {
    const int64_t n = std::min(rpb, rows - r) * c;
    const T* __restrict xr = x + r * c;
    T* __restrict yr = y + r * c;
    if constexpr (std::is_same_v<T, float>) {
      for (int64_t j = 0; j < n; ++j) {
        const float v = a[j] * xr[j] + b[j];
        yr[j] = ACT ? v * sigmoid(v) : v;
      }
    } else {
      for (int64_t j = 0; j < n; ++j) buf[j] = a[j] * f32(xr[j]) + b[j];
      if (ACT)
        for (int64_t j = 0; j < n; ++j) buf[j] = buf[j] * sigmoid(buf[j]);
      for (int64_t j = 0; j < n; ++j) yr[j] = static_cast<T>(buf[j]);
    }
  }
}

// Backward pass 1: du, and the four sums dsh = sum dv, ds = sum dv u, db = sum du, dw = sum du xhat,
// per channel: over one NCHW row (16 float lanes, combined in double) or, channels-last, into
// per-channel accumulators a0..a3 one spatial row at a time.
struct BwdParams {  // per-channel vectors of the channels-last form
  const float* __restrict mean;
  const float* __restrict rstd;
  const float* __restrict w;
  const float* __restrict b;
  const float* __restrict s1;  // 1 + scale
  const float* __restrict sh;
};

template <bool ACT>
JDM_INLINE float dact(float v, float dy) {
  if (!ACT) return dy;
  const float sg = sigmoid(v);
  return dy * sg * (1.0f + v * (1.0f - sg));
}

template <typename T, bool ACT>
JDM_INLINE void bwd_row_impl(const T* __restrict x, const T* __restrict dy, float* __restrict du, int64_t n, float mean,
                             float rstd, float w, float b, float s1, float sh, double* sums) {
  float a0[16] = {0}, a1[16] = {0}, a2[16] = {0}, a3[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int k = 0; k < 16; ++k) {
      const float xhat = (f32(x[i + k]) - mean) * rstd;
      const float u = xhat * w + b;
      const float dv = dact<ACT>(u * s1 + sh, f32(dy[i + k]));
      const float d = dv * s1;
      du[i + k] = d;
      a0[k] += dv;
      a1[k] += dv * u;
      a2[k] += d;
      a3[k] += d * xhat;
    }
  double t[4] = {0, 0, 0, 0};
  for (; i < n; ++i) {
    const float xhat = (f32(x[i]) - mean) * rstd;
    const float u = xhat * w + b;
    const float dv = dact<ACT>(u * s1 + sh, f32(dy[i]));
    const float d = dv * s1;
    du[i] = d;
    t[0] += dv;
    t[1] += dv * u;
    t[2] += d;
    t[3] += d * xhat;
  }
  for (int k = 0; k < 16; ++k) {
    t[0] += a0[k];
    t[1] += a1[k];
    t[2] += a2[k];
    t[3] += a3[k];
  }
  for (int q = 0; q < 4; ++q) sums[q] += t[q];
}

template <typename T, bool ACT>
JDM_INLINE void bwd_rows_impl(const T* __restrict x, const T* __restrict dy, float* __restrict du, int64_t rows,
                              int64_t c, BwdParams p, float* __restrict a0, float* __restrict a1,
                              float* __restrict a2, float* __restrict a3) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < c; ++j) {
      const int64_t k = r * c + j;
      const float xhat = (f32(x[k]) - p.mean[j]) * p.rstd[j];
      const float u = xhat * p.w[j] + p.b[j];
      const float dv = dact<ACT>(u * p.s1[j] + p.sh[j], f32(dy[k]));
      const float d = dv * p.s1[j];
      du[k] = d;
      a0[j] += dv;
      a1[j] += dv * u;
      a2[j] += d;
      a3[j] += d * xhat;
    }
}

// Backward pass 2: dx = rstd (w du - m1 - xhat m2)
template <typename T>
JDM_INLINE void dx_row_impl(const T* __restrict x, const float* __restrict du, T* __restrict dx, int64_t n, float mean,
                            float rstd, float w, float m1, float m2) {
  for (int64_t i = 0; i < n; ++i) {
    const float xhat = (f32(x[i]) - mean) * rstd;
    dx[i] = static_cast<T>(rstd * (w * du[i] - m1 - xhat * m2));
  }
}

template <typename T>
JDM_INLINE void dx_rows_impl(const T* __restrict x, const float* __restrict du, T* __restrict dx, int64_t rows,
                             int64_t c, const float* __restrict mean, const float* __restrict rstd,
                             const float* __restrict w, const float* __restrict m1, const float* __restrict m2) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < c; ++j) {
      const int64_t k = r * c + j;
      const float xhat = (f32(x[k]) - mean[j]) * rstd[j];
      dx[k] = static_cast<T>(rstd[j] * (w[j] * du[k] - m1[j] - xhat * m2[j]));
    }
}

// the first c entries of v repeated rpb times (v has rpb * c entries)
inline void repeat_rows(std::vector<float>& v, int64_t c, int64_t rpb) {
  for (int64_t r = 1; r < rpb; ++r) std::copy(v.begin(), v.begin() + c, v.begin() + r * c);
}

// a block accumulator folded back to its first c entries: v[j] = sum_r v[r * c + j]
inline void fold_rows(std::vector<float>& v, int64_t c, int64_t rpb) {
  for (int64_t r = 1; r < rpb; ++r)
    for (int64_t j = 0; j < c; ++j) v[j] += v[r * c + j];
}

// The hot loops compiled three times, for AVX-512, AVX2 + FMA and the baseline, and picked once at
// the first call by cpu_isa() (x86-64 with GCC/Clang; elsewhere the baseline only).
template <typename T>
struct Kernels {
  void (*sum)(const T*, int64_t, double*);
  void (*sumsq)(const T*, int64_t, float, double*);
  void (*add_rows)(const T*, int64_t, int64_t, float*, int64_t);
  void (*add_sq_rows)(const T*, int64_t, int64_t, const float*, float*, int64_t);
  void (*affine)(const T*, T*, int64_t, float, float, bool);
  void (*affine_rows)(const T*, T*, int64_t, int64_t, const float*, const float*, bool, float*, int64_t);
  void (*bwd_row)(const T*, const T*, float*, int64_t, float, float, float, float, float, float, bool, double*);
  void (*bwd_rows)(const T*, const T*, float*, int64_t, int64_t, BwdParams, bool, float*, float*, float*, float*);
  void (*dx_row)(const T*, const float*, T*, int64_t, float, float, float, float, float);
  void (*dx_rows)(const T*, const float*, T*, int64_t, int64_t, const float*, const float*, const float*,
                  const float*, const float*);
};

#define JDM_KERNEL_SET(NAME, ATTR)                                                                              \
  namespace NAME {                                                                                              \
  template <typename T>                                                                                         \
  ATTR void sum(const T* x, int64_t n, double* o) {                                                             \
    sum_impl<T>(x, n, o);                                                                                       \
  }                                                                                                             \
  template <typename T>                                                                                         \
  ATTR void sumsq(const T* x, int64_t n, float m, double* o) {                                                  \
    sumsq_impl<T>(x, n, m, o);                                                                                  \
  }                                                                                                             \
  template <typename T>                                                                                         \
  ATTR void add_rows(const T* x, int64_t r, int64_t c, float* a, int64_t rpb) {                                 \
    add_rows_impl<T>(x, r, c, a, rpb);                                                                          \
  }                                                                                                             \
  template <typename T>                                                                                         \
  ATTR void add_sq_rows(const T* x, int64_t r, int64_t c, const float* m, float* a, int64_t rpb) {              \
    add_sq_rows_impl<T>(x, r, c, m, a, rpb);                                                                    \
  }                                                                                                             \
  template <typename T>                                                                                         \
  ATTR void affine(const T* x, T* y, int64_t n, float a, float b, bool act) {                                   \
    act ? affine_impl<T, true>(x, y, n, a, b) : affine_impl<T, false>(x, y, n, a, b);                           \
  }                                                                                                             \
  template <typename T>                                                                                         \
  ATTR void affine_rows(const T* x, T* y, int64_t r, int64_t c, const float* a, const float* b, bool act,       \
                        float* buf, int64_t rpb) {                                                              \
    act ? affine_rows_impl<T, true>(x, y, r, c, a, b, buf, rpb)                                                 \
        : affine_rows_impl<T, false>(x, y, r, c, a, b, buf, rpb);                                               \
  }                                                                                                             \
  template <typename T>                                                                                         \
  ATTR void bwd_row(const T* x, const T* dy, float* du, int64_t n, float m, float r, float w, float b, float s1, \
                    float sh, bool act, double* sums) {                                                         \
    act ? bwd_row_impl<T, true>(x, dy, du, n, m, r, w, b, s1, sh, sums)                                         \
        : bwd_row_impl<T, false>(x, dy, du, n, m, r, w, b, s1, sh, sums);                                       \
  }                                                                                                             \
  template <typename T>                                                                                         \
  ATTR void bwd_rows(const T* x, const T* dy, float* du, int64_t r, int64_t c, BwdParams p, bool act,           \
                     float* a0, float* a1, float* a2, float* a3) {                                              \
    act ? bwd_rows_impl<T, true>(x, dy, du, r, c, p, a0, a1, a2, a3)                                            \
        : bwd_rows_impl<T, false>(x, dy, du, r, c, p, a0, a1, a2, a3);                                          \
  }                                                                                                             \
  template <typename T>                                                                                         \
  ATTR void dx_row(const T* x, const float* du, T* dx, int64_t n, float m, float r, float w, float m1,          \
                   float m2) {                                                                                  \
    dx_row_impl<T>(x, du, dx, n, m, r, w, m1, m2);                                                              \
  }                                                                                                             \
  template <typename T>                                                                                         \
  ATTR void dx_rows(const T* x, const float* du, T* dx, int64_t rows, int64_t c, const float* m, const float* r, \
                    const float* w, const float* m1, const float* m2) {                                         \
    dx_rows_impl<T>(x, du, dx, rows, c, m, r, w, m1, m2);                                                       \
  }                                                                                                             \
  template <typename T>                                                                                         \
  const Kernels<T> table{sum<T>,     sumsq<T>,   add_rows<T>, add_sq_rows<T>, affine<T>,                        \
                         affine_rows<T>, bwd_row<T>, bwd_rows<T>, dx_row<T>,      dx_rows<T>};                  \
  }

JDM_KERNEL_SET(baseline, )
#ifdef JDM_X86_DISPATCH
JDM_KERNEL_SET(avx2, __attribute__((target("avx2,fma"))))
JDM_KERNEL_SET(avx512, __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma"))))
#endif

template <typename T>
const Kernels<T>& kernels() {
#ifdef JDM_X86_DISPATCH
  switch (cpu_isa()) {
    case Isa::kAvx512:
      return avx512::table<T>;
    case Isa::kAvx2:
      return avx2::table<T>;
    default:
      break;
  }
#endif
  return baseline::table<T>;
}

// ----------------------------------------------------------------------- argument handling
bool channels_last(const at::Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

void check_x(const char* op, const at::Tensor& x, int64_t groups) {
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": x must be (N, C, H, W), got shape ", x.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
                   op, ": x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast), op,
                    ": x must be contiguous or channels_last");
  TORCH_CHECK_VALUE(groups >= 1 && x.size(1) % groups == 0, op, ": num_channels=", x.size(1),
                    " must be divisible by num_groups=", groups);
}

// An optional per-channel (C,) or per-example (N, C) input as a float32 contiguous tensor, or
// `fill` broadcast when absent.
at::Tensor as_float(const c10::optional<at::Tensor>& t, at::IntArrayRef shape, float fill, const char* op,
                    const char* name) {
  if (!t.has_value()) return at::full(shape, fill, at::kFloat);
  TORCH_CHECK_VALUE(t->numel() == c10::multiply_integers(shape), op, ": ", name, " must have ",
                    c10::multiply_integers(shape), " elements, got shape ", t->sizes());
  return t->to(at::kFloat).reshape(shape).contiguous();
}

// ----------------------------------------------------------------------- forward
std::tuple<at::Tensor, at::Tensor, at::Tensor> gn_fwd_cpu(const at::Tensor& x,
                                                         const c10::optional<at::Tensor>& weight,
                                                         const c10::optional<at::Tensor>& bias,
                                                         const c10::optional<at::Tensor>& scale,
                                                         const c10::optional<at::Tensor>& shift,
                                                         int64_t groups, double eps, bool act) {
  const char* op = "jdm_fast::group_norm_silu_cpu";
  check_x(op, x, groups);
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3), CG = C / groups;
  const at::Tensor w = as_float(weight, {C}, 1.f, op, "weight"), b = as_float(bias, {C}, 0.f, op, "bias");
  at::Tensor s1 = as_float(scale, {N, C}, 0.f, op, "scale") + 1.0f;
  const at::Tensor sh = as_float(shift, {N, C}, 0.f, op, "shift");
  auto y = at::empty_like(x);  // keeps the layout
  auto mean = at::empty({N, groups}, x.options().dtype(at::kFloat));
  auto rstd = at::empty({N, groups}, x.options().dtype(at::kFloat));
  if (x.numel() == 0) return {y, mean, rstd};
  const float *wp = w.data_ptr<float>(), *bp = b.data_ptr<float>();
  const float *sp = s1.data_ptr<float>(), *hp = sh.data_ptr<float>();
  float *mp = mean.data_ptr<float>(), *rp = rstd.data_ptr<float>();
  const double count = static_cast<double>(CG * HW);
  const bool cl = channels_last(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gn_fwd_cpu", [&] {
    const Kernels<scalar_t>& K = kernels<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    if (!cl) {  // each (n, g) is one contiguous block of CG * HW elements
      at::parallel_for(0, N * groups, 1, [&](int64_t begin, int64_t end) {
        for (int64_t ng = begin; ng < end; ++ng) {
          const int64_t n = ng / groups, g = ng % groups, off = ng * CG * HW;
          double s, q;
          K.sum(xp + off, CG * HW, &s);
          const float m = static_cast<float>(s / count);
          K.sumsq(xp + off, CG * HW, m, &q);
          const float r = static_cast<float>(1.0 / std::sqrt(q / count + eps));
          mp[ng] = m;
          rp[ng] = r;
          for (int64_t cc = 0; cc < CG; ++cc) {
            const int64_t c = g * CG + cc;
            const float a = r * wp[c] * sp[n * C + c];
            const float bb = (bp[c] - m * r * wp[c]) * sp[n * C + c] + hp[n * C + c];
            K.affine(xp + off + cc * HW, yp + off + cc * HW, HW, a, bb, act);
          }
        }
      });
    } else {  // channels-last: example n is HW rows of C channels, in blocks of rpb rows
      at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
        const int64_t rpb = rows_per_block(C), L = rpb * C;
        std::vector<float> acc(L), mvec(L), a(L), bb(L), buf(L);
        for (int64_t n = begin; n < end; ++n) {
          const scalar_t* xn = xp + n * HW * C;
          std::fill(acc.begin(), acc.end(), 0.f);
          K.add_rows(xn, HW, C, acc.data(), rpb);
          fold_rows(acc, C, rpb);
          for (int64_t g = 0; g < groups; ++g) {
            double s = 0;
            for (int64_t cc = 0; cc < CG; ++cc) s += acc[g * CG + cc];
            mp[n * groups + g] = static_cast<float>(s / count);
            for (int64_t cc = 0; cc < CG; ++cc) mvec[g * CG + cc] = mp[n * groups + g];
          }
          repeat_rows(mvec, C, rpb);
          std::fill(acc.begin(), acc.end(), 0.f);
          K.add_sq_rows(xn, HW, C, mvec.data(), acc.data(), rpb);
          fold_rows(acc, C, rpb);
          for (int64_t g = 0; g < groups; ++g) {
            double q = 0;
            for (int64_t cc = 0; cc < CG; ++cc) q += acc[g * CG + cc];
            const float r = static_cast<float>(1.0 / std::sqrt(q / count + eps));
            rp[n * groups + g] = r;
            for (int64_t cc = 0; cc < CG; ++cc) {
              const int64_t c = g * CG + cc;
              a[c] = r * wp[c] * sp[n * C + c];
              bb[c] = (bp[c] - mvec[c] * r * wp[c]) * sp[n * C + c] + hp[n * C + c];
            }
          }
          repeat_rows(a, C, rpb);
          repeat_rows(bb, C, rpb);
          K.affine_rows(xn, yp + n * HW * C, HW, C, a.data(), bb.data(), act, buf.data(), rpb);
        }
      });
    }
  });
  return {y, mean, rstd};
}

// ----------------------------------------------------------------------- backward
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gn_bwd_cpu(
    const at::Tensor& dy_in, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& scale,
    const c10::optional<at::Tensor>& shift, const at::Tensor& mean, const at::Tensor& rstd, int64_t groups,
    bool act) {
  const char* op = "jdm_fast::group_norm_silu_cpu_backward";
  check_x(op, x, groups);
  TORCH_CHECK_VALUE(dy_in.sizes() == x.sizes(), op, ": dy must have x's shape ", x.sizes(), ", got ",
                    dy_in.sizes());
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3), CG = C / groups;
  TORCH_CHECK_VALUE(mean.numel() == N * groups && rstd.numel() == N * groups, op,
                    ": mean and rstd must have N * num_groups = ", N * groups, " elements");
  const bool cl = channels_last(x);
  const at::Tensor dy = dy_in.to(x.scalar_type()).contiguous(cl ? at::MemoryFormat::ChannelsLast
                                                                 : at::MemoryFormat::Contiguous);
  const at::Tensor w = as_float(weight, {C}, 1.f, op, "weight"), b = as_float(bias, {C}, 0.f, op, "bias");
  at::Tensor s1 = as_float(scale, {N, C}, 0.f, op, "scale") + 1.0f;
  const at::Tensor sh = as_float(shift, {N, C}, 0.f, op, "shift");
  const at::Tensor mf = mean.to(at::kFloat).contiguous(), rf = rstd.to(at::kFloat).contiguous();
  auto dx = at::empty_like(x);
  // per (n, c): dshift, dscale, and the db / dw partials reduced over n below in a fixed order
  auto dsh = at::zeros({N, C}, x.options().dtype(at::kFloat)), dsc = at::zeros({N, C}, dsh.options());
  auto dbp = at::zeros({N, C}, dsh.options()), dwp = at::zeros({N, C}, dsh.options());
  const float *wp = w.data_ptr<float>(), *bp = b.data_ptr<float>();
  const float *sp = s1.data_ptr<float>(), *hp = sh.data_ptr<float>();
  const float *mp = mf.data_ptr<float>(), *rp = rf.data_ptr<float>();
  float *o0 = dsh.data_ptr<float>(), *o1 = dsc.data_ptr<float>(), *o2 = dbp.data_ptr<float>(),
        *o3 = dwp.data_ptr<float>();
  const float count = static_cast<float>(CG * HW);
  if (x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gn_bwd_cpu", [&] {
      const Kernels<scalar_t>& K = kernels<scalar_t>();
      const scalar_t* xp = x.data_ptr<scalar_t>();
      const scalar_t* gp = dy.data_ptr<scalar_t>();
      scalar_t* dxp = dx.data_ptr<scalar_t>();
      if (!cl) {
        at::parallel_for(0, N * groups, 1, [&](int64_t begin, int64_t end) {
          std::vector<float> du(CG * HW);
          for (int64_t ng = begin; ng < end; ++ng) {
            const int64_t n = ng / groups, g = ng % groups, off = ng * CG * HW;
            const float m = mp[ng], r = rp[ng];
            double m1 = 0, m2 = 0;
            for (int64_t cc = 0; cc < CG; ++cc) {
              const int64_t c = g * CG + cc, k = n * C + c;
              double sums[4] = {0, 0, 0, 0};
              K.bwd_row(xp + off + cc * HW, gp + off + cc * HW, du.data() + cc * HW, HW, m, r, wp[c], bp[c], sp[k],
                        hp[k], act, sums);
              o0[k] = static_cast<float>(sums[0]);
              o1[k] = static_cast<float>(sums[1]);
              o2[k] = static_cast<float>(sums[2]);
              o3[k] = static_cast<float>(sums[3]);
              m1 += wp[c] * sums[2];
              m2 += wp[c] * sums[3];
            }
            const float fm1 = static_cast<float>(m1 / count), fm2 = static_cast<float>(m2 / count);
            for (int64_t cc = 0; cc < CG; ++cc) {
              const int64_t c = g * CG + cc;
              K.dx_row(xp + off + cc * HW, du.data() + cc * HW, dxp + off + cc * HW, HW, m, r, wp[c], fm1, fm2);
            }
          }
        });
      } else {
        at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
          std::vector<float> du(HW * C);
          std::vector<float> mv(C), rv(C), s1v(C), shv(C), a0(C), a1(C), a2(C), a3(C), m1v(C), m2v(C);
          for (int64_t n = begin; n < end; ++n) {
            const int64_t off = n * HW * C;
            for (int64_t c = 0; c < C; ++c) {
              mv[c] = mp[n * groups + c / CG];
              rv[c] = rp[n * groups + c / CG];
              s1v[c] = sp[n * C + c];
              shv[c] = hp[n * C + c];
            }
            std::fill(a0.begin(), a0.end(), 0.f);
            std::fill(a1.begin(), a1.end(), 0.f);
            std::fill(a2.begin(), a2.end(), 0.f);
            std::fill(a3.begin(), a3.end(), 0.f);
            const BwdParams p{mv.data(), rv.data(), wp, bp, s1v.data(), shv.data()};
            K.bwd_rows(xp + off, gp + off, du.data(), HW, C, p, act, a0.data(), a1.data(), a2.data(), a3.data());
            for (int64_t g = 0; g < groups; ++g) {
              double m1 = 0, m2 = 0;
              for (int64_t cc = 0; cc < CG; ++cc) {
                const int64_t c = g * CG + cc;
                m1 += static_cast<double>(wp[c]) * a2[c];
                m2 += static_cast<double>(wp[c]) * a3[c];
              }
              for (int64_t cc = 0; cc < CG; ++cc) {
                m1v[g * CG + cc] = static_cast<float>(m1 / count);
                m2v[g * CG + cc] = static_cast<float>(m2 / count);
              }
            }
            for (int64_t c = 0; c < C; ++c) {
              o0[n * C + c] = a0[c];
              o1[n * C + c] = a1[c];
              o2[n * C + c] = a2[c];
              o3[n * C + c] = a3[c];
            }
            K.dx_rows(xp + off, du.data(), dxp + off, HW, C, mv.data(), rv.data(), wp, m1v.data(), m2v.data());
          }
        });
      }
    });
  }
  auto empty = x.new_empty({0});
  auto like = [&](const c10::optional<at::Tensor>& t, const at::Tensor& g) {
    return t.has_value() ? g.to(t->scalar_type()).reshape(t->sizes()) : empty;
  };
  return {dx, like(weight, dwp.sum(0)), like(bias, dbp.sum(0)), like(scale, dsc), like(shift, dsh)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(jdm_fast, m) {
  m.def(
      "group_norm_silu_cpu(Tensor x, Tensor? weight, Tensor? bias, Tensor? scale, Tensor? shift, "
      "int num_groups, float eps, bool act) -> (Tensor, Tensor, Tensor)");
  m.def(
      "group_norm_silu_cpu_backward(Tensor dy, Tensor x, Tensor? weight, Tensor? bias, Tensor? scale, "
      "Tensor? shift, Tensor mean, Tensor rstd, int num_groups, bool act) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // the ISA the C++ CPU kernels run (cpu_isa.h): "avx512", "avx2" or "baseline"
  m.def("cpu_kernel_isa() -> str", [] { return std::string(isa_name(cpu_isa())); });
}

TORCH_LIBRARY_IMPL(jdm_fast, CPU, m) {
  m.impl("group_norm_silu_cpu", &gn_fwd_cpu);
  m.impl("group_norm_silu_cpu_backward", &gn_bwd_cpu);
}

}  // namespace jdm_fast
