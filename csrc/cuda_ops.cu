// CUDA kernels. Each thread draws one Philox group (four normals) at a time; per-example coefficients
// are computed once per block into shared memory; 16-byte (fp32) / 8-byte (16-bit) vector accesses
// are used whenever a group lies inside one tensor row and the pointers are aligned. The seed is read
// in-kernel from device memory, so the ops are CUDA-graph safe. fp32 arithmetic uses explicit _rn
// intrinsics where the order of rounding must match the reference (no FMA contraction). Every launch runs
// under a DeviceGuard (the caller's current device is restored) on the stream the caller passes (torch's
// current stream of the tensors' device), with its grid from launch.h checked against CUDA's limits.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "common.h"
#include "launch.h"
#include "ops.h"

namespace ul_fast {
namespace {

// ---- element access ----
__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_f<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Four consecutive elements at an address aligned to 4 * sizeof(T).
template <typename T>
struct alignas(4 * sizeof(T)) Pack4 {
  T v[4];
};

template <typename T>
__device__ __forceinline__ void load4(const T* p, float* out) {
  const Pack4<T> pack = *reinterpret_cast<const Pack4<T>*>(p);
#pragma unroll
  for (int i = 0; i < 4; ++i) out[i] = to_f(pack.v[i]);
}

template <typename T>
__device__ __forceinline__ void store4(T* p, const float* in) {
  Pack4<T> pack;
#pragma unroll
  for (int i = 0; i < 4; ++i) pack.v[i] = from_f<T>(in[i]);
  *reinterpret_cast<Pack4<T>*>(p) = pack;
}

bool aligned4(const void* p, int element_size) {
  return reinterpret_cast<uintptr_t>(p) % (4 * element_size) == 0;
}

template <typename F>
void dispatch_dtype(int dtype, F&& body) {
  switch (dtype) {
    case kFloat32: body(float{}); break;
    case kFloat16: body(__half{}); break;
    case kBFloat16: body(__nv_bfloat16{}); break;
    default: throw std::invalid_argument("ul_fast._C: unknown dtype code " + std::to_string(dtype));
  }
}

void check_launch(const char* what) {
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) {
    throw std::runtime_error(std::string("ul_fast._C: ") + what + " launch failed: " +
                             cudaGetErrorString(error));
  }
}

void check_cuda(cudaError_t error, const char* what) {
  if (error != cudaSuccess) throw std::runtime_error(std::string("ul_fast._C: ") + what + ": " + cudaGetErrorString(error));
}

// Makes `device` current for its lifetime and restores the caller's device after (torch keeps its own
// notion of the current device in the CUDA runtime; an op on cuda:1 must not move the caller to cuda:1).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) check_cuda(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() {
    int current = -1;
    if (cudaGetDevice(&current) == cudaSuccess && current != previous_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

dim3 as_dim3(const Grid& grid) {
  return dim3(static_cast<unsigned int>(grid.x), static_cast<unsigned int>(grid.y),
              static_cast<unsigned int>(grid.z));
}

// Blocks of an element-wise kernel cover kThreads groups = 4 * kThreads elements; they span at most
// 4 * kThreads + 1 examples (per-example size 1), whose coefficients are staged in shared memory.
constexpr int kSpanMax = 4 * kThreads + 1;

struct BlockSpan {
  int64_t first_example;
  int count;
};

__device__ __forceinline__ BlockSpan block_span(int64_t numel, int64_t per) {
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * 4 * kThreads;
  const int64_t end = min(begin + 4 * kThreads, numel);
  const int64_t first = begin / per, last = (end - 1) / per;
  return BlockSpan{first, static_cast<int>(last - first + 1)};
}

// ---- noise injection: z = alpha x + sigma eps, optional eps ----
template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads) noise_inject_kernel(const T* __restrict__ x, T* __restrict__ z,
                                                                T* __restrict__ eps,
                                                                const float* __restrict__ logsnr,
                                                                const int64_t* __restrict__ seed_ptr,
                                                                int64_t numel, int64_t per) {
  __shared__ float s_alpha[kSpanMax], s_sigma[kSpanMax];
  const BlockSpan span = block_span(numel, per);
  for (int i = threadIdx.x; i < span.count; i += kThreads) {
    alpha_sigma(logsnr[span.first_example + i], &s_alpha[i], &s_sigma[i]);
  }
  __syncthreads();
  const uint64_t seed = static_cast<uint64_t>(*seed_ptr);
  const int64_t group = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t n0 = 4 * group;
  if (n0 >= numel) return;
  float e[4];
  philox_normal4(static_cast<uint64_t>(group), seed, e);
  const int first = static_cast<int>(n0 / per - span.first_example);
  if (kVec && n0 + 4 <= numel && (n0 / per) == ((n0 + 3) / per)) {
    float v[4];
    load4(x + n0, v);
    const float a = s_alpha[first], s = s_sigma[first];
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = __fadd_rn(__fmul_rn(a, v[i]), __fmul_rn(s, e[i]));
    store4(z + n0, v);
    if (eps != nullptr) store4(eps + n0, e);
    return;
  }
  for (int i = 0; i < 4 && n0 + i < numel; ++i) {
    const int j = static_cast<int>((n0 + i) / per - span.first_example);
    z[n0 + i] = from_f<T>(__fadd_rn(__fmul_rn(s_alpha[j], to_f(x[n0 + i])), __fmul_rn(s_sigma[j], e[i])));
    if (eps != nullptr) eps[n0 + i] = from_f<T>(e[i]);
  }
}

// ---- noise backward: dx = alpha grad (4 elements per thread, same block layout) ----
template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads) scale_kernel(const T* __restrict__ grad, T* __restrict__ dx,
                                                         const float* __restrict__ logsnr, int64_t numel,
                                                         int64_t per) {
  __shared__ float s_alpha[kSpanMax], s_sigma[kSpanMax];
  const BlockSpan span = block_span(numel, per);
  for (int i = threadIdx.x; i < span.count; i += kThreads) {
    alpha_sigma(logsnr[span.first_example + i], &s_alpha[i], &s_sigma[i]);
  }
  __syncthreads();
  const int64_t n0 = 4 * (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x);
  if (n0 >= numel) return;
  if (kVec && n0 + 4 <= numel && (n0 / per) == ((n0 + 3) / per)) {
    float v[4];
    load4(grad + n0, v);
    const float a = s_alpha[n0 / per - span.first_example];
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = __fmul_rn(a, v[i]);
    store4(dx + n0, v);
    return;
  }
  for (int i = 0; i < 4 && n0 + i < numel; ++i) {
    const int j = static_cast<int>((n0 + i) / per - span.first_example);
    dx[n0 + i] = from_f<T>(__fmul_rn(s_alpha[j], to_f(grad[n0 + i])));
  }
}

// ---- diffusion loss ----
__device__ __forceinline__ float loss_residual(bool v_prediction, float alpha, float sigma, float x,
                                               float pred, float e) {
  if (!v_prediction) return __fsub_rn(e, pred);
  const float x_t = __fadd_rn(__fmul_rn(alpha, x), __fmul_rn(sigma, e));
  const float eps_hat = __fadd_rn(__fmul_rn(sigma, x_t), __fmul_rn(alpha, pred));
  return __fsub_rn(e, eps_hat);
}

// Grid (B * chunks): block b * chunks + c sums r^2 over chunk c of example b into partial[b * chunks + c]
// (one flat grid dimension, so any batch size fits).
template <typename TP, typename TX>
__global__ void __launch_bounds__(kThreads)
    loss_forward_kernel(const TP* __restrict__ pred, const TX* __restrict__ x, const float* __restrict__ logsnr,
                        const int64_t* __restrict__ seed_ptr, int64_t per, int64_t chunks, bool kVec,
                        bool kVPred, float* __restrict__ partial) {
  const int64_t b = blockIdx.x / chunks, c = blockIdx.x % chunks;
  const int64_t lo = b * per + c * kLossChunk;
  const int64_t hi = min(lo + kLossChunk, (b + 1) * per);
  float alpha, sigma;
  alpha_sigma(logsnr[b], &alpha, &sigma);
  const uint64_t seed = static_cast<uint64_t>(*seed_ptr);
  float acc = 0.0f;
  for (int64_t g = lo / 4 + threadIdx.x; 4 * g < hi; g += kThreads) {
    float e[4];
    philox_normal4(static_cast<uint64_t>(g), seed, e);
    const int64_t n0 = 4 * g;
    if (kVec && n0 >= lo && n0 + 4 <= hi) {
      float p[4], v[4];
      load4(pred + n0, p);
      load4(x + n0, v);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float r = loss_residual(kVPred, alpha, sigma, v[i], p[i], e[i]);
        acc += r * r;
      }
    } else {
      for (int i = 0; i < 4; ++i) {
        const int64_t n = n0 + i;
        if (n < lo || n >= hi) continue;
        const float r = loss_residual(kVPred, alpha, sigma, to_f(x[n]), to_f(pred[n]), e[i]);
        acc += r * r;
      }
    }
  }
  // Block reduction in a fixed order (deterministic).
  __shared__ float s_warp[kThreads / 32];
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, offset);
  if ((threadIdx.x & 31) == 0) s_warp[threadIdx.x >> 5] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.0f;
    for (int w = 0; w < kThreads / 32; ++w) total += s_warp[w];
    partial[blockIdx.x] = total;
  }
}

__global__ void loss_finalize_kernel(const float* __restrict__ partial, int64_t chunks, int64_t batch,
                                     const float* __restrict__ logsnr, const float* __restrict__ neg_dlogsnr_dt,
                                     bool has_bias, float loss_factor, float bias, float* __restrict__ out) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  float sum = 0.0f;
  for (int64_t c = 0; c < chunks; ++c) sum += partial[b * chunks + c];
  out[b] = __fmul_rn(loss_scale(logsnr[b], neg_dlogsnr_dt[b], has_bias, loss_factor, bias), sum);
}

// Backward: grad_eps_hat = -2 r (grad_out_b scale_b); dpred = alpha grad_eps_hat (v) or grad_eps_hat
// (eps); dx = alpha sigma grad_eps_hat (v only). Same block layout as the noise kernel.
template <typename TP, typename TX>
__global__ void __launch_bounds__(kThreads)
    loss_backward_kernel(const TP* __restrict__ pred, const TX* __restrict__ x, const float* __restrict__ logsnr,
                         const float* __restrict__ neg_dlogsnr_dt, const int64_t* __restrict__ seed_ptr,
                         const float* __restrict__ grad_out, bool has_bias, float loss_factor, float bias,
                         TP* __restrict__ dpred, TX* __restrict__ dx, int64_t numel, int64_t per, bool kVec,
                         bool kVPred) {
  __shared__ float s_alpha[kSpanMax], s_sigma[kSpanMax], s_coef[kSpanMax];
  const BlockSpan span = block_span(numel, per);
  for (int i = threadIdx.x; i < span.count; i += kThreads) {
    const int64_t b = span.first_example + i;
    alpha_sigma(logsnr[b], &s_alpha[i], &s_sigma[i]);
    s_coef[i] = __fmul_rn(-2.0f, __fmul_rn(grad_out[b],
                                           loss_scale(logsnr[b], neg_dlogsnr_dt[b], has_bias, loss_factor, bias)));
  }
  __syncthreads();
  const uint64_t seed = static_cast<uint64_t>(*seed_ptr);
  const int64_t group = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t n0 = 4 * group;
  if (n0 >= numel) return;
  float e[4];
  philox_normal4(static_cast<uint64_t>(group), seed, e);
  if (kVec && n0 + 4 <= numel && (n0 / per) == ((n0 + 3) / per)) {
    const int j = static_cast<int>(n0 / per - span.first_example);
    const float a = s_alpha[j], s = s_sigma[j], coef = s_coef[j];
    float p[4], v[4], gp[4], gx[4];
    load4(pred + n0, p);
    load4(x + n0, v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float g = __fmul_rn(loss_residual(kVPred, a, s, v[i], p[i], e[i]), coef);
      gp[i] = kVPred ? __fmul_rn(g, a) : g;
      gx[i] = __fmul_rn(__fmul_rn(g, s), a);
    }
    store4(dpred + n0, gp);
    if (kVPred && dx != nullptr) store4(dx + n0, gx);
    return;
  }
  for (int i = 0; i < 4 && n0 + i < numel; ++i) {
    const int64_t n = n0 + i;
    const int j = static_cast<int>(n / per - span.first_example);
    const float a = s_alpha[j], s = s_sigma[j];
    const float g = __fmul_rn(loss_residual(kVPred, a, s, to_f(x[n]), to_f(pred[n]), e[i]), s_coef[j]);
    dpred[n] = from_f<TP>(kVPred ? __fmul_rn(g, a) : g);
    if (kVPred && dx != nullptr) dx[n] = from_f<TX>(__fmul_rn(__fmul_rn(g, s), a));
  }
}

// ---- log-SNR embedding: out = SiLU(W [sin(l f), cos(l f)] + b) as a tiled fp32 GEMM ----
template <typename T>
__device__ __forceinline__ float fourier_feature(const float* logsnr, const float* freqs, int64_t b, int64_t k,
                                                 int64_t nfreq) {
  const float angle = __fmul_rn(logsnr[b], freqs[k < nfreq ? k : k - nfreq]);
  const float value = k < nfreq ? sinf(angle) : cosf(angle);
  return to_f(from_f<T>(value));  // the reference casts the features to the weight dtype
}

// Grid (ceil(B / 16), ceil(N / 64)); thread t computes n = n0 + t % 64 for 4 examples.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    embed_forward_kernel(const float* __restrict__ logsnr, const float* __restrict__ freqs,
                         const T* __restrict__ weight, const T* __restrict__ bias, T* __restrict__ out,
                         float* __restrict__ pre, float* __restrict__ feats, int64_t B, int64_t F, int64_t N) {
  __shared__ float s_feat[kEmbTB][kEmbTK + 1];
  __shared__ float s_w[kEmbTN][kEmbTK + 1];
  const int64_t K = 2 * F;
  const int64_t b0 = static_cast<int64_t>(blockIdx.x) * kEmbTB, n0 = static_cast<int64_t>(blockIdx.y) * kEmbTN;
  const int nl = threadIdx.x % kEmbTN, bq = threadIdx.x / kEmbTN;  // bq in 0..3 -> examples 4bq..4bq+3
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int64_t k0 = 0; k0 < K; k0 += kEmbTK) {
    for (int i = threadIdx.x; i < kEmbTB * kEmbTK; i += kThreads) {
      const int bl = i / kEmbTK, kl = i % kEmbTK;
      const int64_t b = b0 + bl, k = k0 + kl;
      float value = 0.0f;
      if (b < B && k < K) {
        value = fourier_feature<T>(logsnr, freqs, b, k, F);
        if (blockIdx.y == 0) feats[b * K + k] = value;
      }
      s_feat[bl][kl] = value;
    }
    for (int i = threadIdx.x; i < kEmbTN * kEmbTK; i += kThreads) {
      const int row = i / kEmbTK, kl = i % kEmbTK;
      const int64_t n = n0 + row, k = k0 + kl;
      s_w[row][kl] = (n < N && k < K) ? to_f(weight[n * K + k]) : 0.0f;
    }
    __syncthreads();
#pragma unroll 8
    for (int kl = 0; kl < kEmbTK; ++kl) {
      const float w = s_w[nl][kl];
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[j] += w * s_feat[4 * bq + j][kl];
    }
    __syncthreads();
  }
  const int64_t n = n0 + nl;
  if (n >= N) return;
  const float bias_n = to_f(bias[n]);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t b = b0 + 4 * bq + j;
    if (b >= B) continue;
    const float h = acc[j] + bias_n;
    pre[b * N + n] = h;
    out[b * N + n] = from_f<T>(h * sigmoidf_(h));
  }
}

// Grid (ceil(K / 32), ceil(N / 32)): dW[n, k] = sum_b dpre[b, n] feats[b, k]; column-0 blocks also
// write db[n] = sum_b dpre[b, n]. dpre = grad * SiLU'(pre) is recomputed per tile (cheap).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    embed_backward_kernel(const T* __restrict__ grad, const float* __restrict__ pre,
                          const float* __restrict__ feats, T* __restrict__ dweight, T* __restrict__ dbias,
                          int64_t B, int64_t F, int64_t N) {
  __shared__ float s_dpre[kEmbBwdT][kEmbBwdT + 1];
  __shared__ float s_feat[kEmbBwdT][kEmbBwdT + 1];
  const int64_t K = 2 * F;
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * kEmbBwdT, n0 = static_cast<int64_t>(blockIdx.y) * kEmbBwdT;
  const int kl = threadIdx.x % kEmbBwdT, nq = threadIdx.x / kEmbBwdT;  // nq in 0..7 -> n = 4nq..4nq+3
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  float db = 0.0f;
  for (int64_t b0 = 0; b0 < B; b0 += kEmbBwdT) {
    for (int i = threadIdx.x; i < kEmbBwdT * kEmbBwdT; i += kThreads) {
      const int bl = i / kEmbBwdT, col = i % kEmbBwdT;
      const int64_t b = b0 + bl, n = n0 + col, k = k0 + col;
      float dp = 0.0f;
      if (b < B && n < N) {
        const float h = pre[b * N + n];
        const float s = sigmoidf_(h);
        dp = to_f(grad[b * N + n]) * (s * (1.0f + h * (1.0f - s)));
      }
      s_dpre[bl][col] = dp;
      s_feat[bl][col] = (b < B && k < K) ? feats[b * K + k] : 0.0f;
    }
    __syncthreads();
#pragma unroll 8
    for (int bl = 0; bl < kEmbBwdT; ++bl) {
      const float f = s_feat[bl][kl];
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[j] += s_dpre[bl][4 * nq + j] * f;
    }
    if (blockIdx.x == 0 && threadIdx.x < kEmbBwdT) {
      for (int bl = 0; bl < kEmbBwdT; ++bl) db += s_dpre[bl][threadIdx.x];
    }
    __syncthreads();
  }
  const int64_t k = k0 + kl;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t n = n0 + 4 * nq + j;
    if (n < N && k < K) dweight[n * K + k] = from_f<T>(acc[j]);
  }
  if (blockIdx.x == 0 && threadIdx.x < kEmbBwdT && n0 + threadIdx.x < N) dbias[n0 + threadIdx.x] = from_f<T>(db);
}

__global__ void philox_normal_kernel(const int64_t* __restrict__ seed_ptr, int64_t numel, float* __restrict__ out) {
  const int64_t group = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (4 * group >= numel) return;
  float e[4];
  philox_normal4(static_cast<uint64_t>(group), static_cast<uint64_t>(*seed_ptr), e);
  for (int i = 0; i < 4 && 4 * group + i < numel; ++i) out[4 * group + i] = e[i];
}

__global__ void alpha_sigma_kernel(const float* __restrict__ logsnr, int64_t batch, float* __restrict__ alpha,
                                   float* __restrict__ sigma) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b < batch) alpha_sigma(logsnr[b], &alpha[b], &sigma[b]);
}

cudaStream_t as_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

template <typename F>
void dispatch_bool(bool flag, F&& body) {
  if (flag) {
    body(std::true_type{});
  } else {
    body(std::false_type{});
  }
}

}  // namespace


void noise_inject_cuda(const NoiseArgs& a, int device, uintptr_t stream) {
  if (a.numel == 0) return;
  const dim3 grid = as_dim3(checked(elementwise_grid(a.numel), "noise_inject"));
  const DeviceGuard guard(device);
  const int64_t per = a.numel / a.batch;
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool vec = aligned4(a.x, sizeof(T)) && aligned4(a.z, sizeof(T)) &&
                     (a.eps == nullptr || aligned4(a.eps, sizeof(T)));
    dispatch_bool(vec, [&](auto kVec) {
      noise_inject_kernel<T, decltype(kVec)::value><<<grid, kThreads, 0, as_stream(stream)>>>(
          static_cast<const T*>(a.x), static_cast<T*>(a.z), static_cast<T*>(a.eps), a.logsnr, a.seed, a.numel, per);
    });
  });
  check_launch("noise_inject");
}

void noise_backward_cuda(const ScaleArgs& a, int device, uintptr_t stream) {
  if (a.numel == 0) return;
  const dim3 grid = as_dim3(checked(elementwise_grid(a.numel), "noise_inject backward"));
  const DeviceGuard guard(device);
  const int64_t per = a.numel / a.batch;
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool vec = aligned4(a.grad, sizeof(T)) && aligned4(a.dx, sizeof(T));
    dispatch_bool(vec, [&](auto kVec) {
      scale_kernel<T, decltype(kVec)::value><<<grid, kThreads, 0, as_stream(stream)>>>(
          static_cast<const T*>(a.grad), static_cast<T*>(a.dx), a.logsnr, a.numel, per);
    });
  });
  check_launch("noise_inject backward");
}

void loss_forward_cuda(const LossArgs& a, float* out, float* workspace, int device, uintptr_t stream) {
  if (a.batch == 0) return;
  const dim3 grid = as_dim3(checked(loss_forward_grid(a.numel, a.batch), "diffusion_loss"));
  const dim3 finalize_grid = as_dim3(checked(per_example_grid(a.batch), "diffusion_loss finalize"));
  const DeviceGuard guard(device);
  const int64_t per = a.numel / a.batch;
  const int64_t chunks = loss_chunks(per);
  if (per > 0) {
    dispatch_dtype(a.pred_dtype, [&](auto pred_tag) {
      dispatch_dtype(a.x_dtype, [&](auto x_tag) {
        using TP = decltype(pred_tag);
        using TX = decltype(x_tag);
        const bool vec = aligned4(a.pred, sizeof(TP)) && aligned4(a.x, sizeof(TX));
        loss_forward_kernel<TP, TX><<<grid, kThreads, 0, as_stream(stream)>>>(
            static_cast<const TP*>(a.pred), static_cast<const TX*>(a.x), a.logsnr, a.seed, per, chunks, vec,
            a.v_prediction, workspace);
      });
    });
    check_launch("diffusion_loss");
  } else {
    check_cuda(cudaMemsetAsync(workspace, 0, sizeof(float) * a.batch * chunks, as_stream(stream)),
               "cudaMemsetAsync");
  }
  loss_finalize_kernel<<<finalize_grid, kVectorThreads, 0, as_stream(stream)>>>(
      workspace, chunks, a.batch, a.logsnr, a.neg_dlogsnr_dt, a.has_bias, a.loss_factor, a.bias, out);
  check_launch("diffusion_loss finalize");
}

void loss_backward_cuda(const LossArgs& a, const float* grad_out, void* dpred, void* dx, int device,
                        uintptr_t stream) {
  if (a.numel == 0) return;
  const dim3 grid = as_dim3(checked(elementwise_grid(a.numel), "diffusion_loss backward"));
  const DeviceGuard guard(device);
  const int64_t per = a.numel / a.batch;
  dispatch_dtype(a.pred_dtype, [&](auto pred_tag) {
    dispatch_dtype(a.x_dtype, [&](auto x_tag) {
      using TP = decltype(pred_tag);
      using TX = decltype(x_tag);
      const bool vec = aligned4(a.pred, sizeof(TP)) && aligned4(a.x, sizeof(TX)) &&
                       aligned4(dpred, sizeof(TP)) && (dx == nullptr || aligned4(dx, sizeof(TX)));
      loss_backward_kernel<TP, TX><<<grid, kThreads, 0, as_stream(stream)>>>(
          static_cast<const TP*>(a.pred), static_cast<const TX*>(a.x), a.logsnr, a.neg_dlogsnr_dt, a.seed,
          grad_out, a.has_bias, a.loss_factor, a.bias, static_cast<TP*>(dpred), static_cast<TX*>(dx), a.numel,
          per, vec, a.v_prediction);
    });
  });
  check_launch("diffusion_loss backward");
}

void embed_forward_cuda(const EmbedArgs& a, void* out, float* pre, float* feats, int device, uintptr_t stream) {
  if (a.batch == 0 || a.nout == 0) return;
  const dim3 grid = as_dim3(checked(embed_forward_grid(a.batch, a.nout), "logsnr_embed"));
  const DeviceGuard guard(device);
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    embed_forward_kernel<T><<<grid, kThreads, 0, as_stream(stream)>>>(
        a.logsnr, a.freqs, static_cast<const T*>(a.weight), static_cast<const T*>(a.bias), static_cast<T*>(out),
        pre, feats, a.batch, a.nfreq, a.nout);
  });
  check_launch("logsnr_embed");
}

void embed_backward_cuda(const EmbedArgs& a, const void* grad_out, const float* pre, const float* feats,
                         void* dweight, void* dbias, int device, uintptr_t stream) {
  if (a.nout == 0) return;
  const dim3 grid = as_dim3(checked(embed_backward_grid(a.nfreq, a.nout), "logsnr_embed backward"));
  const DeviceGuard guard(device);
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    embed_backward_kernel<T><<<grid, kThreads, 0, as_stream(stream)>>>(
        static_cast<const T*>(grad_out), pre, feats, static_cast<T*>(dweight), static_cast<T*>(dbias), a.batch,
        a.nfreq, a.nout);
  });
  check_launch("logsnr_embed backward");
}

void philox_normal_cuda(const int64_t* seed, int64_t numel, float* out, int device, uintptr_t stream) {
  if (numel == 0) return;
  const dim3 grid = as_dim3(checked(elementwise_grid(numel), "philox_normal"));
  const DeviceGuard guard(device);
  philox_normal_kernel<<<grid, kThreads, 0, as_stream(stream)>>>(seed, numel, out);
  check_launch("philox_normal");
}

void alpha_sigma_cuda(const float* logsnr, int64_t batch, float* alpha, float* sigma, int device,
                      uintptr_t stream) {
  if (batch == 0) return;
  const dim3 grid = as_dim3(checked(per_example_grid(batch), "alpha_sigma"));
  const DeviceGuard guard(device);
  alpha_sigma_kernel<<<grid, kVectorThreads, 0, as_stream(stream)>>>(
      logsnr, batch, alpha, sigma);
  check_launch("alpha_sigma");
}

}  // namespace ul_fast
