// Fixed-order reductions of the per-split partials the side kernels write (instead of float
// atomics), so every result is bitwise reproducible run to run.
#include "cuda/common.cuh"
#include "cuda/sides.h"

namespace crosshead {
namespace {

template <typename T>
__global__ void reduce_splits_kernel(const float* __restrict__ part, T* __restrict__ out, int64_t O, int S,
                                     int64_t I, float alpha) {
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < O * I;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t o = idx / I, i = idx - o * I;
    const float* p = part + o * S * I + i;
    float s = 0.f;
    for (int j = 0; j < S; ++j) s += p[j * I];
    out[idx] = from_f<T>(alpha * s);
  }
}

// Merges (max, Σexp) pairs: lse = m + log Σ_j s_j·exp(m_j - m), m = max_j m_j.
__global__ void reduce_logsumexp_kernel(const float* __restrict__ pm, const float* __restrict__ ps,
                                        float* __restrict__ lse, int64_t O, int S, int64_t I) {
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < O * I;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t o = idx / I, i = idx - o * I, base = o * S * I + i;
    float m = -INFINITY;
    for (int j = 0; j < S; ++j) m = fmaxf(m, pm[base + j * I]);
    float s = 0.f;
    for (int j = 0; j < S; ++j) {
      const float mj = pm[base + j * I];
      if (mj != -INFINITY) s += ps[base + j * I] * __expf(mj - m);  // a split whose row is all -inf adds 0
    }
    // an all -inf row gives -inf (torch.logsumexp), not -inf - -inf = NaN
    lse[idx] = m == -INFINITY ? -INFINITY : m + __logf(s);
  }
}

int blocks(int64_t n) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, 1 << 16)));
}

}  // namespace

void reduce_splits(const at::Tensor& part, double alpha, at::Tensor& out) {
  TORCH_INTERNAL_ASSERT(part.dim() == 3 && part.is_contiguous() && part.scalar_type() == at::kFloat);
  TORCH_INTERNAL_ASSERT(out.is_contiguous() && out.numel() == part.size(0) * part.size(2));
  const int64_t O = part.size(0), S = part.size(1), I = part.size(2);
  if (out.numel() == 0) return;
  dispatch_float_types(out.scalar_type(), "reduce", [&](auto tag) {
    using T = decltype(tag);
    launch_kernel<reduce_splits_kernel<T>>(blocks(O * I), kThreads, 0, at::cuda::getCurrentCUDAStream(),
                                           part.data_ptr<float>(), static_cast<T*>(out.data_ptr()), O,
                                           static_cast<int>(S), I, static_cast<float>(alpha));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void reduce_logsumexp(const at::Tensor& part_m, const at::Tensor& part_s, at::Tensor& lse) {
  TORCH_INTERNAL_ASSERT(part_m.dim() == 3 && part_m.is_contiguous() && part_s.is_contiguous());
  TORCH_INTERNAL_ASSERT(lse.is_contiguous() && lse.scalar_type() == at::kFloat);
  const int64_t O = part_m.size(0), S = part_m.size(1), I = part_m.size(2);
  if (lse.numel() == 0) return;
  launch_kernel<reduce_logsumexp_kernel>(blocks(O * I), kThreads, 0, at::cuda::getCurrentCUDAStream(),
                                         part_m.data_ptr<float>(), part_s.data_ptr<float>(), lse.data_ptr<float>(),
                                         O, static_cast<int>(S), I);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace crosshead
