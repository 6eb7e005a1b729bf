// The SIMT emulator's interface between kernel code and the host runtime (runtime.cpp): the thread
// and block state, barriers, warp collectives and the warp-wide PTX operations. Included by
// device.h (kernel side) and runtime.cpp; nothing here depends on torch.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace crosshead_emu {

struct Idx3 {
  unsigned int x, y, z;
};

// One emulated CUDA thread (a fiber). Kernel code reads `idx` through threadIdx.
struct ThreadState {
  Idx3 idx;
  int tid;   // linear index in the block
  int lane;  // tid % 32
  int warp;  // tid / 32
};

// The launch geometry of the block being run; kernel code reads them through blockIdx etc.
struct Geometry {
  Idx3 block_idx, block_dim, grid_dim;
};

extern ThreadState* g_current;  // the running fiber's state (one block runs at a time)
extern Geometry g_geometry;

// Block barrier: every live thread of the block must reach the same call site (file:line).
void syncthreads(const char* file, int line);
// Barrier that also reduces a predicate: kind 0 count, 1 and, 2 or.
int syncthreads_reduce(int predicate, int kind, const char* file, int line);
// Warp barrier over `mask` (must include the caller and name the same lanes in every caller).
void syncwarp(unsigned mask, const char* file, int line);

enum class Shfl { idx, up, down, bfly };
uint64_t shfl(unsigned mask, uint64_t value, int src, int width, Shfl mode, const char* file, int line);
enum class Vote { all, any, ballot };
unsigned vote(unsigned mask, int predicate, Vote mode, const char* file, int line);
unsigned active_mask();

// mma.sync.aligned.*.row.col with float32 accumulation (PTX ISA "Matrix fragments for mma.m16n8k8"
// and "... mma.m16n8k16 with floating point type"). Every lane of the warp passes its fragments;
// d receives this lane's part of D = A·B + C.
enum class MmaKind { m16n8k8_tf32, m16n8k16_bf16, m16n8k16_f16 };
void mma(MmaKind kind, float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4], const char* file,
         int line);

// ldmatrix.sync.aligned.m8n8.x{count}[.trans].shared.b16: lanes 8i..8i+7 give the row addresses
// of matrix i; out[i] receives this lane's two elements of matrix i.
void ldmatrix(uint32_t* out, int count, bool trans, const void* row_address, const char* file, int line);

// cp.async.{ca,cg}.shared.global [dst], [src], bytes, src_bytes (bytes past src_bytes are zeroed),
// grouped by commit_group and completed by wait_group.
void cp_async(void* dst, const void* src, int bytes, int src_bytes, const char* file, int line);
void cp_async_commit(const char* file, int line);
void cp_async_wait(int pending, const char* file, int line);

// cvt.rna.tf32.f32: round to nearest (ties away from zero) to 10 mantissa bits.
uint32_t cvt_rna_tf32(float x);

// Atomic read-modify-write (fibers never interleave inside one, so they are atomic by
// construction); marks the word as synchronised for the race checker.
void note_atomic(const void* address, size_t bytes);

// A vector (float2/float4, ...) load or store: its address must be aligned to its size.
void check_vector_alignment(const void* address, size_t bytes);

[[noreturn]] void trap(const char* file, int line);
[[noreturn]] void fail_assert(const char* expr, const char* file, int line);

// Launch: runs body(ctx) once per thread, block after block, threads as fibers.
struct LaunchConfig {
  Idx3 grid, block;
  size_t dynamic_smem;
  const void* kernel;        // identifies the kernel for cudaFuncSetAttribute's limits
  const char* kernel_name;
};
void launch(const LaunchConfig& config, void (*body)(void*), void* ctx);
// The launches since the last call with clear=true, one line each: "kernel gx gy gz threads smem".
std::string launch_log(bool clear);

// Called by the fiber body around the kernel call: memory accesses are checked in between.
void enter_kernel();
void leave_kernel();

}  // namespace crosshead_emu
