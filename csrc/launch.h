// Launch geometry of the CUDA kernels (csrc/cuda_ops.cu), host-only so it compiles without nvcc: the
// bindings expose it (cuda_grids) and tests check it against CUDA's grid limits for huge sizes on any machine.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace ul_fast {

constexpr int kThreads = 256;                  // threads per block of every kernel except the two below
constexpr int kVectorThreads = 128;            // loss finalize, alpha_sigma: one thread per example
constexpr int64_t kGroupElements = 4;          // one Philox call gives four normals
constexpr int64_t kBlockElements = kGroupElements * kThreads;  // element-wise kernels: a group per thread
// Loss forward: each block sums one chunk of one example, two groups per thread, so a [256, 16, 64, 64]
// batch runs 2048 blocks (enough to fill every SM several times over).
constexpr int64_t kLossChunk = 2 * kBlockElements;
constexpr int kEmbTB = 16, kEmbTN = 64, kEmbTK = 32;  // embedding forward tile: 16 examples x 64 outputs
constexpr int kEmbBwdT = 32;                          // embedding backward tile: 32 k x 32 n

// CUDA's limits on grid dimensions (every compute capability this project builds for).
constexpr int64_t kMaxGridX = 2147483647, kMaxGridYZ = 65535;

struct Grid {
  int64_t x = 1, y = 1, z = 1;
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Throws std::invalid_argument (ValueError in Python) when `grid` exceeds CUDA's limits.
inline Grid checked(const Grid& grid, const char* kernel) {
  if (grid.x < 1 || grid.x > kMaxGridX || grid.y < 1 || grid.y > kMaxGridYZ || grid.z < 1 ||
      grid.z > kMaxGridYZ) {
    throw std::invalid_argument(std::string("ul_fast._C: the ") + kernel + " grid (" + std::to_string(grid.x) +
                                ", " + std::to_string(grid.y) + ", " + std::to_string(grid.z) +
                                ") exceeds CUDA's limits (x <= 2^31 - 1, y and z <= 65535)");
  }
  return grid;
}

// Noise inject, its backward, the loss backward, philox_normal: a flat grid over elements.
inline Grid elementwise_grid(int64_t numel) { return Grid{ceil_div(numel, kBlockElements)}; }

// Chunks per example of the loss forward (>= 1, so an example of 0 elements still gets a zero partial sum).
inline int64_t loss_chunks(int64_t per_example) {
  return per_example > 0 ? ceil_div(per_example, kLossChunk) : 1;
}

// Loss forward: block b * chunks + c sums chunk c of example b (flat, so any batch fits on axis x).
inline Grid loss_forward_grid(int64_t numel, int64_t batch) {
  return Grid{batch * loss_chunks(batch > 0 ? numel / batch : 0)};
}

// Number of fp32 partial sums the loss forward writes (its workspace).
inline int64_t loss_workspace(int64_t numel, int64_t batch) { return loss_forward_grid(numel, batch).x; }

// Per-example kernels (loss finalize, alpha_sigma): one thread per example.
inline Grid per_example_grid(int64_t batch) { return Grid{ceil_div(batch, kVectorThreads)}; }

// Embedding forward: examples on x (unbounded in practice), outputs on y (up to 65535 * 64 outputs).
inline Grid embed_forward_grid(int64_t batch, int64_t nout) {
  return Grid{ceil_div(batch, kEmbTB), ceil_div(nout, kEmbTN)};
}

// Embedding backward: Fourier features (K = 2F, at least one column of blocks, which writes db) on x,
// outputs on y (up to 65535 * 32 outputs).
inline Grid embed_backward_grid(int64_t nfreq, int64_t nout) {
  const int64_t k = 2 * nfreq > 0 ? 2 * nfreq : 1;
  return Grid{ceil_div(k, kEmbBwdT), ceil_div(nout, kEmbBwdT)};
}

}  // namespace ul_fast
