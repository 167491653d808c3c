// Counter-based Gaussian noise shared by the CPU (C++) and CUDA kernels.
//
// This is the C++ twin of ul_fast/ops/philox.py, which is the specification:
//   element n -> group g = n / 4, lane n % 4;
//   Philox4x32-10 with counter (g mod 2^32, g >> 32, 0, 0) and key (seed mod 2^32, seed >> 32)
//   gives words r0..r3; u_i = ((r_i >> 8) + 0.5f) * 2^-24 in fp32;
//   Box-Muller in fp32: rho = sqrt(-2 ln u0), theta = 2pi_f32 * u1 -> lanes 0, 1 = rho cos, rho sin;
//   lanes 2, 3 likewise from u2, u3.
// The integer words are bitwise identical on every backend; the normals differ only by the last-ulp
// behaviour of log/sin/cos in libm versus CUDA's libdevice. Every fp32 operation is written so it cannot
// be contracted into an FMA (the spec rounds after each multiply and add).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define UL_HD __host__ __device__ __forceinline__
#else
#include <cmath>
#define UL_HD inline
#endif

namespace ul_fast {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr float kTwoPiF32 = 6.2831854820251465f;  // float32(2*pi), as in philox.py
constexpr float kTwoPow24Inv = 5.9604644775390625e-08f;  // 2^-24

struct Words4 {
  uint32_t r0, r1, r2, r3;
};

UL_HD uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
#if defined(__CUDA_ARCH__)
  *hi = __umulhi(a, b);
  return a * b;
#else
  const uint64_t product = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(product >> 32);
  return static_cast<uint32_t>(product);
#endif
}

// Philox4x32-10 for group index g under a 64-bit seed (the bit pattern of the int64 seed).
UL_HD Words4 philox4x32_10(uint64_t group, uint64_t seed) {
  uint32_t c0 = static_cast<uint32_t>(group);
  uint32_t c1 = static_cast<uint32_t>(group >> 32);
  uint32_t c2 = 0u, c3 = 0u;
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    if (round) {
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
  return Words4{c0, c1, c2, c3};
}

// ((r >> 8) + 0.5) * 2^-24 in fp32. (r >> 8) converts exactly; the add rounds for r >> 8 >= 2^23
// exactly as the fp32 reference does, so u lies in (0, 1].
UL_HD float uint32_to_unit_float(uint32_t word) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(__fadd_rn(static_cast<float>(word >> 8), 0.5f), kTwoPow24Inv);
#else
  return (static_cast<float>(word >> 8) + 0.5f) * kTwoPow24Inv;
#endif
}

// One Box-Muller pair from two uniforms: out[0] = rho cos(theta), out[1] = rho sin(theta).
UL_HD void box_muller(float u_radius, float u_angle, float* out) {
#if defined(__CUDA_ARCH__)
  const float rho = __fsqrt_rn(__fmul_rn(-2.0f, logf(u_radius)));
  const float theta = __fmul_rn(kTwoPiF32, u_angle);
  float s, c;
  sincosf(theta, &s, &c);
  out[0] = __fmul_rn(rho, c);
  out[1] = __fmul_rn(rho, s);
#else
  const float rho = std::sqrt(-2.0f * std::log(u_radius));
  const float theta = kTwoPiF32 * u_angle;
  out[0] = rho * std::cos(theta);
  out[1] = rho * std::sin(theta);
#endif
}

// The four standard normals of group g: elements 4g .. 4g+3.
UL_HD void philox_normal4(uint64_t group, uint64_t seed, float* out) {
  const Words4 w = philox4x32_10(group, seed);
  box_muller(uint32_to_unit_float(w.r0), uint32_to_unit_float(w.r1), out);
  box_muller(uint32_to_unit_float(w.r2), uint32_to_unit_float(w.r3), out + 2);
}

}  // namespace ul_fast
