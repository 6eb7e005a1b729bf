// Every inline-PTX instruction the kernels use, in one place: the PTX under nvcc, the SIMT
// emulator's host implementation (csrc/emu/ptx.cpp, same fragment layouts) when compiled for the
// CPU. All need sm_80+; the host selects the paths that use them only on such devices.
//   mma_m16n8k8_tf32      D = A·B + C, A 16×8 and B 8×8 TF32, C/D float32
//   mma_m16n8k16_bf16/f16 D = A·B + C, A 16×16 and B 16×8 bf16/f16 (2 per register), C/D float32
//   ldmatrix<N, Trans>    N ∈ {1, 2, 4} 8×8 b16 matrices from shared memory, row addresses per lane
//   cp_async<Bytes>       global → shared copy of 4, 8 or 16 bytes (src_bytes < Bytes zero-fills)
//   cp_async_commit, cp_async_wait<N>
#pragma once

#include <cstdint>

namespace crosshead {
namespace ptx {

#if defined(CROSSHEAD_EMULATOR)
#define CROSSHEAD_PTX_EMULATED 1
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define CROSSHEAD_PTX_NATIVE 1
#endif

// cvt.rna.tf32.f32: round to nearest TF32 (ties away from zero).
__device__ __forceinline__ uint32_t cvt_rna_tf32(float x) {
#if defined(CROSSHEAD_PTX_EMULATED)
  return ::crosshead_emu::cvt_rna_tf32(x);
#elif defined(CROSSHEAD_PTX_NATIVE)
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
#else
  return __float_as_uint(x);
#endif
}

#define CROSSHEAD_PTX_MMA(name, kind, ptx_types)                                                          \
  __device__ __forceinline__ void name(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],   \
                                       const float (&c)[4]) {                                           \
    CROSSHEAD_PTX_MMA_BODY(kind, ptx_types)                                                             \
  }
#if defined(CROSSHEAD_PTX_EMULATED)
#define CROSSHEAD_PTX_MMA_BODY(kind, ptx_types) \
  ::crosshead_emu::mma(::crosshead_emu::MmaKind::kind, d, a, b, c, __FILE__, __LINE__);
#elif defined(CROSSHEAD_PTX_NATIVE)
#define CROSSHEAD_PTX_MMA_BODY(kind, ptx_types)                                                          \
  asm volatile("mma.sync.aligned." ptx_types " {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "           \
               "{%10, %11, %12, %13};"                                                                  \
               : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])                                          \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), \
                 "f"(c[2]), "f"(c[3]));
#else
#define CROSSHEAD_PTX_MMA_BODY(kind, ptx_types) __trap();
#endif
CROSSHEAD_PTX_MMA(mma_m16n8k8_tf32, m16n8k8_tf32, "m16n8k8.row.col.f32.tf32.tf32.f32")
CROSSHEAD_PTX_MMA(mma_m16n8k16_bf16, m16n8k16_bf16, "m16n8k16.row.col.f32.bf16.bf16.f32")
CROSSHEAD_PTX_MMA(mma_m16n8k16_f16, m16n8k16_f16, "m16n8k16.row.col.f32.f16.f16.f32")
#undef CROSSHEAD_PTX_MMA
#undef CROSSHEAD_PTX_MMA_BODY

// ldmatrix.sync.aligned.m8n8.x{N}[.trans].shared.b16; row: this lane's row address (lanes 8i..8i+7
// address the 8 rows of matrix i, 16-byte aligned).
template <int N, bool Trans = false>
__device__ __forceinline__ void ldmatrix(uint32_t (&r)[N], const void* row) {
  static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
#if defined(CROSSHEAD_PTX_EMULATED)
  ::crosshead_emu::ldmatrix(r, N, Trans, row, __FILE__, __LINE__);
#elif defined(CROSSHEAD_PTX_NATIVE)
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  if constexpr (N == 1 && !Trans) asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];" : "=r"(r[0]) : "r"(a));
  if constexpr (N == 1 && Trans) asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];" : "=r"(r[0]) : "r"(a));
  if constexpr (N == 2 && !Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];" : "=r"(r[0]), "=r"(r[1]) : "r"(a));
  if constexpr (N == 2 && Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];" : "=r"(r[0]), "=r"(r[1]) : "r"(a));
  if constexpr (N == 4 && !Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
  if constexpr (N == 4 && Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
#else
  __trap();
#endif
}

// cp.async.{ca,cg}.shared.global: Bytes ∈ {4, 8, 16} (16 bypasses L1), src_bytes past which the
// destination is zero-filled.
template <int Bytes>
__device__ __forceinline__ void cp_async(void* dst, const void* src, int src_bytes = Bytes) {
  static_assert(Bytes == 4 || Bytes == 8 || Bytes == 16, "cp.async copies 4, 8 or 16 bytes");
#if defined(CROSSHEAD_PTX_EMULATED)
  ::crosshead_emu::cp_async(dst, src, Bytes, src_bytes, __FILE__, __LINE__);
#elif defined(CROSSHEAD_PTX_NATIVE)
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  if constexpr (Bytes == 16)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(d), "l"(src), "r"(src_bytes));
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;" ::"r"(d), "l"(src), "n"(Bytes), "r"(src_bytes));
#else
  __trap();
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(CROSSHEAD_PTX_EMULATED)
  ::crosshead_emu::cp_async_commit(__FILE__, __LINE__);
#elif defined(CROSSHEAD_PTX_NATIVE)
  asm volatile("cp.async.commit_group;");
#endif
}

// Waits until at most N committed groups of this thread are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(CROSSHEAD_PTX_EMULATED)
  ::crosshead_emu::cp_async_wait(N, __FILE__, __LINE__);
#elif defined(CROSSHEAD_PTX_NATIVE)
  asm volatile("cp.async.wait_group %0;" ::"n"(N));
#endif
}

}  // namespace ptx
}  // namespace crosshead
