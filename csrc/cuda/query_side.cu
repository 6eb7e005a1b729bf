// Query side of iMHSA (imhsa.md, "Query side"): S_Q = scale·q·k_landᵀ, softmax over L, head
// mixing, out = Â_Q·Z; and its backward. Everything is local to a token except the sums over N
// (dZ, dk_land, dw_q), which go to per-split partials reduced afterwards in a fixed order.
// Maps in shared memory are [h][n][l] for a tile of TN tokens; a softmax row is (h, n).
#include "cuda/common.cuh"
#include "cuda/sides.h"

namespace crosshead {
namespace {

// row <- exp(row - lse) in place over its L entries; returns lse (stable, float32).
__device__ __forceinline__ float softmax_row(float* row, int L) {
  float m = -INFINITY;
  for (int l = 0; l < L; ++l) m = fmaxf(m, row[l]);
  float s = 0.f;
  for (int l = 0; l < L; ++l) s += __expf(row[l] - m);
  const float lse = m + __logf(s);
  for (int l = 0; l < L; ++l) row[l] = __expf(row[l] - lse);
  return lse;
}

// S_Q for all heads of the tile into M[h][n][l], staging q one head at a time.
template <typename T, bool kTC>
__device__ void query_scores(float* M, float* Xs, const SideParams& p, int b, int n0, int nv) {
  const int mapsz = p.tn * p.L;
  const T* q = static_cast<const T*>(p.x.ptr) + b * p.x.sb + n0 * p.x.sn;
  for (int h = 0; h < p.H; ++h) {
    __syncthreads();
    stage_tokens(Xs, q + h * p.x.sh, p.x.sn, nv, p.d);
    __syncthreads();
    tile_dots<kTC>(M + h * mapsz, Xs, p.land + (int64_t(b) * p.H + h) * p.L * p.d, nv, p.L, p.d, p.scale);
  }
  __syncthreads();
}

// Forward: one CTA per (tile, b). Writes out (B, H, N, d) and lse_q (B, H, N).
template <typename T, bool kTC>
__global__ void __launch_bounds__(kThreads) query_forward_kernel(SideParams p) {
  extern __shared__ __align__(16) float sm[];
  const int H = p.H, L = p.L, d = p.d, mapsz = p.tn * L;
  float* Xs = sm;  // first: 16-byte aligned for the float4 path
  float* M = Xs + p.tn * xs_ld(d);
  float* ws = M + H * mapsz;
  const int b = blockIdx.y, n0 = blockIdx.x * p.tn, nv = min(p.tn, p.N - n0);
  const bool has_w = p.w != nullptr;
  load_weights(ws, p.w, H);
  query_scores<T, kTC>(M, Xs, p, b, n0, nv);
  if (p.pre && has_w) {  // pre: mix the logits, then softmax the mixed rows
    mix_heads<false>(M, mapsz, nv * L, ws, H);
    __syncthreads();
  }
  for (int r = threadIdx.x; r < H * nv; r += blockDim.x) {
    const int h = r / nv, n = r - h * nv;
    p.lse_out[(int64_t(b) * H + h) * p.N + n0 + n] = softmax_row(M + h * mapsz + n * L, L);
  }
  __syncthreads();
  if (!p.pre && has_w) {  // post: mix the probabilities
    mix_heads<false>(M, mapsz, nv * L, ws, H);
    __syncthreads();
  }
  T* out = static_cast<T*>(p.out);
  for (int g = 0; g < H; ++g) {
    const int64_t bg = int64_t(b) * H + g;
    tile_tokens_out<kTC>(out + (bg * p.N + n0) * d, d, M + g * mapsz, p.lval + bg * L * d, nv, L, d, 1.f);
  }
}

// Backward: one CTA per (split, b), looping over its tiles. Maps: P (post: probabilities per
// head; pre: the logits S), A (Â_Q; aliases P in post mode without w), G (dÂ_Q, then dS_Q).
template <typename T, bool kTC>
__global__ void __launch_bounds__(kThreads) query_backward_kernel(SideParams p, int splits) {
  extern __shared__ __align__(16) float sm[];
  const int H = p.H, L = p.L, d = p.d, mapsz = p.tn * L;
  float* Xs = sm;  // first: 16-byte aligned for the float4 path
  float* P = Xs + p.tn * xs_ld(d);
  float* A = P + H * mapsz;
  float* G = A + H * mapsz;
  float* ws = G + H * mapsz;
  float* wacc = ws + H * H;
  const int split = blockIdx.x, b = blockIdx.y;
  const bool has_w = p.w != nullptr;
  float* Aeff = (!p.pre && !has_w) ? P : A;
  load_weights(ws, p.w, H);
  for (int e = threadIdx.x; e < H * H; e += blockDim.x) wacc[e] = 0.f;
  const int64_t part_base = (int64_t(b) * splits + split) * H;
  const T* dout = static_cast<const T*>(p.y.ptr) + b * p.y.sb;
  const T* q = static_cast<const T*>(p.x.ptr) + b * p.x.sb;
  T* dq = static_cast<T*>(p.out);
  const int t0 = split * p.per_split, t1 = min(p.tiles, t0 + p.per_split);
  for (int t = t0; t < t1; ++t) {
    const bool first = t == t0;
    const int n0 = t * p.tn, nv = min(p.tn, p.N - n0), cnt = nv * L;
    const float* lse = p.lse + int64_t(b) * H * p.N + n0;
    query_scores<T, kTC>(P, Xs, p, b, n0, nv);
    // Recompute Â_Q from the logits and the saved lse_q.
    if (!p.pre) {
      for (int e = threadIdx.x; e < H * cnt; e += blockDim.x) {
        const int h = e / cnt, r = e - h * cnt, n = r / L;
        P[h * mapsz + r] = __expf(P[h * mapsz + r] - lse[int64_t(h) * p.N + n]);
      }
      __syncthreads();
      if (has_w) mix_heads_to(A, P, mapsz, cnt, ws, H);
    } else {
      if (has_w) {
        mix_heads_to(A, P, mapsz, cnt, ws, H);
        __syncthreads();
      }
      const float* src = has_w ? A : P;
      for (int e = threadIdx.x; e < H * cnt; e += blockDim.x) {
        const int g = e / cnt, r = e - g * cnt, n = r / L;
        A[g * mapsz + r] = __expf(src[g * mapsz + r] - lse[int64_t(g) * p.N + n]);
      }
    }
    // dÂ_Q[g] = dout[g]·Z[g]ᵀ; partial dZ[g] += Â_Q[g]ᵀ·dout[g].
    for (int g = 0; g < H; ++g) {
      const int64_t bg = int64_t(b) * H + g;
      __syncthreads();
      stage_tokens(Xs, dout + g * p.y.sh + n0 * p.y.sn, p.y.sn, nv, d);
      __syncthreads();
      tile_dots<kTC>(G + g * mapsz, Xs, p.lval + bg * L * d, nv, L, d, 1.f);
      tile_landmark_acc<kTC>(p.part + (part_base + g) * L * d, Aeff + g * mapsz, Xs, nv, L, d, 1.f, first);
    }
    __syncthreads();
    // Softmax and mixing adjoints (reference _side_backward), G becomes dS_Q.
    if (!p.pre) {
      if (has_w) {
        tile_weight_grad(wacc, G, P, mapsz, nv, L, H);  // dw[g,h] += Σ dÂ[g]·P[h]
        __syncthreads();
        mix_heads<true>(G, mapsz, cnt, ws, H);  // dP = mixᵀ(dÂ)
        __syncthreads();
      }
      for (int r = threadIdx.x; r < H * nv; r += blockDim.x) {
        const int h = r / nv, n = r - h * nv;
        float* gr = G + h * mapsz + n * L;
        const float* pr = P + h * mapsz + n * L;
        float D = 0.f;
        for (int l = 0; l < L; ++l) D = fmaf(gr[l], pr[l], D);
        for (int l = 0; l < L; ++l) gr[l] = pr[l] * (gr[l] - D);
      }
    } else {
      for (int r = threadIdx.x; r < H * nv; r += blockDim.x) {
        const int g = r / nv, n = r - g * nv;
        float* gr = G + g * mapsz + n * L;
        const float* ar = A + g * mapsz + n * L;
        float D = 0.f;
        for (int l = 0; l < L; ++l) D = fmaf(gr[l], ar[l], D);
        for (int l = 0; l < L; ++l) gr[l] = ar[l] * (gr[l] - D);
      }
      if (has_w) {
        __syncthreads();
        tile_weight_grad(wacc, G, P, mapsz, nv, L, H);  // dw[g,h] += Σ dM[g]·S[h]
        __syncthreads();
        mix_heads<true>(G, mapsz, cnt, ws, H);  // dS = mixᵀ(dM)
      }
    }
    // dq[h] = scale·dS[h]·k_land[h]; partial dk_land[h] += scale·dS[h]ᵀ·q[h].
    logit_grads_out<kTC>(p, dq, q, p.part2, G, Xs, b, n0, nv, part_base, first);
  }
  if (has_w) store_weight_partial(p, wacc, part_base);
}

SideParams base_params(const at::Tensor& q, const at::Tensor& k_land_f, const at::Tensor& z,
                       const at::Tensor& w_f, bool pre, double scale) {
  SideParams p{};
  p.x = token_view(q);
  p.land = k_land_f.data_ptr<float>();
  p.lval = z.data_ptr<float>();
  p.w = w_f.defined() ? w_f.data_ptr<float>() : nullptr;
  p.B = q.size(0), p.H = q.size(1), p.N = q.size(2), p.d = q.size(3), p.L = k_land_f.size(2);
  p.scale = static_cast<float>(scale);
  p.pre = pre;
  return p;
}

}  // namespace

void query_side_forward(const at::Tensor& q, const at::Tensor& k_land_f, const at::Tensor& z,
                        const at::Tensor& w_q_f, bool pre, double scale, at::Tensor& out, at::Tensor& lse_q,
                        bool tensor_cores) {
  SideParams p = base_params(q, k_land_f, z, w_q_f, pre, scale);
  p.out = out.data_ptr();
  p.lse_out = lse_q.data_ptr<float>();
  p.tn = pick_tile(p.H, p.L, p.d, 1, p.H * p.H, p.N);
  const size_t smem = (size_t(p.H) * p.tn * p.L + size_t(p.tn) * xs_ld(p.d) + p.H * p.H) * sizeof(float);
  dim3 grid(ceil_div(p.N, p.tn), p.B);
  dispatch_float_types(q.scalar_type(), "imhsa (q)", [&](auto tag) {
    using T = decltype(tag);
    dispatch_tensor_cores<T>(tensor_cores, p.d, [&](auto tcv) {
      constexpr bool kTC = decltype(tcv)::value;
      set_smem(query_forward_kernel<T, kTC>, smem);
      launch_kernel<query_forward_kernel<T, kTC>>(grid, kThreads, smem, at::cuda::getCurrentCUDAStream(), p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void query_side_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k_land_f,
                         const at::Tensor& z, const at::Tensor& w_q_f, const at::Tensor& lse_q, bool pre,
                         double scale, at::Tensor& dq, at::Tensor& dz, at::Tensor& dk_land, at::Tensor& dw_q,
                         bool tensor_cores) {
  SideParams p = base_params(q, k_land_f, z, w_q_f, pre, scale);
  p.y = token_view(grad_out);
  p.lse = lse_q.data_ptr<float>();
  p.out = dq.data_ptr();
  const int H = p.H, L = p.L, d = p.d;
  const int tn = pick_tile(H, L, d, 3, 2 * H * H, p.N);
  const size_t smem = (3 * size_t(H) * tn * L + size_t(tn) * xs_ld(d) + 2 * H * H) * sizeof(float);
  int occupancy = 0;
  dispatch_kernel_types(q.scalar_type(), "imhsa_backward (q)", tensor_cores, d, [&](auto tag, auto tcv) {
    occupancy = resident_ctas(query_backward_kernel<decltype(tag), decltype(tcv)::value>, smem);
  });
  Splits s = pick_splits(p.B, p.N, tn, 2 * int64_t(H) * L * d + H * H, occupancy);
  p.tn = tn, p.tiles = s.tiles, p.per_split = s.per_split;
  auto fopt = q.options().dtype(at::kFloat);
  at::Tensor part_dz = at::empty({p.B, s.splits, int64_t(H) * L * d}, fopt);
  at::Tensor part_dkl = at::empty({p.B, s.splits, int64_t(H) * L * d}, fopt);
  at::Tensor part_w = at::empty({p.w ? p.B : 0, s.splits, int64_t(H) * H}, fopt);
  p.part = part_dz.data_ptr<float>();
  p.part2 = part_dkl.data_ptr<float>();
  p.part_w = p.w ? part_w.data_ptr<float>() : nullptr;
  dim3 grid(s.splits, p.B);
  dispatch_float_types(q.scalar_type(), "imhsa_backward (q)", [&](auto tag) {
    using T = decltype(tag);
    dispatch_tensor_cores<T>(tensor_cores, d, [&](auto tcv) {
      constexpr bool kTC = decltype(tcv)::value;
      launch_kernel<query_backward_kernel<T, kTC>>(grid, kThreads, smem, at::cuda::getCurrentCUDAStream(), p,
                                                   s.splits);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  at::Tensor dz2 = dz.view({p.B, int64_t(H) * L * d});
  reduce_splits(part_dz, 1.0, dz2);
  at::Tensor dkl2 = dk_land.view({p.B, int64_t(H) * L * d});
  reduce_splits(part_dkl, 1.0, dkl2);
  if (p.w) {
    at::Tensor dw2 = dw_q.view({1, int64_t(H) * H});
    reduce_splits(part_w.view({1, p.B * s.splits, int64_t(H) * H}), 1.0, dw2);
  }
}

}  // namespace crosshead
