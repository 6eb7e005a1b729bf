// Query side of the iMHSA forward, second generation (imhsa.md "Query side"; design in README.md,
// "Second generation"): one kernel reads q once and writes out once. A CTA owns TN = 16·warps
// tokens of one batch element for all heads; warp w owns tokens 16w..16w+15 of the tile.
//   1. per head h (q[h] and k_land[h] double-buffered with 16-byte cp.async): S_Q[h] = scale·q·k_landᵀ
//      on tensor cores (m16n8k16, ldmatrix), and in post mode the softmax over L in registers
//      (rows reduced across the quad by shuffles); P (post) or S (pre) stored in a float32 map;
//   2. per token row (warp-local): head mixing with w_q, and in pre mode the softmax of the mixed
//      logits across the warp;
//   3. per head g (Z[g] double-buffered): out[g] = Â_Q[g]·Z[g] on tensor cores, the A fragment
//      packed from the float32 map, the tile staged in shared memory for 16-byte stores.
// Nothing N×L leaves the chip; lse_q (B, h, N) is written for the backward.
#include "cuda/common.cuh"
#include "cuda/mma.cuh"
#include "cuda/sides.h"

namespace crosshead {
namespace {

constexpr int kMaxL = 64;          // landmarks served by this kernel
constexpr int kScoreNT = kMaxL / 8;  // n8 blocks of a score row

struct QueryFwdParams {
  const void* q;  // (B, H, N, D), unit stride over D, rows 16-byte aligned
  int64_t sb, sh, sn;
  const void* k_land;  // (B, H, L, D) contiguous, q's dtype
  const void* z;       // (B, H, L, D) contiguous, q's dtype
  const float* w;      // (H, H) or null (identity)
  void* out;           // (B, H, N, D) contiguous
  float* lse;          // (B, H, N)
  int H, N, L, warps;
  float scale;
  bool pre;
};

__host__ __device__ inline int round_up(int x, int m) { return (x + m - 1) / m * m; }

// Shared-memory carve-up, in bytes: token stage [2][TN][ld(D)] T (q, then the out tile), landmark
// stage [2][LP16][ld(D)] T (k_land, then Z), maps [H][TN][LP16 + 8] float32, w [H·H] float32.
struct QueryFwdLayout {
  int tn, lp8, lp16, ls;
  size_t land, maps, ws, total;
  __host__ __device__ QueryFwdLayout(int D, int H, int L, int warps) {
    tn = 16 * warps;
    lp8 = round_up(L, 8);
    lp16 = round_up(L, 16);
    ls = lp16 + 8;  // ≡ 8 (mod 32) banks or a multiple of 8 apart: float2 accesses of a half-warp hit distinct banks
    const size_t half = 2;
    land = 2 * size_t(tn) * mma::ld(D) * half;
    maps = land + 2 * size_t(lp16) * mma::ld(D) * half;
    ws = maps + size_t(H) * tn * ls * sizeof(float);
    total = ws + size_t(H) * H * sizeof(float);
  }
};

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T, int D, int HM>
__global__ void __launch_bounds__(128) query_forward_mma_kernel(QueryFwdParams p) {
  extern __shared__ __align__(16) unsigned char qf_smem[];
  const QueryFwdLayout lay(D, p.H, p.L, p.warps);
  const int H = p.H, L = p.L, TN = lay.tn, LS = lay.ls, nthreads = 32 * p.warps;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g4 = lane >> 2, t4 = lane & 3;
  const int b = blockIdx.y, n0 = blockIdx.x * TN, nv = min(TN, p.N - n0), row0 = 16 * warp;
  constexpr int LD = mma::ld(D);
  T* tok = reinterpret_cast<T*>(qf_smem);
  T* land = reinterpret_cast<T*>(qf_smem + lay.land);
  float* maps = reinterpret_cast<float*>(qf_smem + lay.maps);
  float* ws = reinterpret_cast<float*>(qf_smem + lay.ws);
  const bool has_w = p.w != nullptr;
  if (has_w) {
    for (int e = threadIdx.x; e < H * H; e += nthreads) ws[e] = p.w[e];
  }
  // Map columns [lp8, lp16) are read by the Â·Z product (K padded to 16) but never scored: zero.
  const int pad = lay.lp16 - lay.lp8;
  for (int e = threadIdx.x; e < H * TN * pad; e += nthreads) {
    const int r = e / pad;
    maps[r * LS + lay.lp8 + (e - r * pad)] = 0.f;
  }

  const T* q = static_cast<const T*>(p.q) + b * p.sb + n0 * p.sn;
  const T* kl = static_cast<const T*>(p.k_land) + int64_t(b) * H * L * D;
  auto stage_head = [&](int h, int buf) {
    mma::stage_rows<T, D>(tok + buf * TN * LD, q + h * p.sh, p.sn, TN, nv, nthreads);
    mma::stage_rows<T, D>(land + buf * lay.lp16 * LD, kl + h * L * D, D, lay.lp16, L, nthreads);
    ptx::cp_async_commit();
  };

  // 1. Scores per head, softmax over L in registers (post).
  stage_head(0, 0);
  for (int h = 0; h < H; ++h) {
    if (h + 1 < H) {
      stage_head(h + 1, (h + 1) & 1);
      ptx::cp_async_wait<1>();
    } else {
      ptx::cp_async_wait<0>();
    }
    __syncthreads();
    const T* qs = tok + (h & 1) * TN * LD + row0 * LD;
    const T* ks = land + (h & 1) * lay.lp16 * LD;
    float s[kScoreNT][4];
#pragma unroll
    for (int j = 0; j < kScoreNT; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
    for (int k0 = 0; k0 < D; k0 += 16) {
      uint32_t a[4];
      mma::load_a<T>(a, qs, LD, k0);
#pragma unroll
      for (int j = 0; j < kScoreNT; j += 2) {
        if (j * 8 < lay.lp8) {  // rows j·8..j·8+15 < lp16 of the stage: in bounds, zero past L
          uint32_t bb[4];
          mma::load_b_nk<T>(bb, ks, LD, j * 8, k0);
          const uint32_t b0[2] = {bb[0], bb[1]}, b1[2] = {bb[2], bb[3]};
          mma::mma16816<T>(s[j], a, b0);
          mma::mma16816<T>(s[j + 1], a, b1);
        }
      }
    }
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < kScoreNT; ++j) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const bool ok = j * 8 + 2 * t4 + (i & 1) < L;
        s[j][i] = ok ? s[j][i] * p.scale : -INFINITY;
        mx[i >> 1] = fmaxf(mx[i >> 1], s[j][i]);
      }
    }
    if (!p.pre) {  // softmax over the row's L entries: 4 lanes (a quad) share a row
      float sum[2] = {0.f, 0.f};
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      }
#pragma unroll
      for (int j = 0; j < kScoreNT; ++j) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          s[j][i] = s[j][i] == -INFINITY ? 0.f : __expf(s[j][i] - mx[i >> 1]);
          sum[i >> 1] += s[j][i];
        }
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        sum[r] += __shfl_xor_sync(0xffffffffu, sum[r], 1);
        sum[r] += __shfl_xor_sync(0xffffffffu, sum[r], 2);
        const int row = row0 + g4 + 8 * r;
        if (t4 == 0 && row < nv) p.lse[(int64_t(b) * H + h) * p.N + n0 + row] = mx[r] + __logf(sum[r]);
      }
      const float inv[2] = {1.f / sum[0], 1.f / sum[1]};
#pragma unroll
      for (int j = 0; j < kScoreNT; ++j) {
#pragma unroll
        for (int i = 0; i < 4; ++i) s[j][i] *= inv[i >> 1];
      }
    }
    float* mh = maps + (size_t(h) * TN + row0) * LS;
#pragma unroll
    for (int j = 0; j < kScoreNT; ++j) {
      if (j * 8 < lay.lp8) {
        const int c = j * 8 + 2 * t4;
        *reinterpret_cast<float2*>(mh + g4 * LS + c) = make_float2(s[j][0], s[j][1]);
        *reinterpret_cast<float2*>(mh + (g4 + 8) * LS + c) = make_float2(s[j][2], s[j][3]);
      }
    }
    __syncthreads();  // every warp is done with stage (h & 1) before it is refilled
  }

  const T* zb = static_cast<const T*>(p.z) + int64_t(b) * H * L * D;
  auto stage_z = [&](int g, int buf) {
    mma::stage_rows<T, D>(land + buf * lay.lp16 * LD, zb + g * L * D, D, lay.lp16, L, nthreads);
    ptx::cp_async_commit();
  };
  stage_z(0, 0);  // overlaps the mixing below

  // 2. Head mixing (and the pre-mode softmax) of this warp's 16 rows; lane owns columns lane, lane+32.
  if (has_w || p.pre) {
    for (int r = 0; r < 16; ++r) {
      float* mrow = maps + size_t(row0 + r) * LS;
      float x[2][HM];
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int l = lane + 32 * c;
#pragma unroll
        for (int h = 0; h < HM; ++h) x[c][h] = (h < H && l < L) ? mrow[size_t(h) * TN * LS + l] : 0.f;
      }
      if (has_w) {  // Â[g] = Σ_h w[g, h]·P[h] (post) or M[g] = Σ_h w[g, h]·S[h] (pre)
        float y[2][HM];
#pragma unroll
        for (int g = 0; g < HM; ++g) {
          float a0 = 0.f, a1 = 0.f;
#pragma unroll
          for (int h = 0; h < HM; ++h) {
            if (g < H && h < H) {
              const float wv = ws[g * H + h];
              a0 = fmaf(wv, x[0][h], a0);
              a1 = fmaf(wv, x[1][h], a1);
            }
          }
          y[0][g] = a0;
          y[1][g] = a1;
        }
#pragma unroll
        for (int g = 0; g < HM; ++g) x[0][g] = y[0][g], x[1][g] = y[1][g];
      }
      if (p.pre) {  // Â[g] = softmax_L(M[g]), the row spread over the warp
#pragma unroll
        for (int g = 0; g < HM; ++g) {
          if (g < H) {
            const bool ok0 = lane < L, ok1 = lane + 32 < L;
            const float m = warp_max(fmaxf(ok0 ? x[0][g] : -INFINITY, ok1 ? x[1][g] : -INFINITY));
            const float e0 = ok0 ? __expf(x[0][g] - m) : 0.f, e1 = ok1 ? __expf(x[1][g] - m) : 0.f;
            const float sum = warp_sum(e0 + e1);
            if (lane == 0 && row0 + r < nv) p.lse[(int64_t(b) * H + g) * p.N + n0 + row0 + r] = m + __logf(sum);
            x[0][g] = e0 / sum;
            x[1][g] = e1 / sum;
          }
        }
      }
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int l = lane + 32 * c;
#pragma unroll
        for (int g = 0; g < HM; ++g) {
          if (g < H && l < lay.lp16) mrow[size_t(g) * TN * LS + l] = l < L ? x[c][g] : 0.f;
        }
      }
    }
    __syncwarp();
  }

  // 3. out[g] = Â_Q[g]·Z[g] for this warp's rows.
  T* os = tok + row0 * LD;  // the token stage is free now: out tile staging
  T* out = static_cast<T*>(p.out);
  for (int g = 0; g < H; ++g) {
    if (g + 1 < H) {
      stage_z(g + 1, (g + 1) & 1);
      ptx::cp_async_wait<1>();
    } else {
      ptx::cp_async_wait<0>();
    }
    __syncthreads();
    const T* zs = land + (g & 1) * lay.lp16 * LD;
    const float* mg = maps + (size_t(g) * TN + row0) * LS;
    float o[D / 8][4];
#pragma unroll
    for (int j = 0; j < D / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    for (int k0 = 0; k0 < lay.lp16; k0 += 16) {
      const float2 v00 = *reinterpret_cast<const float2*>(mg + g4 * LS + k0 + 2 * t4);
      const float2 v10 = *reinterpret_cast<const float2*>(mg + (g4 + 8) * LS + k0 + 2 * t4);
      const float2 v01 = *reinterpret_cast<const float2*>(mg + g4 * LS + k0 + 8 + 2 * t4);
      const float2 v11 = *reinterpret_cast<const float2*>(mg + (g4 + 8) * LS + k0 + 8 + 2 * t4);
      const uint32_t a[4] = {mma::pack2<T>(v00.x, v00.y), mma::pack2<T>(v10.x, v10.y), mma::pack2<T>(v01.x, v01.y),
                             mma::pack2<T>(v11.x, v11.y)};
#pragma unroll
      for (int n = 0; n < D; n += 16) {
        uint32_t bb[4];
        mma::load_b_kn<T>(bb, zs, LD, k0, n);
        const uint32_t b0[2] = {bb[0], bb[1]}, b1[2] = {bb[2], bb[3]};
        mma::mma16816<T>(o[n / 8], a, b0);
        mma::mma16816<T>(o[n / 8 + 1], a, b1);
      }
    }
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      const int c = j * 8 + 2 * t4;
      *reinterpret_cast<uint32_t*>(os + g4 * LD + c) = mma::pack2<T>(o[j][0], o[j][1]);
      *reinterpret_cast<uint32_t*>(os + (g4 + 8) * LD + c) = mma::pack2<T>(o[j][2], o[j][3]);
    }
    __syncwarp();
    T* og = out + ((int64_t(b) * H + g) * p.N + n0 + row0) * D;
    const int rows = min(16, nv - row0);
    for (int e = lane; e < rows * (D / 8); e += 32) {
      const int r = e / (D / 8), c = (e - r * (D / 8)) * 8;
      *reinterpret_cast<uint4*>(og + r * D + c) = *reinterpret_cast<const uint4*>(os + r * LD + c);
    }
    __syncthreads();  // Z stage (g & 1) and the out tile are free for the next head
  }
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// Contiguous in dtype and 16-byte aligned (cp.async sources).
at::Tensor packed(const at::Tensor& t, at::ScalarType dtype) {
  at::Tensor c = t.to(dtype).contiguous();
  return aligned16(c) ? c : c.clone();
}

template <typename T, int D, int HM>
void launch_query_forward(QueryFwdParams p, int B) {
  auto kernel = query_forward_mma_kernel<T, D, HM>;
  int best = 0, best_warps = 0;
  size_t best_smem = 0;
  const size_t optin = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  set_smem(kernel, optin);
  for (int warps : {4, 2, 1}) {  // the CTA shape with the most resident warps per SM
    const size_t smem = QueryFwdLayout(D, p.H, p.L, warps).total;
    if (smem > optin) continue;
    int ctas = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas, kernel, 32 * warps, smem));
    if (ctas * warps > best) best = ctas * warps, best_warps = warps, best_smem = smem;
  }
  TORCH_INTERNAL_ASSERT(best_warps > 0, "query_forward_mma: no CTA shape fits (checked by the caller)");
  p.warps = best_warps;
  dim3 grid(ceil_div(p.N, 16 * best_warps), B);
  launch_kernel<query_forward_mma_kernel<T, D, HM>>(grid, 32 * best_warps, best_smem,
                                                    at::cuda::getCurrentCUDAStream(), p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int D>
void dispatch_heads(const QueryFwdParams& p, int B) {
  if (p.H <= 8) {
    launch_query_forward<T, D, 8>(p, B);
  } else {
    launch_query_forward<T, D, 16>(p, B);
  }
}

}  // namespace

bool mma_path_serves(const at::Tensor& q, int64_t L, bool tensor_cores) {
  const auto dt = q.scalar_type();
  const int64_t H = q.size(1), d = q.size(3);
  if (!tensor_cores || (dt != at::kHalf && dt != at::kBFloat16)) return false;
  if (!(d == 32 || d == 64 || d == 128) || H > kMaxHeads || L > kMaxL) return false;
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  return prop->major >= 8 && QueryFwdLayout(d, H, L, 1).total <= size_t(prop->sharedMemPerBlockOptin);
}

bool query_forward_mma(const at::Tensor& q, const at::Tensor& k_land, const at::Tensor& z,
                       const std::optional<at::Tensor>& w_q, bool pre, double scale, at::Tensor& out,
                       at::Tensor& lse_q, bool tensor_cores) {
  if (!mma_path_serves(q, k_land.size(2), tensor_cores)) return false;
  const auto dt = q.scalar_type();
  at::Tensor qv = q;
  const bool rows16 = q.stride(3) == 1 && q.stride(0) % 8 == 0 && q.stride(1) % 8 == 0 && q.stride(2) % 8 == 0;
  if (!rows16 || !aligned16(q)) qv = packed(q, dt);
  const at::Tensor kl = packed(k_land, dt), zt = packed(z, dt);
  const at::Tensor wf = w_q.has_value() ? packed(w_q.value(), at::kFloat) : at::Tensor();
  QueryFwdParams p{};
  p.q = qv.data_ptr();
  p.sb = qv.stride(0), p.sh = qv.stride(1), p.sn = qv.stride(2);
  p.k_land = kl.data_ptr();
  p.z = zt.data_ptr();
  p.w = wf.defined() ? wf.data_ptr<float>() : nullptr;
  p.out = out.data_ptr();
  p.lse = lse_q.data_ptr<float>();
  p.H = q.size(1), p.N = q.size(2), p.L = k_land.size(2);
  p.scale = static_cast<float>(scale);
  p.pre = pre;
  const int B = q.size(0), d = q.size(3);
  dispatch_float_types(dt, "imhsa (q, mma)", [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same_v<T, float>) {
      if (d == 32) dispatch_heads<T, 32>(p, B);
      if (d == 64) dispatch_heads<T, 64>(p, B);
      if (d == 128) dispatch_heads<T, 128>(p, B);
    }
  });
  return true;
}

}  // namespace crosshead
