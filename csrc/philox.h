// Counter-based Gaussian noise shared by the CPU (.cpp) and CUDA (.cu) kernels of jdm_fast._C.
//
// No torch headers: this file is included by nvcc-compiled code.
//
// The stream (documented in jdm_fast/ops/philox.py, whose NumPy code is the reference):
//   element g of the stream for a 64-bit seed (g = offset + i for element i of a flattened batch)
//     block  = g / 4, lane = g % 4
//     (r0, r1, r2, r3) = Philox4x32-10(counter = (lo32(block), hi32(block), 0, 0),
//                                      key     = (lo32(seed),  hi32(seed)))
//     pair (r0, r1) gives lanes 0 and 1, pair (r2, r3) lanes 2 and 3, by Box-Muller in float64:
//       u1 = (ra + 0.5) * 2^-32  (in (0, 1)),  u2 = rb * 2^-32  (in [0, 1))
//       rad = sqrt(-2 ln u1),  z_even = rad * cos(2 pi u2),  z_odd = rad * sin(2 pi u2)
//     and the value is rounded to float32.
// So the noise of element i depends only on (seed, offset + i): any slice of a global batch can
// be drawn on its own, on either device.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define JDM_HD __host__ __device__ __forceinline__
#define JDM_UNROLL _Pragma("unroll")
#else
#define JDM_HD inline
#define JDM_UNROLL
#endif

namespace jdm_fast {

struct Philox4 {
  uint32_t x[4];
};

JDM_HD uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
#if defined(__CUDA_ARCH__)
  *hi = __umulhi(a, b);
  return a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
#endif
}

// Philox4x32 with 10 rounds (Salmon et al., SC'11; Random123's philox4x32_10): multipliers and
// Weyl key increments (also read by the AVX-512 counter_uniform in noise_ops.cpp).
constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;

JDM_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                             uint32_t k1) {
JDM_UNROLL
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(kPhiloxM0, c0, &hi0);
    const uint32_t lo1 = mulhilo32(kPhiloxM1, c2, &hi1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// The four normals of stream block `block` (lanes 0..3) for `seed`.
JDM_HD void philox_normal4(uint64_t seed, uint64_t block, float out[4]) {
  const Philox4 r = philox4x32_10(static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32),
                                  0u, 0u, static_cast<uint32_t>(seed),
                                  static_cast<uint32_t>(seed >> 32));
  constexpr double kTwoPi = 6.283185307179586476925286766559;
  constexpr double kInv32 = 2.3283064365386962890625e-10;  // 2^-32
JDM_UNROLL
  for (int p = 0; p < 2; ++p) {
    const double u1 = (static_cast<double>(r.x[2 * p]) + 0.5) * kInv32;
    const double u2 = static_cast<double>(r.x[2 * p + 1]) * kInv32;
    const double rad = sqrt(-2.0 * log(u1));
    const double theta = kTwoPi * u2;
    out[2 * p] = static_cast<float>(rad * cos(theta));
    out[2 * p + 1] = static_cast<float>(rad * sin(theta));
  }
}

}  // namespace jdm_fast

namespace jdm_fast {

// Counter-based draws keyed by (seed, global example index g, tag), documented with their NumPy
// reference in jdm_fast/ops/philox.py. Counter word 2 holds a tag that keeps these streams apart
// from each other and from the Gaussian stream above (word 2 = 0).
constexpr uint32_t kTimestepTag = 0x54494D45u;  // "TIME"

// Timestep of global example g: ((r0 << 32) | r1) mod T of Philox at counter (g, TIME, 0).
JDM_HD int64_t counter_timestep(uint64_t seed, uint64_t g, uint64_t T) {
  const Philox4 r = philox4x32_10(static_cast<uint32_t>(g), static_cast<uint32_t>(g >> 32),
                                  kTimestepTag, 0u, static_cast<uint32_t>(seed),
                                  static_cast<uint32_t>(seed >> 32));
  return static_cast<int64_t>(((static_cast<uint64_t>(r.x[0]) << 32) | r.x[1]) % T);
}

constexpr float kUniform24 = 5.9604644775390625e-08f;  // 2^-24: the top 24 bits of a word as [0, 1)

// Uniforms (float32 in [0, 1), multiples of 2^-24) of row g, columns 4q .. 4q + 3, for `tag`:
// lane k of Philox at counter (g, tag, q), top 24 bits.
JDM_HD void counter_uniform4(uint64_t seed, uint64_t g, uint32_t tag, uint32_t q, float out[4]) {
  const Philox4 r = philox4x32_10(static_cast<uint32_t>(g), static_cast<uint32_t>(g >> 32), tag,
                                  q, static_cast<uint32_t>(seed),
                                  static_cast<uint32_t>(seed >> 32));
JDM_UNROLL
  for (int k = 0; k < 4; ++k) out[k] = static_cast<float>(r.x[k] >> 8) * kUniform24;
}

}  // namespace jdm_fast
