// Shared pieces of the crosshead CUDA kernels: argument checks, dtype dispatch, typed loads and
// stores, and the block-level tile primitives every iMHSA kernel is built from.
//
// Tile model (see imhsa.md): a CTA owns a tile of TN tokens of one batch element for ALL h heads,
// because head mixing couples the heads at each (token, landmark) pair. The tile's score maps live
// in shared memory as map[h][n][l] (n < TN, l < L); token operands (q, k, v, grad_out) are read in
// their own dtype with arbitrary batch/head/token strides; landmark operands (q_land, k_land, Z, dZ)
// are float32 contiguous (B, h, L, d) and small, read through the read-only cache.
// Every reduction runs in a fixed order (no atomics), so results are bitwise reproducible.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <type_traits>

#include "cuda/launch.cuh"
#include "cuda/ptx.cuh"

namespace crosshead {

constexpr int kThreads = 256;  // threads per CTA of every tile kernel
constexpr int kMaxHeads = 16;  // h <= 16: the mixing keeps one value per head in registers
constexpr int kMaxHeadDim = 256;
constexpr int kMaxLandmarks = 256;

// ------------------------------------------------------------------------------ host helpers

// Calls f(T{}) with T = float, c10::Half or c10::BFloat16 (float64 is served by the reference).
template <typename F>
void dispatch_float_types(at::ScalarType t, const char* what, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(c10::Half{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    default:
      TORCH_CHECK(false, "crosshead CUDA ", what, ": dtype ", t, " is not supported on CUDA (float32, "
                  "float16, bfloat16 are); float64 is served by the pure-torch path crosshead.reference");
  }
}

// A token tensor (B, h, N, d) with unit stride over d: its pointer and element strides.
struct TokenView {
  const void* ptr;
  int64_t sb, sh, sn;
};

// Keeps x as is when its last dim is unit-stride (any other strides are fine), else copies.
inline at::Tensor unit_stride_last(const at::Tensor& x) {
  return (x.size(3) <= 1 || x.stride(3) == 1) ? x : x.contiguous();
}

inline TokenView token_view(const at::Tensor& x) {
  return TokenView{x.data_ptr(), x.stride(0), x.stride(1), x.stride(2)};
}

// Row stride (floats) of a staged token tile Xs[n][k]: d+4 when d % 4 == 0 (rows stay 16-byte
// aligned for float4 loads, and 8 consecutive rows start on distinct 4-bank groups), else d+1
// (odd: a warp reading one column across rows hits distinct banks).
__host__ __device__ __forceinline__ int xs_ld(int d) { return (d % 4 == 0) ? d + 4 : d + 1; }

inline int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

// Enables more than 48 KiB of dynamic shared memory for kernel when asked for.
template <typename K>
void set_smem(K kernel, size_t bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                        cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
  }
}

// The tensor-core path (see README.md in this folder): float16/bfloat16 inputs with d in {32, 64,
// 128} on sm_80+ run the tile products as mma.sync m16n8k8 TF32 with float32 accumulation.
// CROSSHEAD_CUDA_TENSOR_CORES=0 forces the float32 CUDA-core path; the variable is read at every
// call (getenv is cheap next to a launch), so one process can compare both paths.
inline bool tensor_cores_enabled() {
  const char* s = std::getenv("CROSSHEAD_CUDA_TENSOR_CORES");
  return s == nullptr || std::strcmp(s, "0") != 0;
}

inline bool tensor_core_head_dim(int d) { return d == 32 || d == 64 || d == 128; }

// Calls f(std::true_type{}) when the tensor-core path serves element type T at head dim d on the
// current device and `want` (tensor_cores_enabled(), read once per op call) allows it, else
// f(std::false_type{}). float32 inputs always take the CUDA-core path (and instantiate only it).
template <typename T, typename F>
void dispatch_tensor_cores(bool want, int d, F&& f) {
  if constexpr (std::is_same_v<T, float>) {
    f(std::false_type{});
  } else {
    if (want && tensor_core_head_dim(d) && at::cuda::getCurrentDeviceProperties()->major >= 8) {
      f(std::true_type{});
    } else {
      f(std::false_type{});
    }
  }
}

// Tokens per tile so that `maps` score maps (h·TN·L floats each), a staged token tile
// (TN·xs_ld(d) floats) and `fixed` further floats fit the shared-memory budget.
inline int pick_tile(int H, int L, int d, int maps, int64_t fixed_floats, int64_t N) {
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  int64_t budget = std::min<int64_t>(prop->sharedMemPerBlockOptin, 100 * 1024) / 4 - fixed_floats;
  int64_t per_token = static_cast<int64_t>(maps) * H * L + xs_ld(d);
  int64_t tn = budget / per_token;
  TORCH_CHECK(tn >= 1, "crosshead CUDA: h=", H, ", L=", L, ", d=", d, " does not fit in shared memory; "
              "use the pure-torch path crosshead.reference");
  tn = std::min<int64_t>(tn, 64);
  if (tn >= 32) tn = tn / 32 * 32;  // whole warps over tokens keep the landmark index warp-uniform
  return static_cast<int>(std::min<int64_t>(tn, std::max<int64_t>(N, 1)));
}

// How the tiles of N are grouped into splits, each one CTA, whose partial sums are reduced in a
// fixed order afterwards. All B·splits CTAs fit in one wave of `ctas_per_sm` resident CTAs per SM
// (a second, nearly empty wave would cost as much as the first: cuda_audit.md §2.10 #2), tiles are
// spread evenly, and the partial buffers stay under 256 MiB.
struct Splits {
  int tn, tiles, per_split, splits;
};

inline Splits pick_splits(int64_t B, int64_t N, int tn, int64_t partial_floats_per_split, int ctas_per_sm) {
  Splits s;
  s.tn = tn;
  s.tiles = ceil_div(N, tn);
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int64_t want = std::max<int64_t>(1, int64_t(std::max(ctas_per_sm, 1)) * sms / std::max<int64_t>(B, 1));
  int64_t cap = std::max<int64_t>(1, (int64_t(64) << 20) / std::max<int64_t>(1, B * partial_floats_per_split));
  want = std::min<int64_t>({want, cap, static_cast<int64_t>(s.tiles)});
  s.per_split = ceil_div(s.tiles, want);
  s.splits = ceil_div(s.tiles, s.per_split);  // every split owns at least one tile
  return s;
}

// CTAs of `kernel` (kThreads threads, `smem` bytes of dynamic shared memory) resident per SM.
template <typename K>
int resident_ctas(K kernel, size_t smem) {
  set_smem(kernel, smem);
  int n = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, smem));
  return std::max(n, 1);
}

// Calls f(T{}, kTC) for the element type of t (dispatch_float_types) and the tile-product path
// (dispatch_tensor_cores), kTC a std::integral_constant<bool, ...>.
template <typename F>
void dispatch_kernel_types(at::ScalarType t, const char* what, bool tensor_cores, int d, F&& f) {
  dispatch_float_types(t, what, [&](auto tag) {
    using T = decltype(tag);
    dispatch_tensor_cores<T>(tensor_cores, d, [&](auto tcv) { f(tag, tcv); });
  });
}

// ---------------------------------------------------------------------------- device helpers

template <typename T>
__device__ __forceinline__ float to_f(T x) { return static_cast<float>(x); }

template <typename T>
__device__ __forceinline__ T from_f(float x) { return static_cast<T>(x); }

// Loads tokens n0..n0+nv-1 of one (b, h) slice of a token tensor into Xs[n][k] (row stride
// xs_ld(d)), converting to float32.
template <typename T>
__device__ void stage_tokens(float* Xs, const T* __restrict__ x, int64_t sn, int nv, int d) {
  const int ld = xs_ld(d);
  for (int e = threadIdx.x; e < nv * d; e += blockDim.x) {
    int n = e / d, k = e - n * d;
    Xs[n * ld + k] = to_f(x[n * sn + k]);
  }
}

// ------------------------------------------------------------- tensor-core tile products
//
// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32, one warp per 16×16 output item (two
// m16n8 blocks sharing the A fragment), float32 accumulation. Fragment ownership (PTX ISA, "Matrix
// fragments for mma.m16n8k8", .tf32), with g = lane / 4 and t = lane % 4:
//   A (16×8, row):  a[r] = A[g + 8·(r % 2)][t + 4·(r / 2)]
//   B (8×8, col):   b[r] = B[t + 4·r][g]
//   C (16×8):       c[r] = C[g + 8·(r / 2)][2·t + r % 2]
// Partial tiles (nv tokens, L landmarks, neither a multiple of 16 or 8) are zero-padded in
// registers: an operand element outside the valid range is loaded from a clamped, in-bounds
// address and replaced by 0, and output elements outside it are never stored. No shared memory
// beyond the existing buffers is used, so the tile sizing (pick_tile) is unchanged.
// Staged token values come from float16/bfloat16 and are exact in TF32 (used as is); every other
// operand (probabilities, dS, Z, dZ, landmarks) is rounded to nearest TF32 (cvt.rna), i.e. to
// 11 significant bits, the precision of a float16 operand. Each output element has one owner lane
// and a fixed instruction sequence, so results stay bitwise reproducible.
namespace tc {

__device__ __forceinline__ uint32_t tf32(float x) { return ptx::cvt_rna_tf32(x); }

// c += a·b on one m16n8k8 TF32 block.
__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  ptx::mma_m16n8k8_tf32(c, a, b, c);
}

// Two consecutive elements of a T row (col even, 2·sizeof(T)-aligned) in one store.
template <typename T>
struct alignas(2 * sizeof(T)) Pair {
  T x, y;
};

template <typename T>
__device__ __forceinline__ void store2(T* p, float a, float b) {
  *reinterpret_cast<Pair<T>*>(p) = Pair<T>{from_f<T>(a), from_f<T>(b)};
}

// S[n][l] = alpha · Σ_k Xs[n][k] · Y[l][k]: M = tokens, N = landmarks, K = KD.
template <int KD>
__device__ __forceinline__ void dots(float* S, const float* Xs, const float* __restrict__ Y, int nv, int L, float alpha) {
  constexpr int ld = KD + 4;  // xs_ld(KD)
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int ntiles = (nv + 15) >> 4, items = ntiles * ((L + 15) >> 4);
  for (int item = warp; item < items; item += warps) {
    const int n0 = (item % ntiles) * 16, l0 = (item / ntiles) * 16;
    const int r0 = n0 + g, r1 = r0 + 8, la = l0 + g, lb = la + 8;
    const bool v0 = r0 < nv, v1 = r1 < nv, ya = la < L, yb = lb < L;
    const float* x0 = Xs + (v0 ? r0 : 0) * ld + t;
    const float* x1 = Xs + (v1 ? r1 : 0) * ld + t;
    const float* y0 = Y + (ya ? la : 0) * KD + t;
    const float* y1 = Y + (yb ? lb : 0) * KD + t;
    float c0[4] = {0.f, 0.f, 0.f, 0.f}, c1[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll 4
    for (int k = 0; k < KD; k += 8) {
      const uint32_t a[4] = {v0 ? __float_as_uint(x0[k]) : 0u, v1 ? __float_as_uint(x1[k]) : 0u,
                             v0 ? __float_as_uint(x0[k + 4]) : 0u, v1 ? __float_as_uint(x1[k + 4]) : 0u};
      const uint32_t b0[2] = {ya ? tf32(__ldg(y0 + k)) : 0u, ya ? tf32(__ldg(y0 + k + 4)) : 0u};
      const uint32_t b1[2] = {yb ? tf32(__ldg(y1 + k)) : 0u, yb ? tf32(__ldg(y1 + k + 4)) : 0u};
      mma(c0, a, b0);
      mma(c1, a, b1);
    }
    const int ca = l0 + 2 * t, cb = ca + 8;
    if (v0) {
      if (ca < L) S[r0 * L + ca] = alpha * c0[0];
      if (ca + 1 < L) S[r0 * L + ca + 1] = alpha * c0[1];
      if (cb < L) S[r0 * L + cb] = alpha * c1[0];
      if (cb + 1 < L) S[r0 * L + cb + 1] = alpha * c1[1];
    }
    if (v1) {
      if (ca < L) S[r1 * L + ca] = alpha * c0[2];
      if (ca + 1 < L) S[r1 * L + ca + 1] = alpha * c0[3];
      if (cb < L) S[r1 * L + cb] = alpha * c1[2];
      if (cb + 1 < L) S[r1 * L + cb + 1] = alpha * c1[3];
    }
  }
}

// out[n][k] = alpha · Σ_l A[n][l] · Y[l][k]: M = tokens, N = KD, K = landmarks (padded to 8).
template <int KD, typename T>
__device__ __forceinline__ void tokens_out(T* __restrict__ out, int64_t sn, const float* A, const float* __restrict__ Y, int nv,
                           int L, float alpha) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int ntiles = (nv + 15) >> 4, items = ntiles * (KD / 16);
  for (int item = warp; item < items; item += warps) {
    const int n0 = (item % ntiles) * 16, k0 = (item / ntiles) * 16;
    const int r0 = n0 + g, r1 = r0 + 8;
    const bool v0 = r0 < nv, v1 = r1 < nv;
    const float* a0 = A + (v0 ? r0 : 0) * L;
    const float* a1 = A + (v1 ? r1 : 0) * L;
    const float* y = Y + k0 + g;
    float c0[4] = {0.f, 0.f, 0.f, 0.f}, c1[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll 2
    for (int l = 0; l < L; l += 8) {
      const int la = l + t, lb = la + 4;
      const bool ua = la < L, ub = lb < L;
      const int ia = ua ? la : 0, ib = ub ? lb : 0;
      const uint32_t a[4] = {(v0 && ua) ? tf32(a0[ia]) : 0u, (v1 && ua) ? tf32(a1[ia]) : 0u,
                             (v0 && ub) ? tf32(a0[ib]) : 0u, (v1 && ub) ? tf32(a1[ib]) : 0u};
      const float* ya = y + static_cast<int64_t>(ia) * KD;
      const float* yb = y + static_cast<int64_t>(ib) * KD;
      const uint32_t b0[2] = {ua ? tf32(__ldg(ya)) : 0u, ub ? tf32(__ldg(yb)) : 0u};
      const uint32_t b1[2] = {ua ? tf32(__ldg(ya + 8)) : 0u, ub ? tf32(__ldg(yb + 8)) : 0u};
      mma(c0, a, b0);
      mma(c1, a, b1);
    }
    const int ca = k0 + 2 * t, cb = ca + 8;
    if (v0) {
      store2(out + r0 * sn + ca, alpha * c0[0], alpha * c0[1]);
      store2(out + r0 * sn + cb, alpha * c1[0], alpha * c1[1]);
    }
    if (v1) {
      store2(out + r1 * sn + ca, alpha * c0[2], alpha * c0[3]);
      store2(out + r1 * sn + cb, alpha * c1[2], alpha * c1[3]);
    }
  }
}

// R[l][k] (=|+=) alpha · Σ_{n<nv} A[n][l] · Xs[n][k]: M = landmarks, N = KD, K = tokens (padded
// to 8). The item -> warp assignment depends on L and KD only, never on nv, so every element of
// R has the same owner lane on every tile and the read-modify-write stays race-free and ordered.
template <int KD>
__device__ __forceinline__ void landmark_acc(float* __restrict__ R, const float* A, const float* Xs, int nv, int L, float alpha,
                             bool first) {
  constexpr int ld = KD + 4;  // xs_ld(KD)
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int ltiles = (L + 15) >> 4, items = ltiles * (KD / 16);
  for (int item = warp; item < items; item += warps) {
    const int l0 = (item % ltiles) * 16, k0 = (item / ltiles) * 16;
    const int m0 = l0 + g, m1 = m0 + 8;
    const bool w0 = m0 < L, w1 = m1 < L;
    const int i0 = w0 ? m0 : 0, i1 = w1 ? m1 : 0;
    const float* xs = Xs + k0 + g;
    float c0[4] = {0.f, 0.f, 0.f, 0.f}, c1[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll 2
    for (int n = 0; n < nv; n += 8) {
      const int na = n + t, nb = na + 4;
      const bool ua = na < nv, ub = nb < nv;
      const float* aa = A + (ua ? na : 0) * L;
      const float* ab = A + (ub ? nb : 0) * L;
      const uint32_t a[4] = {(ua && w0) ? tf32(aa[i0]) : 0u, (ua && w1) ? tf32(aa[i1]) : 0u,
                             (ub && w0) ? tf32(ab[i0]) : 0u, (ub && w1) ? tf32(ab[i1]) : 0u};
      const float* xa = xs + (ua ? na : 0) * ld;
      const float* xb = xs + (ub ? nb : 0) * ld;
      const uint32_t b0[2] = {ua ? __float_as_uint(xa[0]) : 0u, ub ? __float_as_uint(xb[0]) : 0u};
      const uint32_t b1[2] = {ua ? __float_as_uint(xa[8]) : 0u, ub ? __float_as_uint(xb[8]) : 0u};
      mma(c0, a, b0);
      mma(c1, a, b1);
    }
    const int ca = k0 + 2 * t, cb = ca + 8;
    auto put = [&](int row, int col, float x, float y) {
      float2* r = reinterpret_cast<float2*>(R + static_cast<int64_t>(row) * KD + col);
      float2 v = make_float2(alpha * x, alpha * y);
      if (!first) {
        const float2 old = *r;
        v = make_float2(old.x + v.x, old.y + v.y);
      }
      *r = v;
    };
    if (w0) {
      put(m0, ca, c0[0], c0[1]);
      put(m0, cb, c1[0], c1[1]);
    }
    if (w1) {
      put(m1, ca, c0[2], c0[3]);
      put(m1, cb, c1[2], c1[3]);
    }
  }
}

}  // namespace tc

// S[n][l] = alpha · Σ_k Xs[n][k] · Y[l][k] for n < nv, l < L (a score or dÂ tile of one head).
// Threads run over n fastest, so a warp shares l: Y reads are broadcasts, Xs reads conflict-free.
// kTC: the tensor-core version (tc::dots) when d is 32, 64 or 128 (Xs staged from a half type).
template <bool kTC = false>
__device__ inline void tile_dots(float* S, const float* Xs, const float* __restrict__ Y, int nv, int L,
                                 int d, float alpha) {
  if constexpr (kTC) {
    switch (d) {
      case 32: tc::dots<32>(S, Xs, Y, nv, L, alpha); return;
      case 64: tc::dots<64>(S, Xs, Y, nv, L, alpha); return;
      case 128: tc::dots<128>(S, Xs, Y, nv, L, alpha); return;
      default: break;  // other d: the CUDA-core loop below
    }
  }
  const int ld = xs_ld(d);
  if ((d & 3) == 0) {  // float4 path: 2 loads per 4 FMAs
    const int d4 = d >> 2, ld4 = ld >> 2;
    for (int e = threadIdx.x; e < nv * L; e += blockDim.x) {
      int l = e / nv, n = e - l * nv;
      const float4* xr = reinterpret_cast<const float4*>(Xs) + n * ld4;
      const float4* yr = reinterpret_cast<const float4*>(Y + static_cast<int64_t>(l) * d);
      float a0 = 0.f, a1 = 0.f;
      for (int k = 0; k < d4; ++k) {
        const float4 x = xr[k], y = __ldg(yr + k);
        a0 = fmaf(x.x, y.x, a0);
        a1 = fmaf(x.y, y.y, a1);
        a0 = fmaf(x.z, y.z, a0);
        a1 = fmaf(x.w, y.w, a1);
      }
      S[n * L + l] = alpha * (a0 + a1);
    }
    return;
  }
  for (int e = threadIdx.x; e < nv * L; e += blockDim.x) {
    int l = e / nv, n = e - l * nv;
    const float* xr = Xs + n * ld;
    const float* yr = Y + static_cast<int64_t>(l) * d;
    float a0 = 0.f, a1 = 0.f;
    int k = 0;
    for (; k + 1 < d; k += 2) {
      a0 = fmaf(xr[k], __ldg(yr + k), a0);
      a1 = fmaf(xr[k + 1], __ldg(yr + k + 1), a1);
    }
    if (k < d) a0 = fmaf(xr[k], __ldg(yr + k), a0);
    S[n * L + l] = alpha * (a0 + a1);
  }
}

// out[n][k] = alpha · Σ_l A[n][l] · Y[l][k], written in T to out (row stride sn), n < nv.
// kTC: the tensor-core version (tc::tokens_out) when d is 32, 64 or 128 (out 4-byte aligned rows).
template <bool kTC = false, typename T>
__device__ void tile_tokens_out(T* __restrict__ out, int64_t sn, const float* A,
                                const float* __restrict__ Y, int nv, int L, int d, float alpha) {
  if constexpr (kTC) {
    switch (d) {
      case 32: tc::tokens_out<32>(out, sn, A, Y, nv, L, alpha); return;
      case 64: tc::tokens_out<64>(out, sn, A, Y, nv, L, alpha); return;
      case 128: tc::tokens_out<128>(out, sn, A, Y, nv, L, alpha); return;
      default: break;  // other d: the CUDA-core loop below
    }
  }
  if ((d & 3) == 0) {  // float4 path: each thread owns 4 consecutive k
    const int d4 = d >> 2;
    for (int e = threadIdx.x; e < nv * d4; e += blockDim.x) {
      int n = e / d4, k4 = e - n * d4;
      const float* ar = A + n * L;
      const float4* y = reinterpret_cast<const float4*>(Y) + k4;
      float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
      for (int l = 0; l < L; ++l) {
        const float a = ar[l];
        const float4 v = __ldg(y + static_cast<int64_t>(l) * d4);
        acc.x = fmaf(a, v.x, acc.x);
        acc.y = fmaf(a, v.y, acc.y);
        acc.z = fmaf(a, v.z, acc.z);
        acc.w = fmaf(a, v.w, acc.w);
      }
      T* o = out + n * sn + 4 * k4;
      o[0] = from_f<T>(alpha * acc.x);
      o[1] = from_f<T>(alpha * acc.y);
      o[2] = from_f<T>(alpha * acc.z);
      o[3] = from_f<T>(alpha * acc.w);
    }
    return;
  }
  for (int e = threadIdx.x; e < nv * d; e += blockDim.x) {
    int n = e / d, k = e - n * d;
    const float* ar = A + n * L;
    float a0 = 0.f, a1 = 0.f;
    int l = 0;
    for (; l + 1 < L; l += 2) {
      a0 = fmaf(ar[l], __ldg(Y + static_cast<int64_t>(l) * d + k), a0);
      a1 = fmaf(ar[l + 1], __ldg(Y + static_cast<int64_t>(l + 1) * d + k), a1);
    }
    if (l < L) a0 = fmaf(ar[l], __ldg(Y + static_cast<int64_t>(l) * d + k), a0);
    out[n * sn + k] = from_f<T>(alpha * (a0 + a1));
  }
}

// R[l][k] (=|+=) alpha · Σ_{n<nv} A[n][l] · Xs[n][k]: a landmark-side partial sum over the tile's
// tokens, into this CTA's own slice of a global partial buffer (each element has one owner thread,
// the same for every tile, so the read-modify-write is race-free and ordered). R is L×d contiguous.
// kTC: the tensor-core version (tc::landmark_acc) when d is 32, 64 or 128 (Xs from a half type).
// A kernel must use one kTC for all tiles of a split (the element ownership differs between them).
template <bool kTC = false>
__device__ inline void tile_landmark_acc(float* __restrict__ R, const float* A, const float* Xs, int nv,
                                         int L, int d, float alpha, bool first) {
  if constexpr (kTC) {
    switch (d) {
      case 32: tc::landmark_acc<32>(R, A, Xs, nv, L, alpha, first); return;
      case 64: tc::landmark_acc<64>(R, A, Xs, nv, L, alpha, first); return;
      case 128: tc::landmark_acc<128>(R, A, Xs, nv, L, alpha, first); return;
      default: break;  // other d: the CUDA-core loop below
    }
  }
  const int ld = xs_ld(d);
  if ((d & 3) == 0) {  // float4 path
    const int d4 = d >> 2, ld4 = ld >> 2;
    const float4* xs = reinterpret_cast<const float4*>(Xs);
    float4* r4 = reinterpret_cast<float4*>(R);
    for (int e = threadIdx.x; e < L * d4; e += blockDim.x) {
      int l = e / d4, k4 = e - l * d4;
      float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
      for (int n = 0; n < nv; ++n) {
        const float a = A[n * L + l];
        const float4 x = xs[n * ld4 + k4];
        acc.x = fmaf(a, x.x, acc.x);
        acc.y = fmaf(a, x.y, acc.y);
        acc.z = fmaf(a, x.z, acc.z);
        acc.w = fmaf(a, x.w, acc.w);
      }
      float4 v = make_float4(alpha * acc.x, alpha * acc.y, alpha * acc.z, alpha * acc.w);
      if (!first) {
        const float4 old = r4[e];
        v = make_float4(old.x + v.x, old.y + v.y, old.z + v.z, old.w + v.w);
      }
      r4[e] = v;
    }
    return;
  }
  for (int e = threadIdx.x; e < L * d; e += blockDim.x) {
    int l = e / d, k = e - l * d;
    float a0 = 0.f, a1 = 0.f;
    int n = 0;
    for (; n + 1 < nv; n += 2) {
      a0 = fmaf(A[n * L + l], Xs[n * ld + k], a0);
      a1 = fmaf(A[(n + 1) * L + l], Xs[(n + 1) * ld + k], a1);
    }
    if (n < nv) a0 = fmaf(A[n * L + l], Xs[n * ld + k], a0);
    float v = alpha * (a0 + a1);
    R[e] = first ? v : R[e] + v;
  }
}

// Head mixing in place on H maps of `stride` floats each, over their first `count` entries:
// forward  y[g] = Σ_h w[g][h] x[h]   (imhsa.md "post"/"pre" mixing),
// adjoint  y[h] = Σ_g w[g][h] x[g]   (its gradient with respect to x).
template <bool kAdjoint>
__device__ void mix_heads(float* M, int stride, int count, const float* w, int H) {
  for (int e = threadIdx.x; e < count; e += blockDim.x) {
    float x[kMaxHeads];
#pragma unroll
    for (int h = 0; h < kMaxHeads; ++h) x[h] = h < H ? M[h * stride + e] : 0.f;
    for (int g = 0; g < H; ++g) {
      float y = 0.f;
#pragma unroll
      for (int h = 0; h < kMaxHeads; ++h) {
        if (h < H) y = fmaf(kAdjoint ? w[h * H + g] : w[g * H + h], x[h], y);
      }
      M[g * stride + e] = y;
    }
  }
}

// Out-of-place mixing: Y[g] = Σ_h w[g][h] X[h] (both H maps of `stride` floats).
__device__ inline void mix_heads_to(float* Y, const float* X, int stride, int count, const float* w, int H) {
  for (int e = threadIdx.x; e < count; e += blockDim.x) {
    float x[kMaxHeads];
#pragma unroll
    for (int h = 0; h < kMaxHeads; ++h) x[h] = h < H ? X[h * stride + e] : 0.f;
    for (int g = 0; g < H; ++g) {
      float y = 0.f;
#pragma unroll
      for (int h = 0; h < kMaxHeads; ++h) {
        if (h < H) y = fmaf(w[g * H + h], x[h], y);
      }
      Y[g * stride + e] = y;
    }
  }
}

// acc[g*H+h] += Σ_{n<nv, l<L} X[g][n][l] · Y[h][n][l]: the tile's part of a mixing-weight
// gradient (reference _mix_weight_grad). One warp per (g, h) pair, fixed lane order.
__device__ inline void tile_weight_grad(float* acc, const float* X, const float* Y, int map_stride, int nv,
                                        int L, int H) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int count = nv * L;
  for (int p = warp; p < H * H; p += warps) {
    int g = p / H, h = p - g * H;
    const float* x = X + g * map_stride;
    const float* y = Y + h * map_stride;
    float s = 0.f;
    for (int e = lane; e < count; e += 32) s = fmaf(x[e], y[e], s);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) acc[p] += s;
  }
}

// Loads w (H×H float32, or the identity when null: no interaction) into shared memory.
__device__ inline void load_weights(float* ws, const float* __restrict__ w, int H) {
  for (int e = threadIdx.x; e < H * H; e += blockDim.x) ws[e] = w ? w[e] : (e / H == e % H ? 1.f : 0.f);
}

// ----------------------------------------------------------------------- kernel parameters

// Everything a side kernel needs; unused fields are null. "land" is the landmark partner of the
// scores (k_land on the query side, q_land on the key side), "lval" the landmark values (Z for
// the query-side forward and backward, dZ on the key side backward).
struct SideParams {
  TokenView x;       // score tokens: q (query side) or k (key side)
  TokenView y;       // value tokens: v (key side) or grad_out (query side backward)
  const float* land; // (B, H, L, d) float32
  const float* lval; // (B, H, L, d) float32
  const float* w;    // (H, H) float32 or null (identity)
  const float* lse;  // query side (B, H, N), key side (B, H, L)
  const float* D;    // key side backward: rowsum term (B, H, L)
  void* out;         // token output (B, H, N, d) contiguous, input dtype
  void* out2;        // second token output
  float* part;       // per-split partials (B, splits, H, L, d)
  float* part2;
  float* part_w;     // (B, splits, H, H)
  float* part_m;     // key stats (B, splits, H, L)
  float* part_s;
  float* lse_out;    // query side forward (B, H, N)
  int B, H, N, L, d;
  float scale;
  int pre;
  int tn, per_split, tiles;
};

// The end of both sides' backward for one tile, G holding the logit gradients dS (H maps): per head
// the token gradient dX[h] = scale·dS[h]·land[h] (written in T to dx, contiguous) and this split's
// landmark partial part[h] (+)= scale·dS[h]ᵀ·X[h], X = the tile's score tokens x (q or k) restaged
// into Xs.
template <bool kTC, typename T>
__device__ void logit_grads_out(const SideParams& p, T* __restrict__ dx, const T* __restrict__ x,
                                float* __restrict__ part, const float* G, float* Xs, int b, int n0, int nv,
                                int64_t part_base, bool first) {
  const int H = p.H, L = p.L, d = p.d, mapsz = p.tn * L;
  __syncthreads();
  for (int h = 0; h < H; ++h) {
    const int64_t bh = int64_t(b) * H + h;
    tile_tokens_out<kTC>(dx + (bh * p.N + n0) * d, d, G + h * mapsz, p.land + bh * L * d, nv, L, d, p.scale);
    __syncthreads();
    stage_tokens(Xs, x + h * p.x.sh + n0 * p.x.sn, p.x.sn, nv, d);
    __syncthreads();
    tile_landmark_acc<kTC>(part + (part_base + h) * L * d, G + h * mapsz, Xs, nv, L, d, p.scale, first);
  }
}

// This CTA's dw partial (H×H) into p.part_w; every thread of the block calls it.
__device__ inline void store_weight_partial(const SideParams& p, const float* wacc, int64_t part_base) {
  __syncthreads();
  for (int e = threadIdx.x; e < p.H * p.H; e += blockDim.x) p.part_w[part_base * p.H + e] = wacc[e];
}

}  // namespace crosshead
