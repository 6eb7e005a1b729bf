// Internal state of the SIMT emulator runtime, shared by its .cpp files (never by kernel code).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "emu/simt.h"

namespace crosshead_emu {

constexpr int kMaxThreads = 1024;
constexpr int kWarp = 32;
constexpr size_t kDynamicSmemMax = 227 * 1024;  // sharedMemPerBlockOptin of sm_90
constexpr size_t kStaticSmemMax = 48 * 1024;

// ---------------------------------------------------------------------------- fibers

struct Fiber {
  void* sp = nullptr;
  char* stack_lo = nullptr;
  char* stack_hi = nullptr;
};
void fiber_start(Fiber& f, void (*entry)(void*), void* arg);  // next switch to f runs entry(arg)
void fiber_switch(Fiber& from, Fiber& to);
void fiber_alloc_stack(Fiber& f, size_t bytes);

// ---------------------------------------------------------------------------- threads

enum class Wait { none, barrier, warp, exited };

struct PendingCopy {
  char* dst;
  const char* src;
  int bytes, src_bytes;
};

struct Thread {
  Fiber fiber;
  ThreadState* state;
  Wait wait = Wait::none;
  const char* file = nullptr;  // where it waits
  int line = 0;
  // warp collective in progress
  int op = 0;
  unsigned mask = 0;
  uint64_t in[12];
  uint64_t out[4];
  // happens-before within the warp: vc[l] = the last clock of lane l this thread is ordered after
  uint32_t vc[kWarp];
  // cp.async groups: copies issued but not committed, then committed groups oldest first
  std::vector<PendingCopy> uncommitted;
  std::vector<std::vector<PendingCopy>> groups;
  // global-memory allocation of the last checked access (fast path)
  const struct Allocation* last_alloc = nullptr;
  bool acquired = false;  // did a global atomic (may read other blocks' writes after it)
};

struct Block {
  int size = 0;           // threads
  Thread* threads = nullptr;
  uint32_t barriers = 0;  // __syncthreads passed so far (the block's epoch)
  uint32_t generation = 0;  // unique per block run: shared-memory shadow older than this is stale
  uint32_t launch = 0;    // unique per launch
  uint32_t linear_block = 0;
  int at_barrier = 0, exited = 0;
  int reduce_acc = 0;
};

extern Block g_block;
extern Thread* g_thread;  // the running thread

// ------------------------------------------------------------------------------ errors

// Reports a kernel error from inside a fiber (names the kernel, block and thread) and never
// returns: the launch is abandoned and throws the message to the caller.
[[noreturn]] void fail(const std::string& what);
std::string where_thread(int tid);

// Yields the running fiber back to the scheduler.
void yield();

// --------------------------------------------------------------------------- memory

void memcheck_begin_block(size_t dynamic_smem, uint32_t generation);
void set_checking(bool on);
bool checking();

// Runtime code called from a kernel runs unchecked: inline library code (std::string, vectors) is
// shared with the instrumented kernel objects and must not check the runtime's own memory.
struct Unchecked {
  bool saved;
  Unchecked() : saved(checking()) { set_checking(false); }
  ~Unchecked() { set_checking(saved); }
  Unchecked(const Unchecked&) = delete;
  Unchecked& operator=(const Unchecked&) = delete;
};
// Checked accesses done by the runtime on behalf of the running thread (ldmatrix, cp.async).
void check_access(const void* address, size_t bytes, bool write);
bool is_shared(const void* address, size_t bytes);
// A warp-wide operation synchronised these lanes (vector clocks, race checker).
void warp_synchronised(int warp, unsigned lanes);
void memcheck_thread_start(Thread& t);
// cp.async: marks shared bytes as awaiting a copy (any access to them is an error until the copy
// lands at wait_group), or clears the mark.
void mark_pending(const void* dst, size_t bytes, bool pending);

}  // namespace crosshead_emu
