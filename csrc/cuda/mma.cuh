// Half-type tensor-core building blocks of the second-generation kernels (FlashAttention-style):
// mma.sync m16n8k16 with bfloat16/float16 operands and float32 accumulation, fragments loaded with
// ldmatrix from padded shared-memory tiles, tiles staged with 16-byte cp.async.
//
// Fragment ownership (PTX ISA, "Matrix fragments for mma.m16n8k16"), g = lane / 4, t = lane % 4;
// each 32-bit register holds two consecutive columns (the lower one in the low half):
//   A (16×16, row):  a[0] = A[g][2t..2t+1]  a[1] = A[g+8][2t..]  a[2] = A[g][2t+8..]  a[3] = A[g+8][2t+8..]
//   B (16×8, col):   b[0] = B[2t..2t+1][g]  b[1] = B[2t+8..2t+9][g]
//   C (16×8):        c[0..1] = C[g][2t..2t+1]  c[2..3] = C[g+8][2t..2t+1]
// A tile stored row-major in shared memory [row][k] loads as A with ldmatrix.x4; a tile stored
// [n][k] (k contiguous) loads as B with ldmatrix (no .trans), one stored [k][n] with .trans.
// Tiles are padded to a row stride of (cols + 8) elements: 8 consecutive 16-byte row segments then
// fall in distinct bank groups, so ldmatrix and cp.async are free of bank conflicts.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cuda/ptx.cuh"

namespace crosshead {
namespace mma {

// Row stride (elements) of a padded half-type tile with `cols` columns (cols % 8 == 0).
__host__ __device__ constexpr int ld(int cols) { return cols + 8; }

// Two floats rounded to T (round to nearest even) and packed as one A/B fragment register.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  const T a = static_cast<T>(lo), b = static_cast<T>(hi);
  uint16_t ua, ub;
  memcpy(&ua, &a, 2);
  memcpy(&ub, &b, 2);
  return uint32_t(ua) | (uint32_t(ub) << 16);
}

template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    ptx::mma_m16n8k16_bf16(c, a, b, c);
  } else {
    ptx::mma_m16n8k16_f16(c, a, b, c);
  }
}

// A fragment (16×16 at rows r0.., cols k0..) of a row-major tile with row stride `stride`.
template <typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* tile, int stride, int k0) {
  const int lane = threadIdx.x & 31;
  ptx::ldmatrix<4>(a, tile + (lane & 15) * stride + k0 + ((lane >> 4) << 3));
}

// B fragments of two n8 blocks (n rows n0..n0+15 of a [n][k] tile, k0..k0+15):
// b[0..1] for rows n0..n0+7, b[2..3] for rows n0+8..n0+15.
template <typename T>
__device__ __forceinline__ void load_b_nk(uint32_t (&b)[4], const T* tile, int stride, int n0, int k0) {
  const int lane = threadIdx.x & 31;
  ptx::ldmatrix<4>(b, tile + (n0 + (lane & 7) + ((lane >> 4) << 3)) * stride + k0 + (((lane >> 3) & 1) << 3));
}

// The same two n8 blocks from a [k][n] tile (rows k0..k0+15, cols n0..n0+15), via .trans.
template <typename T>
__device__ __forceinline__ void load_b_kn(uint32_t (&b)[4], const T* tile, int stride, int k0, int n0) {
  const int lane = threadIdx.x & 31;
  ptx::ldmatrix<4, true>(b, tile + (k0 + (lane & 15)) * stride + n0 + ((lane >> 4) << 3));
}

// Rows [0, rows) × cols of a global row-major matrix (row stride src_ld elements, 16-byte
// aligned rows) into a padded shared tile with 16-byte cp.async by all `nthreads` threads;
// rows [valid, rows) are zero-filled (their source address stays in bounds at row 0).
template <typename T, int Cols>
__device__ __forceinline__ void stage_rows(T* tile, const T* __restrict__ src, int64_t src_ld, int rows, int valid,
                                           int nthreads) {
  constexpr int kChunks = Cols / 8;  // 16-byte chunks per row
  for (int e = threadIdx.x; e < rows * kChunks; e += nthreads) {
    const int r = e / kChunks, c = (e - r * kChunks) * 8;
    const bool ok = r < valid;
    ptx::cp_async<16>(tile + r * ld(Cols) + c, src + (ok ? r * src_ld : 0) + c, ok ? 16 : 0);
  }
}

}  // namespace mma
}  // namespace crosshead
