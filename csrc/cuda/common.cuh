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
#include <tuple>

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
// fixed order afterwards. About two CTAs per SM, partial buffers held under a few hundred MiB.
struct Splits {
  int tn, tiles, per_split, splits;
};

inline Splits pick_splits(int64_t B, int64_t N, int tn, int64_t partial_floats_per_split) {
  Splits s;
  s.tn = tn;
  s.tiles = ceil_div(N, tn);
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int64_t want = std::max<int64_t>(1, (2 * sms + B - 1) / std::max<int64_t>(B, 1));
  int64_t cap = std::max<int64_t>(1, (int64_t(64) << 20) / std::max<int64_t>(1, B * partial_floats_per_split));
  want = std::min<int64_t>({want, cap, static_cast<int64_t>(s.tiles)});
  s.per_split = ceil_div(s.tiles, want);
  s.splits = ceil_div(s.tiles, s.per_split);  // every split owns at least one tile
  return s;
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

// S[n][l] = alpha · Σ_k Xs[n][k] · Y[l][k] for n < nv, l < L (a score or dÂ tile of one head).
// Threads run over n fastest, so a warp shares l: Y reads are broadcasts, Xs reads conflict-free.
__device__ inline void tile_dots(float* S, const float* Xs, const float* __restrict__ Y, int nv, int L,
                                 int d, float alpha) {
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
template <typename T>
__device__ void tile_tokens_out(T* __restrict__ out, int64_t sn, const float* A,
                                const float* __restrict__ Y, int nv, int L, int d, float alpha) {
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
__device__ inline void tile_landmark_acc(float* __restrict__ R, const float* A, const float* Xs, int nv,
                                         int L, int d, float alpha, bool first) {
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

// Loads w (H×H float32, or identity when null) into shared memory.
__device__ inline void load_weights(float* ws, const float* __restrict__ w, int H) {
  for (int e = threadIdx.x; e < H * H; e += blockDim.x) ws[e] = w ? w[e] : 0.f;
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

}  // namespace crosshead
