// The arithmetic of one reverse-process step, shared by the CPU (.cpp) and CUDA (.cu) kernels of
// jdm_fast._C, so both backends compute the same thing by construction.
//
// No torch headers: this file is included by nvcc-compiled code.
//
// Every step reads, per example, five float32 coefficients computed in float64 from that
// example's timestep(s), and per element
//     x0  = recip * x - recipm1 * eps          (clamped to [-1, 1] when clip_denoised; the clamp
//                                               stays with each backend's loop, see clamp1)
//     out = Rule::out(c, x, eps, x0, clipped, z)
// Ancestral (posterior mean + sigma z):  out = coef1 * x0 + coef2 * x + sigma * z.
// DDIM:  out = sqrt(abar_prev) * x0 + dir * eps' + sigma * z, with eps' re-derived from the
//        clamped x0 when clipped (eps' = (recip * x - x0) / recipm1), eps otherwise.
#pragma once

#include <cmath>
#include <cstdint>

#include "philox.h"  // JDM_HD

namespace jdm_fast {

struct StepCoef {
  float recip, recipm1, a, b, sigma;  // a, b: coef1, coef2 (ancestral) or sqrt(abar_prev), dir (DDIM)
};

// t: the example's timestep (no noise at t = 0); log_var: that step's log posterior variance.
JDM_HD StepCoef ancestral_coef(double recip, double recipm1, double coef1, double coef2,
                               double log_var, int64_t t) {
  StepCoef c;
  c.recip = static_cast<float>(recip);
  c.recipm1 = static_cast<float>(recipm1);
  c.a = static_cast<float>(coef1);
  c.b = static_cast<float>(coef2);
  c.sigma = t > 0 ? static_cast<float>(exp(0.5 * log_var)) : 0.f;
  return c;
}

// abar, abar_prev: alphas_cumprod at t and t_prev (1 for the final step, t_prev = -1).
JDM_HD StepCoef ddim_coef(double abar, double abar_prev, double eta) {
  const double sigma =
      eta * sqrt(fmax(0.0, (1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev)));
  StepCoef c;
  c.recip = static_cast<float>(1.0 / sqrt(abar));
  c.recipm1 = static_cast<float>(sqrt(1.0 / abar - 1.0));
  c.a = static_cast<float>(sqrt(abar_prev));
  c.b = static_cast<float>(sqrt(fmax(0.0, 1.0 - abar_prev - sigma * sigma)));
  c.sigma = static_cast<float>(sigma);
  return c;
}

struct AncestralRule {
  static JDM_HD float out(const StepCoef& c, float x, float /*eps*/, float x0, bool /*clipped*/,
                          float z) {
    return c.a * x0 + c.b * x + c.sigma * z;
  }
};

struct DdimRule {
  static JDM_HD float out(const StepCoef& c, float x, float eps, float x0, bool clipped, float z) {
    const float e = clipped ? (c.recip * x - x0) / c.recipm1 : eps;
    return c.a * x0 + c.b * e + c.sigma * z;
  }
};

}  // namespace jdm_fast
