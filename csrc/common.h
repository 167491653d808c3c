// Shared definitions for the CPU and CUDA kernels: dtype codes, per-example coefficients.
#pragma once

#include <cstdint>

#include "philox.h"

namespace ul_fast {

// Element types as passed from Python (ul_fast/kernels/extension_ops.py: _DTYPE_CODES). The kernels compute
// on the three float types; int64 is the seed, int32 the debug Philox words.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kInt64 = 3, kInt32 = 4 };

// Per-example noise coefficients alpha = sqrt(sigmoid(l)), sigma = sqrt(sigmoid(-l)) in fp32, computed
// as the reference does (sigmoid as 1 / (1 + exp(-x)), then sqrt).
UL_HD void alpha_sigma(float logsnr, float* alpha, float* sigma) {
#if defined(__CUDA_ARCH__)
  *alpha = __fsqrt_rn(__fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-logsnr))));
  *sigma = __fsqrt_rn(__fdiv_rn(1.0f, __fadd_rn(1.0f, expf(logsnr))));
#else
  *alpha = std::sqrt(1.0f / (1.0f + std::exp(-logsnr)));
  *sigma = std::sqrt(1.0f / (1.0f + std::exp(logsnr)));
#endif
}

// Loss scale 0.5 * (-dl/dt) * w(l), w = 1 (ELBO, has_bias false) or loss_factor * sigmoid(bias - l).
UL_HD float loss_scale(float logsnr, float neg_dlogsnr_dt, bool has_bias, float loss_factor, float bias) {
#if defined(__CUDA_ARCH__)
  float weight = 1.0f;
  if (has_bias) {
    weight = __fmul_rn(loss_factor, __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-__fsub_rn(bias, logsnr)))));
  }
  return __fmul_rn(__fmul_rn(0.5f, neg_dlogsnr_dt), weight);
#else
  float weight = 1.0f;
  if (has_bias) weight = loss_factor * (1.0f / (1.0f + std::exp(-(bias - logsnr))));
  return (0.5f * neg_dlogsnr_dt) * weight;
#endif
}

// SiLU and its derivative in fp32.
UL_HD float sigmoidf_(float h) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-h)));
#else
  return 1.0f / (1.0f + std::exp(-h));
#endif
}

}  // namespace ul_fast
