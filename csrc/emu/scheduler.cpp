// Runs a launch: blocks one after another; the threads of a block as fibers that switch only at
// barriers, warp collectives and exit, always resumed in thread order, so a run is deterministic.
// Barrier and collective rules are checked (same call site, consistent masks, no exited member),
// and every error stops the launch with the kernel, block and thread named.
#include <cstdio>
#include <cstring>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>

#include "emu/internal.h"

namespace crosshead_emu {

ThreadState* g_current = nullptr;
Geometry g_geometry{};
Block g_block;
Thread* g_thread = nullptr;

namespace {

ThreadState g_states[kMaxThreads];
Thread g_threads[kMaxThreads];
Fiber g_scheduler;
constexpr size_t kStackBytes = 256 * 1024;
int g_stacks = 0;  // fibers with a stack so far

std::mutex g_launch_mutex;  // one launch at a time, process-wide
std::string g_kernel;       // name of the running kernel
std::string g_error;        // set by fail(), thrown by launch()
bool g_aborted = false;
uint32_t g_launches = 0, g_generations = 0;

void (*g_body)(void*) = nullptr;
void* g_ctx = nullptr;

std::string kernel_name(const char* signature) {
  std::string s(signature);
  const auto at = s.find("Kernel = ");
  if (at == std::string::npos) return s;
  std::string name = s.substr(at + 9);
  const auto end = name.find_first_of(";]");
  return end == std::string::npos ? name : name.substr(0, end);
}

std::string idx(const Idx3& i) {
  std::ostringstream o;
  o << "(" << i.x << ", " << i.y << ", " << i.z << ")";
  return o.str();
}

void release_barrier();

void fiber_main(void* arg) {
  Thread& t = *static_cast<Thread*>(arg);
  try {
    g_body(g_ctx);
  } catch (const std::exception& e) {
    fail(std::string("exception in device code: ") + e.what());
  }
  set_checking(false);
  t.wait = Wait::exited;
  ++g_block.exited;
  if (g_block.at_barrier > 0 && g_block.at_barrier + g_block.exited == g_block.size) release_barrier();
  yield();
  std::abort();  // an exited fiber is never resumed
}

}  // namespace

std::string where_thread(int tid) {
  const ThreadState& s = g_states[tid];
  std::ostringstream o;
  o << "kernel " << g_kernel << ", block " << idx(g_geometry.block_idx) << ", thread " << idx(s.idx)
    << " (warp " << s.warp << ", lane " << s.lane << ")";
  return o.str();
}

void fail(const std::string& what) {
  if (g_error.empty()) {
    g_error = "crosshead CUDA emulator: " + what;
    if (g_thread) g_error += "\n  at " + where_thread(g_thread->state->tid);
  }
  g_aborted = true;
  set_checking(false);
  fiber_switch(g_thread->fiber, g_scheduler);
  std::abort();  // an aborted launch never resumes its fibers
}

void yield() {
  set_checking(false);
  fiber_switch(g_thread->fiber, g_scheduler);
  set_checking(false);  // the runtime function that yielded restores the kernel's checking on return
}

void enter_kernel() {
  set_checking(true);
}

void leave_kernel() {
  set_checking(false);
}

void trap(const char* file, int line) {
  Unchecked unchecked;
  fail(std::string("__trap() at ") + file + ":" + std::to_string(line));
}

void fail_assert(const char* expr, const char* file, int line) {
  Unchecked unchecked;
  fail(std::string("device assertion `") + expr + "` failed at " + file + ":" + std::to_string(line));
}

// ------------------------------------------------------------------------------ barriers

namespace {

std::string site(const char* file, int line) { return std::string(file) + ":" + std::to_string(line); }

// Called by the last live thread to reach a barrier: every thread must wait at the same site.
void release_barrier() {
  Block& b = g_block;
  const Thread* first = nullptr;
  for (int i = 0; i < b.size; ++i) {
    const Thread& t = b.threads[i];
    if (t.wait == Wait::exited) continue;
    if (!first) first = &t;
    if (t.line != first->line || std::strcmp(t.file, first->file) != 0)
      fail("divergent __syncthreads: thread " + std::to_string(first->state->tid) + " waits at " +
           site(first->file, first->line) + ", thread " + std::to_string(i) + " at " + site(t.file, t.line));
  }
  if (b.exited > 0)
    fail("__syncthreads at " + site(first->file, first->line) + " reached while " + std::to_string(b.exited) +
         " thread(s) of the block have exited (a barrier in non-uniform control flow)");
  for (int i = 0; i < b.size; ++i) {
    if (b.threads[i].wait != Wait::barrier) continue;
    b.threads[i].wait = Wait::none;
    b.threads[i].out[0] = static_cast<uint64_t>(b.reduce_acc);
  }
  b.at_barrier = 0;
  ++b.barriers;
}

}  // namespace

void syncthreads(const char* file, int line) { syncthreads_reduce(0, -1, file, line); }

int syncthreads_reduce(int predicate, int kind, const char* file, int line) {
  Unchecked unchecked;
  Block& b = g_block;
  Thread& t = *g_thread;
  if (b.at_barrier == 0) b.reduce_acc = kind == 1 ? 1 : 0;
  if (kind == 0) b.reduce_acc += predicate != 0;
  if (kind == 1) b.reduce_acc &= predicate != 0;
  if (kind == 2) b.reduce_acc |= predicate != 0;
  t.wait = Wait::barrier;
  t.file = file;
  t.line = line;
  if (++b.at_barrier + b.exited == b.size) release_barrier();
  yield();
  return static_cast<int>(t.out[0]);
}

// ---------------------------------------------------------------------- warp collectives

namespace {

enum Op { kSyncWarp = 1, kShfl, kVote, kMma, kLdmatrix };
const char* op_name(int op) {
  switch (op) {
    case kSyncWarp: return "__syncwarp";
    case kShfl: return "a shuffle";
    case kVote: return "a vote";
    case kMma: return "mma.sync";
    case kLdmatrix: return "ldmatrix";
    default: return "?";
  }
}

using Complete = void (*)(Thread* lanes[kWarp], unsigned mask);

// Parks the running lane at a collective; when every lane of its mask is parked at the same one,
// `complete` computes all their results. Returns once the collective is done.
void collective(int op, unsigned mask, const char* file, int line, Complete complete) {
  Thread& t = *g_thread;
  const int lane = t.state->lane, warp = t.state->warp;
  const int warp_base = warp * kWarp;
  const int warp_size = std::min(kWarp, g_block.size - warp_base);
  const unsigned existing = warp_size == kWarp ? 0xffffffffu : ((1u << warp_size) - 1);
  if (!(mask >> lane & 1u))
    fail(std::string(op_name(op)) + " at " + site(file, line) + ": the mask 0x" +
         ([&] { char b[16]; std::snprintf(b, sizeof b, "%08x", mask); return std::string(b); })() +
         " does not include the calling lane");
  if (mask & ~existing) fail(std::string(op_name(op)) + " at " + site(file, line) + ": the mask names lanes the block does not have");
  t.wait = Wait::warp;
  t.op = op;
  t.mask = mask;
  t.file = file;
  t.line = line;
  Thread* lanes[kWarp] = {};
  bool ready = true;
  for (int l = 0; l < kWarp; ++l) {
    if (!(mask >> l & 1u)) continue;
    Thread& u = g_block.threads[warp_base + l];
    lanes[l] = &u;
    if (u.wait == Wait::exited)
      fail(std::string(op_name(op)) + " at " + site(file, line) + ": lane " + std::to_string(l) +
           " of the mask has exited");
    if (u.wait != Wait::warp) {
      ready = false;
      continue;
    }
    if (u.op != op || u.mask != mask || u.line != line || std::strcmp(u.file, file) != 0)
      fail("warp divergence at a collective: lane " + std::to_string(lane) + " is at " + op_name(op) + " (" +
           site(file, line) + ") but lane " + std::to_string(l) + " waits at " + op_name(u.op) + " (" +
           site(u.file, u.line) + ")");
  }
  if (ready) {
    complete(lanes, mask);
    warp_synchronised(warp, mask);
    for (int l = 0; l < kWarp; ++l) {
      if (lanes[l]) lanes[l]->wait = Wait::none;
    }
  }
  yield();
}

int src_lane(Shfl mode, int lane, int src, int width) {
  const int base = lane & ~(width - 1);
  switch (mode) {
    case Shfl::idx: return base + (src & (width - 1));
    case Shfl::up: return lane - src >= base ? lane - src : lane;
    case Shfl::down: return lane + src < base + width ? lane + src : lane;
    case Shfl::bfly: return (lane ^ src) < base + width ? (lane ^ src) : lane;
  }
  return lane;
}

}  // namespace

void syncwarp(unsigned mask, const char* file, int line) {
  Unchecked unchecked;
  collective(kSyncWarp, mask, file, line, [](Thread**, unsigned) {});
}

uint64_t shfl(unsigned mask, uint64_t value, int src, int width, Shfl mode, const char* file, int line) {
  Unchecked unchecked;
  if (width <= 0 || width > kWarp || (width & (width - 1)))
    fail("shuffle at " + site(file, line) + ": width " + std::to_string(width) + " is not a power of two <= 32");
  Thread& t = *g_thread;
  t.in[0] = value;
  t.in[1] = static_cast<uint64_t>(src);
  t.in[2] = static_cast<uint64_t>(width);
  t.in[3] = static_cast<uint64_t>(mode);
  collective(kShfl, mask, file, line, [](Thread** lanes, unsigned mask) {
    for (int l = 0; l < kWarp; ++l) {
      if (!lanes[l]) continue;
      const Thread& me = *lanes[l];
      const int s = src_lane(static_cast<Shfl>(me.in[3]), l, static_cast<int>(me.in[1]), static_cast<int>(me.in[2]));
      // a source lane outside the mask yields an undefined value on the GPU: reported
      if (!(mask >> s & 1u))
        fail("shuffle at " + site(me.file, me.line) + ": lane " + std::to_string(l) + " reads lane " +
             std::to_string(s) + ", which is not in the mask");
      lanes[l]->out[0] = lanes[s]->in[0];
    }
  });
  return t.out[0];
}

unsigned vote(unsigned mask, int predicate, Vote mode, const char* file, int line) {
  Unchecked unchecked;
  Thread& t = *g_thread;
  t.in[0] = predicate != 0;
  t.in[1] = static_cast<uint64_t>(mode);
  collective(kVote, mask, file, line, [](Thread** lanes, unsigned) {
    unsigned ballot = 0;
    for (int l = 0; l < kWarp; ++l) {
      if (lanes[l] && lanes[l]->in[0]) ballot |= 1u << l;
    }
    unsigned members = 0;
    for (int l = 0; l < kWarp; ++l) members |= lanes[l] ? 1u << l : 0u;
    for (int l = 0; l < kWarp; ++l) {
      if (!lanes[l]) continue;
      switch (static_cast<Vote>(lanes[l]->in[1])) {
        case Vote::all: lanes[l]->out[0] = ballot == members; break;
        case Vote::any: lanes[l]->out[0] = ballot != 0; break;
        case Vote::ballot: lanes[l]->out[0] = ballot; break;
      }
    }
  });
  return static_cast<unsigned>(t.out[0]);
}

unsigned active_mask() {
  Unchecked unchecked;
  // Fibers run one at a time; the lanes of the warp that have not exited are reported active.
  const int warp_base = g_thread->state->warp * kWarp;
  unsigned m = 0;
  for (int l = 0; l < kWarp && warp_base + l < g_block.size; ++l) {
    if (g_block.threads[warp_base + l].wait != Wait::exited) m |= 1u << l;
  }
  return m;
}

// Used by ptx.cpp: a full-warp, converged collective (mma.sync.aligned, ldmatrix.sync.aligned).
void aligned_warp_op(int op_kind, const char* file, int line, void (*complete)(Thread** lanes, unsigned mask)) {
  collective(op_kind == 0 ? kMma : kLdmatrix, 0xffffffffu, file, line, complete);
}

// ---------------------------------------------------------------------------- the launch

namespace {

std::string deadlock_report() {
  for (int i = 0; i < g_block.size; ++i) {  // a collective waiting for a lane that has exited
    const Thread& t = g_block.threads[i];
    if (t.wait != Wait::warp) continue;
    for (int l = 0; l < kWarp; ++l) {
      const int j = t.state->warp * kWarp + l;
      if ((t.mask >> l & 1u) && j < g_block.size && g_block.threads[j].wait == Wait::exited)
        return std::string(op_name(t.op)) + " at " + site(t.file, t.line) + ": lane " + std::to_string(l) +
               " of the mask has exited (thread " + std::to_string(i) + " waits for it)";
    }
  }
  std::ostringstream o;
  o << "deadlock: no thread can run.";
  int shown = 0;
  for (int i = 0; i < g_block.size && shown < 8; ++i) {
    const Thread& t = g_block.threads[i];
    if (t.wait == Wait::barrier) {
      o << "\n  thread " << i << " waits at __syncthreads (" << site(t.file, t.line) << ")";
      ++shown;
    } else if (t.wait == Wait::warp) {
      o << "\n  thread " << i << " waits at " << op_name(t.op) << " (" << site(t.file, t.line) << ")";
      ++shown;
    }
  }
  return o.str();
}

void run_block() {
  Block& b = g_block;
  for (int i = 0; i < b.size; ++i) {
    Thread& t = b.threads[i];
    t.wait = Wait::none;
    t.uncommitted.clear();
    t.groups.clear();
    t.last_alloc = nullptr;
    memcheck_thread_start(t);
    fiber_start(t.fiber, &fiber_main, &t);
  }
  b.barriers = 0;
  b.at_barrier = 0;
  b.exited = 0;
  for (;;) {
    bool ran = false;
    for (int i = 0; i < b.size; ++i) {
      Thread& t = b.threads[i];
      if (t.wait != Wait::none) continue;
      g_thread = &t;
      g_current = t.state;
      fiber_switch(g_scheduler, t.fiber);
      set_checking(false);
      ran = true;
      if (g_aborted) return;
    }
    if (b.exited == b.size) break;
    if (!ran) {
      g_thread = nullptr;
      g_error = "crosshead CUDA emulator: " + deadlock_report() + "\n  at kernel " + g_kernel + ", block " +
                idx(g_geometry.block_idx);
      g_aborted = true;
      return;
    }
  }
  for (int i = 0; i < b.size; ++i) {
    if (!b.threads[i].uncommitted.empty() || !b.threads[i].groups.empty()) {
      g_thread = &b.threads[i];
      g_error = "crosshead CUDA emulator: a thread exited with cp.async copies never waited for\n  at " +
                where_thread(i);
      g_aborted = true;
      return;
    }
  }
}

void check_config(const LaunchConfig& c, const std::string& name);

}  // namespace

size_t func_max_dynamic_smem(const void* kernel);  // cuda_api.cpp

namespace {
std::string g_launch_log;
}

std::string launch_log(bool clear) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  std::string log = g_launch_log;
  if (clear) g_launch_log.clear();
  return log;
}

void launch(const LaunchConfig& c, void (*body)(void*), void* ctx) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  g_kernel = kernel_name(c.kernel_name);
  if (g_launch_log.size() < (1u << 20)) {
    std::ostringstream line;
    line << g_kernel << " " << c.grid.x << " " << c.grid.y << " " << c.grid.z << " "
         << c.block.x * c.block.y * c.block.z << " " << c.dynamic_smem << "\n";
    g_launch_log += line.str();
  }
  check_config(c, g_kernel);
  const int threads = static_cast<int>(c.block.x * c.block.y * c.block.z);
  while (g_stacks < threads) {
    fiber_alloc_stack(g_threads[g_stacks].fiber, kStackBytes);
    ++g_stacks;
  }
  g_block.threads = g_threads;
  g_block.size = threads;
  g_block.launch = ++g_launches;
  for (int i = 0; i < threads; ++i) {
    ThreadState& s = g_states[i];
    s.tid = i;
    s.lane = i % kWarp;
    s.warp = i / kWarp;
    s.idx = Idx3{static_cast<unsigned>(i % c.block.x), static_cast<unsigned>(i / c.block.x % c.block.y),
                 static_cast<unsigned>(i / (c.block.x * c.block.y))};
    g_threads[i].state = &s;
  }
  g_body = body;
  g_ctx = ctx;
  g_error.clear();
  g_aborted = false;
  g_geometry.block_dim = c.block;
  g_geometry.grid_dim = c.grid;
  uint32_t linear = 0;
  for (unsigned z = 0; z < c.grid.z && !g_aborted; ++z) {
    for (unsigned y = 0; y < c.grid.y && !g_aborted; ++y) {
      for (unsigned x = 0; x < c.grid.x && !g_aborted; ++x) {
        g_geometry.block_idx = Idx3{x, y, z};
        g_block.linear_block = linear++;
        g_block.generation = ++g_generations;
        memcheck_begin_block(c.dynamic_smem, g_block.generation);
        run_block();
      }
    }
  }
  g_thread = nullptr;
  g_current = nullptr;
  set_checking(false);
  if (g_aborted) throw std::runtime_error(g_error);
}

namespace {

void check_config(const LaunchConfig& c, const std::string& name) {
  auto bad = [&](const std::string& why) {
    throw std::runtime_error("crosshead CUDA emulator: launch of " + name + " rejected (the GPU would reject it "
                             "too): " + why);
  };
  const uint64_t threads = uint64_t(c.block.x) * c.block.y * c.block.z;
  if (threads == 0 || threads > kMaxThreads || c.block.z > 64)
    bad("block " + idx(c.block) + " has " + std::to_string(threads) + " threads (1..1024)");
  if (c.grid.x == 0 || c.grid.y == 0 || c.grid.z == 0 || c.grid.y > 65535 || c.grid.z > 65535 ||
      c.grid.x > 2147483647u)
    bad("grid " + idx(c.grid) + " is empty or too large");
  const size_t limit = func_max_dynamic_smem(c.kernel);
  if (c.dynamic_smem > limit)
    bad(std::to_string(c.dynamic_smem) + " bytes of dynamic shared memory requested; the limit for this kernel "
        "is " + std::to_string(limit) + (limit <= 48 * 1024 ? " (raise it with cudaFuncSetAttribute("
        "cudaFuncAttributeMaxDynamicSharedMemorySize))" : ""));
}

}  // namespace

}  // namespace crosshead_emu
