// Force-included (g++ -include emu/device.h) into every kernel source compiled for the SIMT
// emulator: it turns the CUDA C++ the kernels are written in into host C++ that runs on
// runtime.cpp. The kernel sources are compiled unchanged; the shims under emu/include stand in for
// the CUDA headers of torch (ATen/cuda, c10/cuda). See csrc/cuda/README.md for what the emulator
// checks and what only a GPU can.
#pragma once

#ifndef CROSSHEAD_EMULATOR
#define CROSSHEAD_EMULATOR 1
#endif

// Everything from torch and the standard library comes first, before the macros below rename
// CUDA keywords and two torch identifiers.
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "emu/cuda_runtime.h"
#include "emu/simt.h"

#define CROSSHEAD_EMU_NO_CHECK __attribute__((no_sanitize_address))

// ------------------------------------------------------------------------------ keywords

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __constant__
#define __grid_constant__

// `__shared__ T x[N];` and `extern __shared__ T x[];` both become block-scope extern declarations
// (the unused int before them absorbs a leading `extern`). The emulator build resolves every such
// symbol to the shared-memory arena: the dynamic window for `extern ... x[]`, a slot of its own for
// each static array (crosshead/_emulator_build.py).
#define CROSSHEAD_EMU_CAT2(a, b) a##b
#define CROSSHEAD_EMU_CAT(a, b) CROSSHEAD_EMU_CAT2(a, b)
#define __shared__ \
  __attribute__((unused)) int CROSSHEAD_EMU_CAT(crosshead_emu_shared_decl_, CROSSHEAD_EMU_CAT(__LINE__, __COUNTER__)); extern

#define threadIdx (::crosshead_emu::g_current->idx)
#define blockIdx (::crosshead_emu::g_geometry.block_idx)
#define blockDim (::crosshead_emu::g_geometry.block_dim)
#define gridDim (::crosshead_emu::g_geometry.grid_dim)
#define warpSize 32

// The emulated kernels serve torch's CPU dispatch key: the tensors they receive are CPU tensors.
#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, k, m) _TORCH_LIBRARY_IMPL(ns, CPU, m, C10_UID)
#define is_cuda is_cpu

// ----------------------------------------------------------------------- vector types

// CUDA's vector types. A GPU faults on a vector load or store that is not aligned to the vector's
// size; the host compiler splits such copies into scalar accesses, so the copy operations check the
// alignment themselves.
#define CROSSHEAD_EMU_VEC_COPY(name)                                                     \
  name() = default;                                                                      \
  name(const name& o) { crosshead_emu::check_vector_alignment(&o, sizeof(name)); assign(o); } \
  name& operator=(const name& o) {                                                       \
    crosshead_emu::check_vector_alignment(this, sizeof(name));                           \
    crosshead_emu::check_vector_alignment(&o, sizeof(name));                             \
    assign(o);                                                                           \
    return *this;                                                                        \
  }
#define CROSSHEAD_EMU_VEC2(name, T, align)                      \
  struct alignas(align) name {                                  \
    T x, y;                                                     \
    constexpr name(T vx, T vy) : x(vx), y(vy) {}                \
    CROSSHEAD_EMU_VEC_COPY(name)                                \
   private:                                                     \
    void assign(const name& o) { x = o.x, y = o.y; }            \
  };                                                            \
  inline name make_##name(T x, T y) { return name(x, y); }
#define CROSSHEAD_EMU_VEC4(name, T, align)                                        \
  struct alignas(align) name {                                                    \
    T x, y, z, w;                                                                 \
    constexpr name(T vx, T vy, T vz, T vw) : x(vx), y(vy), z(vz), w(vw) {}        \
    CROSSHEAD_EMU_VEC_COPY(name)                                                  \
   private:                                                                       \
    void assign(const name& o) { x = o.x, y = o.y, z = o.z, w = o.w; }            \
  };                                                                              \
  inline name make_##name(T x, T y, T z, T w) { return name(x, y, z, w); }
CROSSHEAD_EMU_VEC2(float2, float, 8)
CROSSHEAD_EMU_VEC4(float4, float, 16)
CROSSHEAD_EMU_VEC2(int2, int, 8)
CROSSHEAD_EMU_VEC4(int4, int, 16)
CROSSHEAD_EMU_VEC2(uint2, unsigned int, 8)
CROSSHEAD_EMU_VEC4(uint4, unsigned int, 16)
CROSSHEAD_EMU_VEC2(double2, double, 16)

using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;
struct alignas(4) __half2 {
  __half x, y;
};
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
inline float __half2float(__half h) { return static_cast<float>(h); }
inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return static_cast<float>(h); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline __half2 __floats2half2_rn(float a, float b) { return __half2{__half(a), __half(b)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return __nv_bfloat162{__nv_bfloat16(a), __nv_bfloat16(b)}; }

// ------------------------------------------------------------------ arithmetic intrinsics

template <typename To, typename From>
inline To crosshead_emu_bits(From x) {
  static_assert(sizeof(To) == sizeof(From));
  To y;
  std::memcpy(&y, &x, sizeof(To));
  return y;
}
inline unsigned int __float_as_uint(float x) { return crosshead_emu_bits<unsigned int>(x); }
inline float __uint_as_float(unsigned int x) { return crosshead_emu_bits<float>(x); }
inline int __float_as_int(float x) { return crosshead_emu_bits<int>(x); }
inline float __int_as_float(int x) { return crosshead_emu_bits<float>(x); }
inline long long __double_as_longlong(double x) { return crosshead_emu_bits<long long>(x); }
inline double __longlong_as_double(long long x) { return crosshead_emu_bits<double>(x); }

// The fast-math intrinsics run at full precision here (the GPU's approximations differ in the
// last bits; tolerances cover both).
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __powf(float x, float y) { return std::pow(x, y); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }

// CUDA's global min/max overloads.
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }
inline unsigned int max(unsigned int a, unsigned int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }

// Read-only cache loads are plain (checked) loads.
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

#define __trap() ::crosshead_emu::trap(__FILE__, __LINE__)
#define __threadfence() ((void)0)
#define __threadfence_block() ((void)0)

// --------------------------------------------------------------- barriers and collectives

#define __syncthreads() ::crosshead_emu::syncthreads(__FILE__, __LINE__)
#define __syncthreads_count(p) ::crosshead_emu::syncthreads_reduce((p), 0, __FILE__, __LINE__)
#define __syncthreads_and(p) ::crosshead_emu::syncthreads_reduce((p), 1, __FILE__, __LINE__)
#define __syncthreads_or(p) ::crosshead_emu::syncthreads_reduce((p), 2, __FILE__, __LINE__)

namespace crosshead_emu {
inline unsigned full_mask_or() { return 0xffffffffu; }
inline unsigned full_mask_or(unsigned mask) { return mask; }

template <typename T>
inline T shfl_as(const char* file, int line, Shfl mode, unsigned mask, T var, int src, int width = 32) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffles move at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  bits = shfl(mask, bits, src, width, mode, file, line);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

// Atomics: fibers never interleave inside one, so a plain read-modify-write is atomic; the
// accesses are checked (bounds) and marked as synchronised (note_atomic), not as races.
template <typename T, typename F>
CROSSHEAD_EMU_NO_CHECK inline T atomic_rmw(T* address, F&& op) {
  note_atomic(address, sizeof(T));
  T old = *address;
  *address = op(old);
  return old;
}
}  // namespace crosshead_emu

#define __syncwarp(...) ::crosshead_emu::syncwarp(::crosshead_emu::full_mask_or(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_sync(...) ::crosshead_emu::shfl_as(__FILE__, __LINE__, ::crosshead_emu::Shfl::idx, __VA_ARGS__)
#define __shfl_up_sync(...) ::crosshead_emu::shfl_as(__FILE__, __LINE__, ::crosshead_emu::Shfl::up, __VA_ARGS__)
#define __shfl_down_sync(...) ::crosshead_emu::shfl_as(__FILE__, __LINE__, ::crosshead_emu::Shfl::down, __VA_ARGS__)
#define __shfl_xor_sync(...) ::crosshead_emu::shfl_as(__FILE__, __LINE__, ::crosshead_emu::Shfl::bfly, __VA_ARGS__)
#define __all_sync(mask, p) (::crosshead_emu::vote((mask), (p), ::crosshead_emu::Vote::all, __FILE__, __LINE__) != 0)
#define __any_sync(mask, p) (::crosshead_emu::vote((mask), (p), ::crosshead_emu::Vote::any, __FILE__, __LINE__) != 0)
#define __ballot_sync(mask, p) ::crosshead_emu::vote((mask), (p), ::crosshead_emu::Vote::ballot, __FILE__, __LINE__)
#define __activemask() ::crosshead_emu::active_mask()

template <typename T>
inline T atomicAdd(T* a, T v) {
  return ::crosshead_emu::atomic_rmw(a, [v](T old) { return static_cast<T>(old + v); });
}
template <typename T>
inline T atomicSub(T* a, T v) {
  return ::crosshead_emu::atomic_rmw(a, [v](T old) { return static_cast<T>(old - v); });
}
template <typename T>
inline T atomicMax(T* a, T v) {
  return ::crosshead_emu::atomic_rmw(a, [v](T old) { return old > v ? old : v; });
}
template <typename T>
inline T atomicMin(T* a, T v) {
  return ::crosshead_emu::atomic_rmw(a, [v](T old) { return old < v ? old : v; });
}
template <typename T>
inline T atomicExch(T* a, T v) {
  return ::crosshead_emu::atomic_rmw(a, [v](T) { return v; });
}
template <typename T>
inline T atomicCAS(T* a, T compare, T v) {
  return ::crosshead_emu::atomic_rmw(a, [compare, v](T old) { return old == compare ? v : old; });
}

// ------------------------------------------------------------------------------ launches

namespace crosshead_emu {
template <auto Kernel>
const char* kernel_signature() {
  return __PRETTY_FUNCTION__;  // "... [with auto Kernel = ns::name<...>]"; runtime.cpp extracts the name
}

template <typename Tuple>
struct LaunchArgs {
  Tuple args;
};

// The fiber body: copy the arguments onto this thread's own stack (as a GPU passes them by value),
// then run the kernel with memory checking on.
template <auto Kernel, typename Tuple>
CROSSHEAD_EMU_NO_CHECK void run_kernel_body(void* ctx) {
  Tuple local = static_cast<LaunchArgs<Tuple>*>(ctx)->args;
  enter_kernel();
  std::apply([](auto&... a) { Kernel(a...); }, local);
  leave_kernel();
}

// The emulator side of crosshead::launch_kernel (csrc/cuda/launch.cuh).
template <auto Kernel, typename... Args>
CROSSHEAD_EMU_NO_CHECK void launch_kernel(dim3 grid, dim3 block, size_t smem, Args... args) {
  using Tuple = std::tuple<Args...>;
  LaunchArgs<Tuple> ctx{Tuple(args...)};
  const LaunchConfig config{{grid.x, grid.y, grid.z}, {block.x, block.y, block.z}, smem,
                            reinterpret_cast<const void*>(Kernel), kernel_signature<Kernel>()};
  launch(config, &run_kernel_body<Kernel, Tuple>, &ctx);
}
}  // namespace crosshead_emu
