// Landmark pooling on CUDA (imhsa.md "Landmarks"): adaptive-average bins over a 2-D token grid or a
// 1-D sequence, the first `prefix` tokens left out; and its adjoint. A 1-D sequence is the grid
// (1, n) pooled to (1, L). One thread per output element, float32 sums, no atomics.
#include "cuda/common.cuh"
#include "op_checks.h"

#include <torch/library.h>

namespace crosshead {
namespace {

struct PoolGeom {
  int gh, gw, lh, lw, prefix;  // grid (gh, gw), landmark grid (lh, lw)
};

// adaptive_avg_pool bin i of n_in -> n_out: [floor(i·n_in/n_out), ceil((i+1)·n_in/n_out))
__device__ __forceinline__ int bin_start(int i, int n_in, int n_out) {
  return static_cast<int>((int64_t(i) * n_in) / n_out);
}
__device__ __forceinline__ int bin_end(int i, int n_in, int n_out) {
  return static_cast<int>(((int64_t(i) + 1) * n_in + n_out - 1) / n_out);
}

template <typename T>
__global__ void landmarks_kernel(const T* __restrict__ x, int64_t sb, int64_t sh, int64_t sn, int64_t sd,
                                 T* __restrict__ out, int64_t total, int H, int d, PoolGeom g) {
  const int L = g.lh * g.lw;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    int k = idx % d;
    int64_t r = idx / d;
    int l = r % L;
    int64_t bh = r / L;
    int64_t b = bh / H, h = bh % H;
    int li = l / g.lw, lj = l % g.lw;
    int r0 = bin_start(li, g.gh, g.lh), r1 = bin_end(li, g.gh, g.lh);
    int c0 = bin_start(lj, g.gw, g.lw), c1 = bin_end(lj, g.gw, g.lw);
    const T* base = x + b * sb + h * sh + k * sd;
    float s = 0.f;
    for (int rr = r0; rr < r1; ++rr)
      for (int cc = c0; cc < c1; ++cc) s += to_f(base[(g.prefix + int64_t(rr) * g.gw + cc) * sn]);
    out[idx] = from_f<T>(s / float((r1 - r0) * (c1 - c0)));
  }
}

// Adjoint: token (r, c) of the grid collects grad[i, j] / |bin i|·|bin j| over the bins holding
// it; bin i holds r iff floor(r·lh/gh) <= i <= ceil((r+1)·lh/gh) - 1. Prefix tokens get zero.
template <typename T>
__global__ void landmarks_backward_kernel(const T* __restrict__ grad, int64_t sb, int64_t sh, int64_t sl,
                                          int64_t sd, T* __restrict__ out, int64_t total, int H, int n_tok,
                                          int d, PoolGeom g) {
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    int k = idx % d;
    int64_t r = idx / d;
    int n = r % n_tok;
    int64_t bh = r / n_tok;
    int64_t b = bh / H, h = bh % H;
    float s = 0.f;
    if (n >= g.prefix) {
      int t = n - g.prefix, row = t / g.gw, col = t % g.gw;
      // the candidate bins are exactly [bin_start(row, gh, lh), bin_end(row, gh, lh))
      int i0 = bin_start(row, g.lh, g.gh), i1 = bin_end(row, g.lh, g.gh);
      int j0 = bin_start(col, g.lw, g.gw), j1 = bin_end(col, g.lw, g.gw);
      const T* base = grad + b * sb + h * sh + k * sd;
      for (int i = i0; i < i1 && i < g.lh; ++i) {
        int a0 = bin_start(i, g.gh, g.lh), a1 = bin_end(i, g.gh, g.lh);
        if (row < a0 || row >= a1) continue;
        for (int j = j0; j < j1 && j < g.lw; ++j) {
          int c0 = bin_start(j, g.gw, g.lw), c1 = bin_end(j, g.gw, g.lw);
          if (col < c0 || col >= c1) continue;
          s += to_f(base[int64_t(i * g.lw + j) * sl]) / float((a1 - a0) * (c1 - c0));
        }
      }
    }
    out[idx] = from_f<T>(s);
  }
}

// The geometry after the ops' argument checks (op_checks.h): grid [] pools the N - prefix tokens as
// one row.
PoolGeom geometry(int64_t n_tok, const std::vector<int64_t>& grid, at::IntArrayRef size, int64_t prefix) {
  PoolGeom g;
  g.prefix = static_cast<int>(prefix);
  if (grid.empty()) {
    g.gh = 1, g.gw = static_cast<int>(n_tok - prefix), g.lh = 1, g.lw = static_cast<int>(size[0]);
  } else {
    g.gh = static_cast<int>(grid[0]), g.gw = static_cast<int>(grid[1]);
    g.lh = static_cast<int>(size[0]), g.lw = static_cast<int>(size[1]);
  }
  return g;
}

std::vector<int64_t> concrete(c10::SymIntArrayRef grid) {
  std::vector<int64_t> out;
  for (const c10::SymInt& v : grid) out.push_back(v.expect_int());
  return out;
}

int blocks_for(int64_t total) {
  return static_cast<int>(std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t(1) << 20));
}

at::Tensor landmarks_cuda(const at::Tensor& x, c10::SymIntArrayRef grid, at::IntArrayRef size,
                          c10::SymInt prefix_) {
  const std::vector<int64_t> grid_ = concrete(grid);
  checks::landmarks(x, grid_, size, prefix_.expect_int());
  TORCH_CHECK(x.is_cuda(), "crosshead::landmarks: x must be a CUDA tensor, got device ", x.device());
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), H = x.size(1), N = x.size(2), d = x.size(3);
  PoolGeom g = geometry(N, grid_, size, prefix_.expect_int());
  const int64_t L = int64_t(g.lh) * g.lw;
  at::Tensor out = at::empty({B, H, L, d}, x.options());
  const int64_t total = out.numel();
  if (total == 0) return out;
  dispatch_float_types(x.scalar_type(), "landmarks (x)", [&](auto tag) {
    using T = decltype(tag);
    launch_kernel<landmarks_kernel<T>>(
        blocks_for(total), kThreads, 0, at::cuda::getCurrentCUDAStream(), static_cast<const T*>(x.data_ptr()),
        x.stride(0), x.stride(1), x.stride(2), x.stride(3), static_cast<T*>(out.data_ptr()), total,
        static_cast<int>(H), static_cast<int>(d), g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor landmarks_backward_cuda(const at::Tensor& grad, c10::SymInt num_tokens, c10::SymIntArrayRef grid,
                                   at::IntArrayRef size, c10::SymInt prefix_) {
  const std::vector<int64_t> grid_ = concrete(grid);
  const int64_t n_tok = num_tokens.expect_int();
  checks::landmarks_backward(grad, n_tok, grid_, size, prefix_.expect_int());
  TORCH_CHECK(grad.is_cuda(), "crosshead::landmarks_backward: grad must be a CUDA tensor, got device ", grad.device());
  c10::cuda::CUDAGuard guard(grad.device());
  const int64_t B = grad.size(0), H = grad.size(1), d = grad.size(3);
  PoolGeom g = geometry(n_tok, grid_, size, prefix_.expect_int());
  at::Tensor out = at::empty({B, H, n_tok, d}, grad.options());
  const int64_t total = out.numel();
  if (total == 0) return out;
  dispatch_float_types(grad.scalar_type(), "landmarks_backward (grad)", [&](auto tag) {
    using T = decltype(tag);
    launch_kernel<landmarks_backward_kernel<T>>(
        blocks_for(total), kThreads, 0, at::cuda::getCurrentCUDAStream(), static_cast<const T*>(grad.data_ptr()),
        grad.stride(0), grad.stride(1), grad.stride(2), grad.stride(3), static_cast<T*>(out.data_ptr()), total,
        static_cast<int>(H), static_cast<int>(n_tok), static_cast<int>(d), g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(crosshead, CUDA, m) {
  m.impl("landmarks", &landmarks_cuda);
  m.impl("landmarks_backward", &landmarks_backward_cuda);
}

}  // namespace crosshead
