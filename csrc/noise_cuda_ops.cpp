// CUDA registrations of the noise-schedule ops: argument checks, output allocation and launches
// of the kernels in noise_cuda.cu on the current stream. Compiled only when the build has CUDA
// (setup.py defines JDM_FAST_WITH_CUDA). Timestep ranges are asserted on the device (no sync).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "noise_common.h"
#include "noise_kernels.h"

namespace jdm_fast {
namespace {

namespace k = jdm_fast::cuda;

int dtype_code(at::ScalarType s) {
  switch (s) {
    case at::kFloat:
      return k::kF32;
    case at::kHalf:
      return k::kF16;
    case at::kBFloat16:
      return k::kBF16;
    default:
      TORCH_CHECK_TYPE(false, "jdm_fast: unsupported dtype ", s);
  }
}

k::Launch launch_config() {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  return k::Launch{sms * 8, c10::cuda::getCurrentCUDAStream().stream()};
}

void check(int err) { C10_CUDA_CHECK(static_cast<cudaError_t>(err)); }

// All tables of one op in one dtype (float64 if any is), contiguous.
at::ScalarType table_dtype(std::initializer_list<const at::Tensor*> tabs) {
  for (const auto* t : tabs) {
    if (t->scalar_type() == at::kDouble) return at::kDouble;
  }
  return at::kFloat;
}

k::Table table(const at::Tensor& t) { return k::Table{t.data_ptr(), t.scalar_type() == at::kDouble}; }

at::Tensor q_sample_cuda(const at::Tensor& x0_in, const at::Tensor& t_in, const at::Tensor& a_in,
                         const at::Tensor& b_in, const at::Tensor& noise_in) {
  const char* op = "jdm_fast::q_sample";
  const int64_t T = check_q_sample_args(op, x0_in, t_in, a_in, b_in);
  check_like(op, "noise", noise_in, "x0", x0_in);
  c10::cuda::CUDAGuard guard(x0_in.device());
  const auto td = table_dtype({&a_in, &b_in});
  const auto x0 = x0_in.contiguous(), noise = noise_in.contiguous(), t = t_in.contiguous();
  const auto a = a_in.to(td).contiguous(), b = b_in.to(td).contiguous();
  auto out = at::empty_like(x0, at::MemoryFormat::Contiguous);
  if (x0.numel() == 0) return out;
  check(k::q_sample(launch_config(), dtype_code(x0.scalar_type()), x0.data_ptr(), noise.data_ptr(),
                    out.data_ptr(), t.data_ptr<int64_t>(), table(a), table(b), T, x0.numel(),
                    per_example(x0)));
  return out;
}

// The keyed form passes the device pointer of `first_example` (its value never reaches the host).
std::tuple<at::Tensor, at::Tensor> q_sample_philox_impl(const char* op, const at::Tensor& x0_in,
                                                        const at::Tensor& t_in,
                                                        const at::Tensor& a_in,
                                                        const at::Tensor& b_in, int64_t seed,
                                                        int64_t offset,
                                                        const at::Tensor* first_example) {
  const int64_t T = check_q_sample_args(op, x0_in, t_in, a_in, b_in);
  c10::cuda::CUDAGuard guard(x0_in.device());
  const auto td = table_dtype({&a_in, &b_in});
  const auto x0 = x0_in.contiguous(), t = t_in.contiguous();
  const auto a = a_in.to(td).contiguous(), b = b_in.to(td).contiguous();
  auto out = at::empty_like(x0, at::MemoryFormat::Contiguous);
  auto noise = at::empty_like(x0, at::MemoryFormat::Contiguous);
  if (x0.numel() == 0) return {out, noise};
  check(k::q_sample_philox(launch_config(), dtype_code(x0.scalar_type()), x0.data_ptr(),
                           out.data_ptr(), noise.data_ptr(), t.data_ptr<int64_t>(), table(a),
                           table(b), T, x0.numel(), per_example(x0), static_cast<uint64_t>(seed),
                           static_cast<uint64_t>(offset),
                           first_example ? first_example->data_ptr<int64_t>() : nullptr));
  return {out, noise};
}

std::tuple<at::Tensor, at::Tensor> q_sample_philox_cuda(const at::Tensor& x0, const at::Tensor& t,
                                                        const at::Tensor& a, const at::Tensor& b,
                                                        int64_t seed, int64_t offset) {
  const char* op = "jdm_fast::q_sample_philox";
  check_offset(op, offset);
  return q_sample_philox_impl(op, x0, t, a, b, seed, offset, nullptr);
}

std::tuple<at::Tensor, at::Tensor> q_sample_keyed_cuda(const at::Tensor& x0, const at::Tensor& t,
                                                       const at::Tensor& a, const at::Tensor& b,
                                                       int64_t seed, const at::Tensor& first_example) {
  const char* op = "jdm_fast::q_sample_keyed";
  check_first_example(op, first_example, x0.device());
  return q_sample_philox_impl(op, x0, t, a, b, seed, 0, &first_example);
}

at::Tensor counter_timesteps_cuda(const at::Tensor& first_example, int64_t seed, int64_t n,
                                  int64_t num_timesteps) {
  const char* op = "jdm_fast::counter_timesteps";
  check_counter_args(op, first_example, n, num_timesteps, "num_timesteps");
  c10::cuda::CUDAGuard guard(first_example.device());
  auto out = at::empty({n}, first_example.options());
  if (n == 0) return out;
  check(k::counter_timesteps(launch_config(), first_example.data_ptr<int64_t>(),
                             static_cast<uint64_t>(seed), n, num_timesteps, out.data_ptr<int64_t>()));
  return out;
}

at::Tensor counter_uniform_cuda(const at::Tensor& first_example, int64_t seed, int64_t tag, int64_t n,
                                int64_t width) {
  const char* op = "jdm_fast::counter_uniform";
  check_counter_args(op, first_example, n, width, "width");
  check_tag(op, tag);
  c10::cuda::CUDAGuard guard(first_example.device());
  auto out = at::empty({n, width}, first_example.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  check(k::counter_uniform(launch_config(), first_example.data_ptr<int64_t>(),
                           static_cast<uint64_t>(seed), static_cast<uint32_t>(tag), n, width,
                           out.data_ptr<float>()));
  return out;
}

at::Tensor eps_mse_cuda(const at::Tensor& eps_in, const at::Tensor& noise_in) {
  const char* op = "jdm_fast::eps_mse";
  check_mse_args(op, eps_in, noise_in);
  c10::cuda::CUDAGuard guard(eps_in.device());
  const auto eps = eps_in.contiguous(), noise = noise_in.contiguous();
  auto out = at::empty({}, eps.options().dtype(at::kFloat));
  const int64_t n = eps.numel();
  if (n == 0) return out.fill_(std::nan(""));
  auto partials = at::empty({k::eps_mse_num_partials(n)}, eps.options().dtype(at::kFloat));
  check(k::eps_mse(launch_config(), dtype_code(eps.scalar_type()),
                   noise.scalar_type() != eps.scalar_type(), eps.data_ptr(), noise.data_ptr(), n,
                   partials.data_ptr<float>(), out.data_ptr<float>()));
  return out;
}

at::Tensor eps_mse_backward_cuda(const at::Tensor& grad_in, const at::Tensor& eps_in,
                                 const at::Tensor& noise_in) {
  const char* op = "jdm_fast::eps_mse_backward";
  check_mse_args(op, eps_in, noise_in);
  TORCH_CHECK_VALUE(grad_in.numel() == 1, op, ": grad must be a scalar, got shape ", grad_in.sizes());
  TORCH_CHECK_VALUE(grad_in.device() == eps_in.device(), op, ": grad is on ", grad_in.device(),
                    " but eps_hat is on ", eps_in.device());
  c10::cuda::CUDAGuard guard(eps_in.device());
  const auto eps = eps_in.contiguous(), noise = noise_in.contiguous();
  const auto grad = grad_in.to(at::kFloat).contiguous();
  auto out = at::empty_like(eps, at::MemoryFormat::Contiguous);
  if (eps.numel() == 0) return out;
  check(k::eps_mse_backward(launch_config(), dtype_code(eps.scalar_type()),
                            noise.scalar_type() != eps.scalar_type(), grad.data_ptr<float>(),
                            eps.data_ptr(), noise.data_ptr(), out.data_ptr(), eps.numel()));
  return out;
}

at::Tensor ancestral_step_cuda(const at::Tensor& x_in, const at::Tensor& eps_in,
                               const at::Tensor& t_in, const at::Tensor& r_in,
                               const at::Tensor& rm_in, const at::Tensor& c1_in,
                               const at::Tensor& c2_in, const at::Tensor& lv_in,
                               bool clip_denoised, const c10::optional<at::Tensor>& noise_in,
                               c10::optional<int64_t> seed, int64_t offset) {
  const char* op = "jdm_fast::ancestral_step";
  const int64_t T = check_ancestral_args(op, x_in, eps_in, t_in, r_in, rm_in, c1_in, c2_in, lv_in);
  const int mode = check_step_noise(op, noise_in, seed, offset, x_in);
  c10::cuda::CUDAGuard guard(x_in.device());
  const auto td = table_dtype({&r_in, &rm_in, &c1_in, &c2_in, &lv_in});
  const auto r = r_in.to(td).contiguous(), rm = rm_in.to(td).contiguous(),
             c1 = c1_in.to(td).contiguous(), c2 = c2_in.to(td).contiguous(),
             lv = lv_in.to(td).contiguous();
  const auto x = x_in.contiguous(), eps = eps_in.contiguous(), t = t_in.contiguous();
  const at::Tensor noise = mode == k::kNoiseTensor ? noise_in->contiguous() : at::Tensor();
  auto out = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return out;
  check(k::ancestral_step(launch_config(), dtype_code(x.scalar_type()), x.data_ptr(),
                          eps.data_ptr(), mode, noise.defined() ? noise.data_ptr() : nullptr,
                          static_cast<uint64_t>(seed.value_or(0)), static_cast<uint64_t>(offset),
                          out.data_ptr(), t.data_ptr<int64_t>(),
                          k::AncestralTables{table(r), table(rm), table(c1), table(c2), table(lv)},
                          T, clip_denoised, x.numel(), per_example(x)));
  return out;
}

at::Tensor ddim_step_cuda(const at::Tensor& x_in, const at::Tensor& eps_in, const at::Tensor& t_in,
                          const at::Tensor& tprev_in, const at::Tensor& abar_in, double eta,
                          bool clip_denoised, const c10::optional<at::Tensor>& noise_in,
                          c10::optional<int64_t> seed, int64_t offset) {
  const char* op = "jdm_fast::ddim_step";
  const int64_t T = check_ddim_args(op, x_in, eps_in, t_in, tprev_in, abar_in, eta);
  const int mode = check_step_noise(op, noise_in, seed, offset, x_in);
  c10::cuda::CUDAGuard guard(x_in.device());
  const auto abar = abar_in.contiguous();
  const auto x = x_in.contiguous(), eps = eps_in.contiguous(), t = t_in.contiguous(),
             tprev = tprev_in.contiguous();
  const at::Tensor noise = mode == k::kNoiseTensor ? noise_in->contiguous() : at::Tensor();
  auto out = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return out;
  check(k::ddim_step(launch_config(), dtype_code(x.scalar_type()), x.data_ptr(), eps.data_ptr(),
                     mode, noise.defined() ? noise.data_ptr() : nullptr,
                     static_cast<uint64_t>(seed.value_or(0)), static_cast<uint64_t>(offset),
                     out.data_ptr(), t.data_ptr<int64_t>(), tprev.data_ptr<int64_t>(), table(abar),
                     T, eta, clip_denoised, x.numel(), per_example(x)));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(jdm_fast, CUDA, m) {
  m.impl("q_sample", &q_sample_cuda);
  m.impl("q_sample_philox", &q_sample_philox_cuda);
  m.impl("q_sample_keyed", &q_sample_keyed_cuda);
  m.impl("counter_timesteps", &counter_timesteps_cuda);
  m.impl("counter_uniform", &counter_uniform_cuda);
  m.impl("eps_mse", &eps_mse_cuda);
  m.impl("eps_mse_backward", &eps_mse_backward_cuda);
  m.impl("ancestral_step", &ancestral_step_cuda);
  m.impl("ddim_step", &ddim_step_cuda);
}

}  // namespace jdm_fast
