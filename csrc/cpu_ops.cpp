// CPU kernels (C++17, OpenMP). Compiled with -ffp-contract=off so every fp32 multiply and add rounds
// separately, as in the PyTorch reference; work is split into fixed chunks (independent of the thread
// count) so results are deterministic.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.h"
#include "ops.h"

namespace ul_fast {
namespace {

// ---- 16-bit float storage on the host (bit-exact with PyTorch's conversions) ----
struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

inline float bits_to_float(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}
inline uint32_t float_to_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

inline float to_float(float value) { return value; }
inline float to_float(BFloat16 value) { return bits_to_float(static_cast<uint32_t>(value.bits) << 16); }
inline float to_float(Half value) {
  // IEEE half -> float (same algorithm as c10's fp16_ieee_to_fp32_value).
  const uint32_t w = static_cast<uint32_t>(value.bits) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = bits_to_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t result =
      sign | (two_w < (1u << 27) ? float_to_bits(denormalized) : float_to_bits(normalized));
  return bits_to_float(result);
}

template <typename T>
inline T from_float(float value);
template <>
inline float from_float<float>(float value) {
  return value;
}
template <>
inline BFloat16 from_float<BFloat16>(float value) {
  if (std::isnan(value)) return BFloat16{0x7FC0};
  const uint32_t bits = float_to_bits(value);
  const uint32_t rounding_bias = 0x7FFFu + ((bits >> 16) & 1u);  // round to nearest even
  return BFloat16{static_cast<uint16_t>((bits + rounding_bias) >> 16)};
}
template <>
inline Half from_float<Half>(float value) {
  // float -> IEEE half, round to nearest even (c10's fp16_ieee_from_fp32_value).
  float base = (std::fabs(value) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = float_to_bits(value);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = bits_to_float((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = float_to_bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return Half{static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign))};
}

template <typename F>
void dispatch_dtype(int dtype, F&& body) {
  switch (dtype) {
    case kFloat32: body(float{}); break;
    case kFloat16: body(Half{}); break;
    case kBFloat16: body(BFloat16{}); break;
    default: throw std::invalid_argument("ul_fast._C: unknown dtype code " + std::to_string(dtype));
  }
}

constexpr int64_t kChunk = 8192;  // elements per parallel task; a multiple of 4 (one Philox group)
// Below this many elements (or multiply-adds for the embedding) a parallel region costs more than it saves.
constexpr int64_t kParallelMin = 1 << 16;

// Walks elements [begin, end) of the flat noise stream, one Philox call per group of four.
struct NormalStream {
  uint64_t seed;
  int64_t group = -1;
  float normals[4];
  float at(int64_t n) {
    if ((n >> 2) != group) {
      group = n >> 2;
      philox_normal4(static_cast<uint64_t>(group), seed, normals);
    }
    return normals[n & 3];
  }
};

void per_example_alpha_sigma(const float* logsnr, int64_t batch, std::vector<float>& alpha,
                             std::vector<float>& sigma) {
  alpha.resize(batch);
  sigma.resize(batch);
  for (int64_t b = 0; b < batch; ++b) alpha_sigma(logsnr[b], &alpha[b], &sigma[b]);
}

}  // namespace

void noise_inject_cpu(const NoiseArgs& a, int threads) {
  if (a.numel == 0) return;
  std::vector<float> alpha, sigma;
  per_example_alpha_sigma(a.logsnr, a.batch, alpha, sigma);
  const int64_t per = a.numel / a.batch;
  const int64_t tasks = (a.numel + kChunk - 1) / kChunk;
  const uint64_t seed = static_cast<uint64_t>(a.seed[0]);
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* x = static_cast<const T*>(a.x);
    T* z = static_cast<T*>(a.z);
    T* eps = static_cast<T*>(a.eps);
#pragma omp parallel for num_threads(threads) schedule(static) if (a.numel >= kParallelMin)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t begin = task * kChunk, end = std::min(begin + kChunk, a.numel);
      NormalStream stream{seed};
      int64_t b = begin / per, next = (b + 1) * per;
      for (int64_t n = begin; n < end; ++n) {
        if (n >= next) b = n / per, next = (b + 1) * per;
        const float e = stream.at(n);
        z[n] = from_float<T>(alpha[b] * to_float(x[n]) + sigma[b] * e);
        if (eps) eps[n] = from_float<T>(e);
      }
    }
  });
}

void noise_backward_cpu(const ScaleArgs& a, int threads) {
  if (a.numel == 0) return;
  std::vector<float> alpha, sigma;
  per_example_alpha_sigma(a.logsnr, a.batch, alpha, sigma);
  const int64_t per = a.numel / a.batch;
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* grad = static_cast<const T*>(a.grad);
    T* dx = static_cast<T*>(a.dx);
#pragma omp parallel for num_threads(threads) schedule(static) if (a.numel >= kParallelMin)
    for (int64_t n = 0; n < a.numel; ++n) dx[n] = from_float<T>(alpha[n / per] * to_float(grad[n]));
  });
}

namespace {

// Calls body(T_pred{}, T_x{}) for the (pred, x) dtype pair.
template <typename F>
void dispatch_pair(int pred_dtype, int x_dtype, F&& body) {
  dispatch_dtype(pred_dtype, [&](auto pred_tag) {
    dispatch_dtype(x_dtype, [&](auto x_tag) { body(pred_tag, x_tag); });
  });
}

// Residual r = eps - eps_hat for one element (see reference.diffusion_loss).
inline float loss_residual(bool v_prediction, float alpha, float sigma, float x, float pred, float e) {
  if (!v_prediction) return e - pred;
  const float x_t = alpha * x + sigma * e;
  const float eps_hat = sigma * x_t + alpha * pred;
  return e - eps_hat;
}

}  // namespace

void loss_forward_cpu(const LossArgs& a, float* out, int threads) {
  std::vector<float> alpha, sigma;
  per_example_alpha_sigma(a.logsnr, a.batch, alpha, sigma);
  const int64_t per = a.batch ? a.numel / a.batch : 0;
  const int64_t chunks_per_example = std::max<int64_t>(1, (per + kChunk - 1) / kChunk);
  const int64_t tasks = a.batch * chunks_per_example;
  std::vector<double> partial(tasks, 0.0);
  const uint64_t seed = static_cast<uint64_t>(a.seed[0]);
  dispatch_pair(a.pred_dtype, a.x_dtype, [&](auto pred_tag, auto x_tag) {
    using TP = decltype(pred_tag);
    using TX = decltype(x_tag);
    const TP* pred = static_cast<const TP*>(a.pred);
    const TX* x = static_cast<const TX*>(a.x);
#pragma omp parallel for num_threads(threads) schedule(static) if (a.numel >= kParallelMin)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t b = task / chunks_per_example, chunk = task % chunks_per_example;
      const int64_t begin = b * per + chunk * kChunk;
      const int64_t end = std::min(begin + kChunk, (b + 1) * per);
      NormalStream stream{seed};
      double sum = 0.0;
      for (int64_t n = begin; n < end; ++n) {
        const float r = loss_residual(a.v_prediction, alpha[b], sigma[b], to_float(x[n]),
                                      to_float(pred[n]), stream.at(n));
        sum += static_cast<double>(r * r);
      }
      partial[task] = sum;
    }
  });
  for (int64_t b = 0; b < a.batch; ++b) {
    double sum = 0.0;
    for (int64_t c = 0; c < chunks_per_example; ++c) sum += partial[b * chunks_per_example + c];
    const float scale = loss_scale(a.logsnr[b], a.neg_dlogsnr_dt[b], a.has_bias, a.loss_factor, a.bias);
    out[b] = scale * static_cast<float>(sum);
  }
}

void loss_backward_cpu(const LossArgs& a, const float* grad_out, void* dpred_ptr, void* dx_ptr, int threads) {
  if (a.numel == 0) return;
  std::vector<float> alpha, sigma, coef(a.batch);
  per_example_alpha_sigma(a.logsnr, a.batch, alpha, sigma);
  for (int64_t b = 0; b < a.batch; ++b) {
    coef[b] = grad_out[b] * loss_scale(a.logsnr[b], a.neg_dlogsnr_dt[b], a.has_bias, a.loss_factor, a.bias);
  }
  const int64_t per = a.numel / a.batch;
  const int64_t tasks = (a.numel + kChunk - 1) / kChunk;
  const uint64_t seed = static_cast<uint64_t>(a.seed[0]);
  dispatch_pair(a.pred_dtype, a.x_dtype, [&](auto pred_tag, auto x_tag) {
    using TP = decltype(pred_tag);
    using TX = decltype(x_tag);
    const TP* pred = static_cast<const TP*>(a.pred);
    const TX* x = static_cast<const TX*>(a.x);
    TP* dpred = static_cast<TP*>(dpred_ptr);
    TX* dx = static_cast<TX*>(dx_ptr);
#pragma omp parallel for num_threads(threads) schedule(static) if (a.numel >= kParallelMin)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t begin = task * kChunk, end = std::min(begin + kChunk, a.numel);
      NormalStream stream{seed};
      int64_t b = begin / per, next = (b + 1) * per;
      for (int64_t n = begin; n < end; ++n) {
        if (n >= next) b = n / per, next = (b + 1) * per;
        const float r = loss_residual(a.v_prediction, alpha[b], sigma[b], to_float(x[n]),
                                      to_float(pred[n]), stream.at(n));
        // d(loss)/d(eps_hat) = -2 * coef * r; eps_hat = sigma*(alpha*x + sigma*eps) + alpha*pred for v.
        const float grad_eps_hat = -2.0f * r * coef[b];
        if (a.v_prediction) {
          dpred[n] = from_float<TP>(grad_eps_hat * alpha[b]);
          if (dx) dx[n] = from_float<TX>((grad_eps_hat * sigma[b]) * alpha[b]);
        } else {
          dpred[n] = from_float<TP>(grad_eps_hat);
        }
      }
    }
  });
}

void embed_forward_cpu(const EmbedArgs& a, void* out_ptr, float* pre, float* feats, int threads) {
  const int64_t B = a.batch, F = a.nfreq, N = a.nout, K = 2 * a.nfreq;
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* weight = static_cast<const T*>(a.weight);
    const T* bias = static_cast<const T*>(a.bias);
    T* out = static_cast<T*>(out_ptr);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t f = 0; f < F; ++f) {
        const float angle = a.logsnr[b] * a.freqs[f];
        // The reference casts the fp32 features to the weight dtype before the matmul.
        feats[b * K + f] = to_float(from_float<T>(std::sin(angle)));
        feats[b * K + F + f] = to_float(from_float<T>(std::cos(angle)));
      }
    }
    // W^T in fp32, so the inner loop runs over contiguous, independent outputs (vectorisable without
    // reassociating any sum).
    std::vector<float> weight_t(K * N);
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t k = 0; k < K; ++k) weight_t[k * N + n] = to_float(weight[n * K + k]);
    }
#pragma omp parallel for num_threads(threads) schedule(static) if (B * N * K >= kParallelMin)
    for (int64_t b = 0; b < B; ++b) {
      float* h = pre + b * N;
      for (int64_t n = 0; n < N; ++n) h[n] = 0.0f;
      for (int64_t k = 0; k < K; ++k) {
        const float f = feats[b * K + k];
        const float* w = weight_t.data() + k * N;
        for (int64_t n = 0; n < N; ++n) h[n] += w[n] * f;
      }
      for (int64_t n = 0; n < N; ++n) {
        h[n] += to_float(bias[n]);
        out[b * N + n] = from_float<T>(h[n] * sigmoidf_(h[n]));
      }
    }
  });
}

void embed_backward_cpu(const EmbedArgs& a, const void* grad_ptr, const float* pre, const float* feats,
                        void* dweight_ptr, void* dbias_ptr, int threads) {
  const int64_t B = a.batch, N = a.nout, K = 2 * a.nfreq;
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* grad = static_cast<const T*>(grad_ptr);
    T* dweight = static_cast<T*>(dweight_ptr);
    T* dbias = static_cast<T*>(dbias_ptr);
    std::vector<float> dpre(B * N);
    const bool parallel = B * N * K >= kParallelMin;
#pragma omp parallel num_threads(threads) if (parallel)
    {
#pragma omp for schedule(static)
      for (int64_t i = 0; i < B * N; ++i) {
        const float s = sigmoidf_(pre[i]);
        dpre[i] = to_float(grad[i]) * (s * (1.0f + pre[i] * (1.0f - s)));  // SiLU'(h)
      }
      std::vector<float> row(K);
#pragma omp for schedule(static)
      for (int64_t n = 0; n < N; ++n) {
        float db = 0.0f;
        std::fill(row.begin(), row.end(), 0.0f);
        for (int64_t b = 0; b < B; ++b) {
          const float dp = dpre[b * N + n];
          db += dp;
          const float* f = feats + b * K;
          for (int64_t k = 0; k < K; ++k) row[k] += dp * f[k];
        }
        dbias[n] = from_float<T>(db);
        for (int64_t k = 0; k < K; ++k) dweight[n * K + k] = from_float<T>(row[k]);
      }
    }
  });
}

void philox_words_cpu(uint64_t seed, uint64_t first, int64_t groups, uint32_t* out) {
  for (int64_t g = 0; g < groups; ++g) {
    const Words4 w = philox4x32_10(first + static_cast<uint64_t>(g), seed);
    out[4 * g] = w.r0;
    out[4 * g + 1] = w.r1;
    out[4 * g + 2] = w.r2;
    out[4 * g + 3] = w.r3;
  }
}

void philox_normal_cpu(uint64_t seed, int64_t numel, float* out, int threads) {
  const int64_t tasks = (numel + kChunk - 1) / kChunk;
#pragma omp parallel for num_threads(threads) schedule(static) if (numel >= kParallelMin)
  for (int64_t task = 0; task < tasks; ++task) {
    NormalStream stream{seed};
    const int64_t begin = task * kChunk, end = std::min(begin + kChunk, numel);
    for (int64_t n = begin; n < end; ++n) out[n] = stream.at(n);
  }
}

void alpha_sigma_cpu(const float* logsnr, int64_t batch, float* alpha, float* sigma) {
  for (int64_t b = 0; b < batch; ++b) alpha_sigma(logsnr[b], &alpha[b], &sigma[b]);
}

}  // namespace ul_fast
