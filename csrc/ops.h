// Kernel entry points: plain C++ types and raw pointers only, so the extension needs no torch headers.
// Pointers come from torch tensors' data_ptr() and reach these functions only through the checked bindings
// (csrc/bindings.cpp, csrc/boundary.h: every buffer's dtype, length, device and alignment). "numel" is the
// element count of x, "batch" its leading dimension; each example holds numel / batch contiguous elements.
#pragma once

#include <cstddef>
#include <cstdint>

namespace ul_fast {

struct NoiseArgs {
  const void* x;          // [B, ...] in dtype
  void* z;                // like x
  void* eps;              // like x, or nullptr to skip the write
  int dtype;              // DType
  const float* logsnr;    // [B]
  const int64_t* seed;    // [1] (device memory for CUDA: read in-kernel)
  int64_t numel, batch;
};

struct ScaleArgs {        // noise backward: dx = alpha(logsnr_b) * grad
  const void* grad;
  void* dx;
  int dtype;
  const float* logsnr;
  int64_t numel, batch;
};

struct LossArgs {
  const void* pred;       // [B, ...] in pred_dtype
  const void* x;          // [B, ...] in x_dtype
  int pred_dtype, x_dtype;
  const float* logsnr;          // [B]
  const float* neg_dlogsnr_dt;  // [B]
  const int64_t* seed;          // [1]
  int64_t numel, batch;
  bool v_prediction;
  bool has_bias;
  float loss_factor, bias;
};

struct EmbedArgs {
  const float* logsnr;    // [B]
  const float* freqs;     // [F]
  const void* weight;     // [N, 2F] in dtype
  const void* bias;       // [N] in dtype
  int dtype;
  int64_t batch, nfreq, nout;
};

// ---- CPU (OpenMP; `threads` is torch.get_num_threads()) ----
void noise_inject_cpu(const NoiseArgs& a, int threads);
void noise_backward_cpu(const ScaleArgs& a, int threads);
void loss_forward_cpu(const LossArgs& a, float* out, int threads);
// dpred in pred_dtype; dx in x_dtype or nullptr (no gradient for x, e.g. eps prediction).
void loss_backward_cpu(const LossArgs& a, const float* grad_out, void* dpred, void* dx, int threads);
// out [B, N] in dtype; pre [B, N] fp32 (pre-activation, saved for backward); feats [B, 2F] fp32 (the
// Fourier features after rounding to dtype, saved for backward).
void embed_forward_cpu(const EmbedArgs& a, void* out, float* pre, float* feats, int threads);
void embed_backward_cpu(const EmbedArgs& a, const void* grad_out, const float* pre, const float* feats,
                        void* dweight, void* dbias, int threads);
// Debug: the raw Philox words (4 per group) of groups first .. first + groups - 1, and the normals of the
// first `numel` elements.
void philox_words_cpu(uint64_t seed, uint64_t first, int64_t groups, uint32_t* out);
void philox_normal_cpu(uint64_t seed, int64_t numel, float* out, int threads);
// Debug: the per-example alpha, sigma the kernels use, [B] each.
void alpha_sigma_cpu(const float* logsnr, int64_t batch, float* alpha, float* sigma);

#ifdef UL_FAST_WITH_CUDA
// ---- CUDA (stream = cudaStream_t as an integer, device = the tensors' device index; every call is
// asynchronous on that stream and throws std::runtime_error if a launch fails) ----
// loss_forward_cuda's workspace holds loss_workspace(numel, batch) fp32 partial sums (launch.h).
void noise_inject_cuda(const NoiseArgs& a, int device, uintptr_t stream);
void noise_backward_cuda(const ScaleArgs& a, int device, uintptr_t stream);
void loss_forward_cuda(const LossArgs& a, float* out, float* workspace, int device, uintptr_t stream);
void loss_backward_cuda(const LossArgs& a, const float* grad_out, void* dpred, void* dx, int device,
                        uintptr_t stream);
void embed_forward_cuda(const EmbedArgs& a, void* out, float* pre, float* feats, int device,
                        uintptr_t stream);
void embed_backward_cuda(const EmbedArgs& a, const void* grad_out, const float* pre, const float* feats,
                         void* dweight, void* dbias, int device, uintptr_t stream);
void philox_normal_cuda(const int64_t* seed, int64_t numel, float* out, int device, uintptr_t stream);
void alpha_sigma_cuda(const float* logsnr, int64_t batch, float* alpha, float* sigma, int device,
                      uintptr_t stream);
#endif

}  // namespace ul_fast
