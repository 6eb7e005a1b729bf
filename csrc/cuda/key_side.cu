// Key side of iMHSA (imhsa.md, "Key side"): S_K = scale·q_land·kᵀ, softmax over N, head mixing,
// Z = Â_K·v; and its backward. The softmax runs over N, so the forward takes two passes over the
// tokens: (1) per-split (max, Σexp) of each (head, landmark) row, reduced to lse_k; (2) Â_K from
// lse_k, accumulated into per-split partial Z, reduced in a fixed order. Maps in shared memory
// are [h][n][l] for a tile of TN tokens (the transpose of the L×N map); a softmax row is (h, l).
#include "cuda/common.cuh"
#include "cuda/sides.h"

namespace crosshead {
namespace {

// S_K for all heads of the tile into M[h][n][l], staging k one head at a time.
template <typename T, bool kTC>
__device__ void key_scores(float* M, float* Xs, const SideParams& p, int b, int n0, int nv) {
  const int mapsz = p.tn * p.L;
  const T* k = static_cast<const T*>(p.x.ptr) + b * p.x.sb + n0 * p.x.sn;
  for (int h = 0; h < p.H; ++h) {
    __syncthreads();
    stage_tokens(Xs, k + h * p.x.sh, p.x.sn, nv, p.d);
    __syncthreads();
    tile_dots<kTC>(M + h * mapsz, Xs, p.land + (int64_t(b) * p.H + h) * p.L * p.d, nv, p.L, p.d, p.scale);
  }
  __syncthreads();
}

// M[h][n][l] <- exp(src[h][n][l] - lse[h][l]) for n < nv (src may be M).
__device__ inline void exp_minus_lse(float* M, const float* src, const float* __restrict__ lse, int mapsz,
                                     int cnt, int L, int H) {
  for (int e = threadIdx.x; e < H * cnt; e += blockDim.x) {
    const int h = e / cnt, r = e - h * cnt, l = r % L;
    M[h * mapsz + r] = __expf(src[h * mapsz + r] - __ldg(lse + h * L + l));
  }
}

// Pass 1: per split, the running (max, Σexp) over its tokens of each row (g, l) of the logits
// (post) or of the mixed logits (pre).
template <typename T, bool kTC>
__global__ void __launch_bounds__(kThreads) key_stats_kernel(SideParams p, int splits) {
  extern __shared__ __align__(16) float sm[];
  const int H = p.H, L = p.L, mapsz = p.tn * L;
  float* Xs = sm;  // first: 16-byte aligned for the float4 path
  float* M = Xs + p.tn * xs_ld(p.d);
  float* ws = M + H * mapsz;
  float* rm = ws + H * H;
  float* rs = rm + H * L;
  const int split = blockIdx.x, b = blockIdx.y;
  load_weights(ws, p.w, H);
  for (int e = threadIdx.x; e < H * L; e += blockDim.x) rm[e] = -INFINITY, rs[e] = 0.f;
  const int t0 = split * p.per_split, t1 = min(p.tiles, t0 + p.per_split);
  for (int t = t0; t < t1; ++t) {
    const int n0 = t * p.tn, nv = min(p.tn, p.N - n0);
    key_scores<T, kTC>(M, Xs, p, b, n0, nv);
    if (p.pre && p.w) {
      mix_heads<false>(M, mapsz, nv * L, ws, H);
      __syncthreads();
    }
    for (int e = threadIdx.x; e < H * L; e += blockDim.x) {  // owner of (g, l) is fixed
      const float* col = M + (e / L) * mapsz + (e % L);
      float mt = -INFINITY;
      for (int n = 0; n < nv; ++n) mt = fmaxf(mt, col[n * L]);
      float st = 0.f;  // a row that is -inf over the whole tile adds nothing (not exp(-inf - -inf) = NaN)
      if (mt != -INFINITY) {
        for (int n = 0; n < nv; ++n) st += __expf(col[n * L] - mt);
      }
      const float m = fmaxf(rm[e], mt);
      rs[e] = m == -INFINITY ? 0.f : rs[e] * __expf(rm[e] - m) + st * __expf(mt - m);
      rm[e] = m;
    }
  }
  const int64_t base = (int64_t(b) * splits + split) * H * L;
  for (int e = threadIdx.x; e < H * L; e += blockDim.x) p.part_m[base + e] = rm[e], p.part_s[base + e] = rs[e];
}

// Pass 2: Â_K for the tile from lse_k, partial Z[g] += Â_K[g]·v[g] over the split's tokens.
template <typename T, bool kTC>
__global__ void __launch_bounds__(kThreads) key_z_kernel(SideParams p, int splits) {
  extern __shared__ __align__(16) float sm[];
  const int H = p.H, L = p.L, d = p.d, mapsz = p.tn * L;
  float* Xs = sm;  // first: 16-byte aligned for the float4 path
  float* M = Xs + p.tn * xs_ld(d);
  float* ws = M + H * mapsz;
  const int split = blockIdx.x, b = blockIdx.y;
  const bool has_w = p.w != nullptr;
  load_weights(ws, p.w, H);
  const float* lse = p.lse + int64_t(b) * H * L;
  const T* v = static_cast<const T*>(p.y.ptr) + b * p.y.sb;
  const int64_t part_base = (int64_t(b) * splits + split) * H;
  const int t0 = split * p.per_split, t1 = min(p.tiles, t0 + p.per_split);
  for (int t = t0; t < t1; ++t) {
    const int n0 = t * p.tn, nv = min(p.tn, p.N - n0), cnt = nv * L;
    key_scores<T, kTC>(M, Xs, p, b, n0, nv);
    if (!p.pre) {  // post: Â = mix(exp(S - lse))
      exp_minus_lse(M, M, lse, mapsz, cnt, L, H);
      if (has_w) {
        __syncthreads();
        mix_heads<false>(M, mapsz, cnt, ws, H);
      }
    } else {  // pre: Â = exp(mix(S) - lse)
      if (has_w) {
        mix_heads<false>(M, mapsz, cnt, ws, H);
        __syncthreads();
      }
      exp_minus_lse(M, M, lse, mapsz, cnt, L, H);
    }
    for (int g = 0; g < H; ++g) {
      __syncthreads();
      stage_tokens(Xs, v + g * p.y.sh + n0 * p.y.sn, p.y.sn, nv, d);
      __syncthreads();
      tile_landmark_acc<kTC>(p.part + (part_base + g) * L * d, M + g * mapsz, Xs, nv, L, d, 1.f, t == t0);
    }
  }
}

// Backward pass 1 (post mode with w only): D[h][l] = Σ_n P[h][l][n]·dP[h][l][n], the rowsum term
// of the softmax Jacobian over N, per split. (Without w, or in pre mode, D = rowsum(dZ ∘ Z).)
template <typename T, bool kTC>
__global__ void __launch_bounds__(kThreads) key_rowsum_kernel(SideParams p, int splits) {
  extern __shared__ __align__(16) float sm[];
  const int H = p.H, L = p.L, d = p.d, mapsz = p.tn * L;
  float* Xs = sm;  // first: 16-byte aligned for the float4 path
  float* P = Xs + p.tn * xs_ld(d);
  float* G = P + H * mapsz;
  float* ws = G + H * mapsz;
  float* Dacc = ws + H * H;
  const int split = blockIdx.x, b = blockIdx.y;
  load_weights(ws, p.w, H);
  for (int e = threadIdx.x; e < H * L; e += blockDim.x) Dacc[e] = 0.f;
  const float* lse = p.lse + int64_t(b) * H * L;
  const T* v = static_cast<const T*>(p.y.ptr) + b * p.y.sb;
  const int t0 = split * p.per_split, t1 = min(p.tiles, t0 + p.per_split);
  for (int t = t0; t < t1; ++t) {
    const int n0 = t * p.tn, nv = min(p.tn, p.N - n0), cnt = nv * L;
    key_scores<T, kTC>(P, Xs, p, b, n0, nv);
    exp_minus_lse(P, P, lse, mapsz, cnt, L, H);
    for (int g = 0; g < H; ++g) {  // dÂ_K[g] = dZ[g]·v[g]ᵀ
      __syncthreads();
      stage_tokens(Xs, v + g * p.y.sh + n0 * p.y.sn, p.y.sn, nv, d);
      __syncthreads();
      tile_dots<kTC>(G + g * mapsz, Xs, p.lval + (int64_t(b) * H + g) * L * d, nv, L, d, 1.f);
    }
    __syncthreads();
    mix_heads<true>(G, mapsz, cnt, ws, H);  // dP = mixᵀ(dÂ)
    __syncthreads();
    for (int e = threadIdx.x; e < H * L; e += blockDim.x) {
      const int off = (e / L) * mapsz + (e % L);
      float s = 0.f;
      for (int n = 0; n < nv; ++n) s = fmaf(P[off + n * L], G[off + n * L], s);
      Dacc[e] += s;
    }
  }
  const int64_t base = (int64_t(b) * splits + split) * H * L;
  for (int e = threadIdx.x; e < H * L; e += blockDim.x) p.part_m[base + e] = Dacc[e];
}

// Backward pass 2: per tile recompute P/Â_K, dÂ_K = dZ·vᵀ, dv = Â_Kᵀ·dZ, the softmax and mixing
// adjoints (dS_K), dk = scale·dS_Kᵀ·q_land; partial dq_land += scale·dS_K·k and dw_k.
// Maps: P (post: probabilities; pre: logits S), A (Â_K; aliases P in post mode without w), G.
template <typename T, bool kTC>
__global__ void __launch_bounds__(kThreads) key_backward_kernel(SideParams p, int splits) {
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
  const float* lse = p.lse + int64_t(b) * H * L;
  const float* D = p.D + int64_t(b) * H * L;
  const T* k = static_cast<const T*>(p.x.ptr) + b * p.x.sb;
  const T* v = static_cast<const T*>(p.y.ptr) + b * p.y.sb;
  T* dk = static_cast<T*>(p.out);
  T* dv = static_cast<T*>(p.out2);
  const int64_t part_base = (int64_t(b) * splits + split) * H;
  const int t0 = split * p.per_split, t1 = min(p.tiles, t0 + p.per_split);
  for (int t = t0; t < t1; ++t) {
    const bool first = t == t0;
    const int n0 = t * p.tn, nv = min(p.tn, p.N - n0), cnt = nv * L;
    key_scores<T, kTC>(P, Xs, p, b, n0, nv);
    if (!p.pre) {
      exp_minus_lse(P, P, lse, mapsz, cnt, L, H);
      if (has_w) {
        __syncthreads();
        mix_heads_to(A, P, mapsz, cnt, ws, H);
      }
    } else {
      if (has_w) {
        mix_heads_to(A, P, mapsz, cnt, ws, H);
        __syncthreads();
      }
      exp_minus_lse(A, has_w ? A : P, lse, mapsz, cnt, L, H);
    }
    for (int g = 0; g < H; ++g) {
      const int64_t bg = int64_t(b) * H + g;
      __syncthreads();
      stage_tokens(Xs, v + g * p.y.sh + n0 * p.y.sn, p.y.sn, nv, d);
      __syncthreads();
      tile_dots<kTC>(G + g * mapsz, Xs, p.lval + bg * L * d, nv, L, d, 1.f);  // dÂ_K[g] = dZ[g]·v[g]ᵀ
      tile_tokens_out<kTC>(dv + (bg * p.N + n0) * d, d, Aeff + g * mapsz, p.lval + bg * L * d, nv, L, d, 1.f);
    }
    __syncthreads();
    if (!p.pre) {
      if (has_w) {
        tile_weight_grad(wacc, G, P, mapsz, nv, L, H);  // dw[g,h] += Σ dÂ[g]·P[h]
        __syncthreads();
        mix_heads<true>(G, mapsz, cnt, ws, H);  // dP = mixᵀ(dÂ)
        __syncthreads();
      }
      for (int e = threadIdx.x; e < H * cnt; e += blockDim.x) {  // dS = P·(dP - D)
        const int h = e / cnt, r = e - h * cnt, l = r % L;
        G[h * mapsz + r] = P[h * mapsz + r] * (G[h * mapsz + r] - __ldg(D + h * L + l));
      }
    } else {
      for (int e = threadIdx.x; e < H * cnt; e += blockDim.x) {  // dM = Â·(dÂ - D)
        const int g = e / cnt, r = e - g * cnt, l = r % L;
        G[g * mapsz + r] = A[g * mapsz + r] * (G[g * mapsz + r] - __ldg(D + g * L + l));
      }
      if (has_w) {
        __syncthreads();
        tile_weight_grad(wacc, G, P, mapsz, nv, L, H);  // dw[g,h] += Σ dM[g]·S[h]
        __syncthreads();
        mix_heads<true>(G, mapsz, cnt, ws, H);  // dS = mixᵀ(dM)
      }
    }
    logit_grads_out<kTC>(p, dk, k, p.part, G, Xs, b, n0, nv, part_base, first);
  }
  if (has_w) store_weight_partial(p, wacc, part_base);
}

SideParams base_params(const at::Tensor& k, const at::Tensor& v, const at::Tensor& q_land_f,
                       const at::Tensor& w_f, bool pre, double scale) {
  SideParams p{};
  p.x = token_view(k);
  p.y = token_view(v);
  p.land = q_land_f.data_ptr<float>();
  p.w = w_f.defined() ? w_f.data_ptr<float>() : nullptr;
  p.B = k.size(0), p.H = k.size(1), p.N = k.size(2), p.d = k.size(3), p.L = q_land_f.size(2);
  p.scale = static_cast<float>(scale);
  p.pre = pre;
  return p;
}

size_t smem_bytes(const SideParams& p, int maps, int64_t fixed) {
  return (size_t(maps) * p.H * p.tn * p.L + size_t(p.tn) * xs_ld(p.d) + fixed) * sizeof(float);
}

}  // namespace

void key_side_forward(const at::Tensor& k, const at::Tensor& v, const at::Tensor& q_land_f,
                      const at::Tensor& w_k_f, bool pre, double scale, at::Tensor& z, at::Tensor& lse_k,
                      bool tensor_cores) {
  SideParams p = base_params(k, v, q_land_f, w_k_f, pre, scale);
  const int H = p.H, L = p.L, d = p.d;
  const int64_t fixed = int64_t(H) * H + 2 * int64_t(H) * L;
  p.tn = pick_tile(H, L, d, 1, fixed, p.N);
  const size_t smem1 = smem_bytes(p, 1, fixed), smem2 = smem_bytes(p, 1, int64_t(H) * H);
  int occupancy = 0;  // both passes run on the same splits
  dispatch_kernel_types(k.scalar_type(), "imhsa (k)", tensor_cores, d, [&](auto tag, auto tcv) {
    using T = decltype(tag);
    constexpr bool kTC = decltype(tcv)::value;
    occupancy = std::min(resident_ctas(key_stats_kernel<T, kTC>, smem1), resident_ctas(key_z_kernel<T, kTC>, smem2));
  });
  Splits s = pick_splits(p.B, p.N, p.tn, int64_t(H) * L * d, occupancy);
  p.tiles = s.tiles, p.per_split = s.per_split;
  auto fopt = k.options().dtype(at::kFloat);
  at::Tensor part_m = at::empty({p.B, s.splits, int64_t(H) * L}, fopt);
  at::Tensor part_s = at::empty({p.B, s.splits, int64_t(H) * L}, fopt);
  at::Tensor part_z = at::empty({p.B, s.splits, int64_t(H) * L * d}, fopt);
  p.part_m = part_m.data_ptr<float>();
  p.part_s = part_s.data_ptr<float>();
  p.part = part_z.data_ptr<float>();
  p.lse = lse_k.data_ptr<float>();
  dim3 grid(s.splits, p.B);
  auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor lse2 = lse_k.view({p.B, int64_t(H) * L});
  dispatch_float_types(k.scalar_type(), "imhsa (k)", [&](auto tag) {
    using T = decltype(tag);
    dispatch_tensor_cores<T>(tensor_cores, d, [&](auto tcv) {  // one path for both passes
      constexpr bool kTC = decltype(tcv)::value;
      launch_kernel<key_stats_kernel<T, kTC>>(grid, kThreads, smem1, stream, p, s.splits);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      reduce_logsumexp(part_m, part_s, lse2);
      launch_kernel<key_z_kernel<T, kTC>>(grid, kThreads, smem2, stream, p, s.splits);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  at::Tensor z2 = z.view({p.B, int64_t(H) * L * d});
  reduce_splits(part_z, 1.0, z2);
}

void key_side_backward(const at::Tensor& k, const at::Tensor& v, const at::Tensor& q_land_f,
                       const at::Tensor& w_k_f, const at::Tensor& z, const at::Tensor& dz,
                       const at::Tensor& lse_k, bool pre, double scale, at::Tensor& dk, at::Tensor& dv,
                       at::Tensor& dq_land, at::Tensor& dw_k, bool tensor_cores) {
  SideParams p = base_params(k, v, q_land_f, w_k_f, pre, scale);
  const int H = p.H, L = p.L, d = p.d;
  p.lval = dz.data_ptr<float>();
  p.lse = lse_k.data_ptr<float>();
  auto fopt = k.options().dtype(at::kFloat);
  auto stream = at::cuda::getCurrentCUDAStream();
  // The rowsum term of the softmax Jacobian over N (see key_rowsum_kernel).
  at::Tensor D;
  const bool rowsum_pass = !pre && p.w != nullptr;
  if (!rowsum_pass) {
    D = (dz * z).sum(-1).contiguous();  // Σ_n Â·dÂ = dZ·Z row by row
  } else {
    p.tn = pick_tile(H, L, d, 2, int64_t(H) * H + int64_t(H) * L, p.N);
    const size_t smem = smem_bytes(p, 2, int64_t(H) * H + int64_t(H) * L);
    at::Tensor part_d;
    dispatch_kernel_types(k.scalar_type(), "imhsa_backward (k)", tensor_cores, d, [&](auto tag, auto tcv) {
      using T = decltype(tag);
      constexpr bool kTC = decltype(tcv)::value;
      Splits s = pick_splits(p.B, p.N, p.tn, int64_t(H) * L, resident_ctas(key_rowsum_kernel<T, kTC>, smem));
      p.tiles = s.tiles, p.per_split = s.per_split;
      part_d = at::empty({p.B, s.splits, int64_t(H) * L}, fopt);
      p.part_m = part_d.data_ptr<float>();
      launch_kernel<key_rowsum_kernel<T, kTC>>(dim3(s.splits, p.B), kThreads, smem, stream, p, s.splits);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    D = at::empty({p.B, H, L}, fopt);
    at::Tensor D2 = D.view({p.B, int64_t(H) * L});
    reduce_splits(part_d, 1.0, D2);
  }
  p.D = D.data_ptr<float>();
  p.tn = pick_tile(H, L, d, 3, 2 * int64_t(H) * H, p.N);
  const size_t smem = smem_bytes(p, 3, 2 * int64_t(H) * H);
  int occupancy = 0;
  dispatch_kernel_types(k.scalar_type(), "imhsa_backward (k)", tensor_cores, d, [&](auto tag, auto tcv) {
    occupancy = resident_ctas(key_backward_kernel<decltype(tag), decltype(tcv)::value>, smem);
  });
  Splits s = pick_splits(p.B, p.N, p.tn, int64_t(H) * L * d + H * H, occupancy);
  p.tiles = s.tiles, p.per_split = s.per_split;
  at::Tensor part_dql = at::empty({p.B, s.splits, int64_t(H) * L * d}, fopt);
  at::Tensor part_w = at::empty({p.w ? p.B : 0, s.splits, int64_t(H) * H}, fopt);
  p.part = part_dql.data_ptr<float>();
  p.part_w = p.w ? part_w.data_ptr<float>() : nullptr;
  p.out = dk.data_ptr();
  p.out2 = dv.data_ptr();
  dispatch_float_types(k.scalar_type(), "imhsa_backward (k)", [&](auto tag) {
    using T = decltype(tag);
    dispatch_tensor_cores<T>(tensor_cores, d, [&](auto tcv) {
      constexpr bool kTC = decltype(tcv)::value;
      launch_kernel<key_backward_kernel<T, kTC>>(dim3(s.splits, p.B), kThreads, smem, stream, p,
                                                 s.splits);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  at::Tensor dql2 = dq_land.view({p.B, int64_t(H) * L * d});
  reduce_splits(part_dql, 1.0, dql2);
  if (p.w) {
    at::Tensor dw2 = dw_k.view({1, int64_t(H) * H});
    reduce_splits(part_w.view({1, p.B * s.splits, int64_t(H) * H}), 1.0, dw2);
  }
}

}  // namespace crosshead
