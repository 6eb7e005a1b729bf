// Memory checking of emulated kernels. Kernel sources are compiled with
// -fsanitize=kernel-address and every load and store calls the __asan_* hooks below, which, while
// a thread is inside its kernel function:
//  * classify the address: shared memory (the arena of the generated shared-symbol table), the
//    thread's own stack, a live CPU tensor allocation (registered by the allocator installed here,
//    which surrounds each allocation with a red zone and fills it with 0xFF = NaN), or this
//    library's own data; anything else is an out-of-bounds access;
//  * check natural alignment of 2/4/8/16-byte accesses to shared and global memory;
//  * run a happens-before race check: shared memory per 2 bytes (read-after-write,
//    write-after-write, write-after-read, uninitialised reads), global memory per 2 bytes
//    (read-after-write and write-after-write, also across blocks). Two accesses of different
//    threads are ordered by a __syncthreads between them, or, within a warp, by a warp collective
//    both took part in (vector clocks over the lanes).
#include <dlfcn.h>
#include <link.h>

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <sstream>

#include "emu/internal.h"

// The generated shared-memory arena (crosshead/_emulator_build.py): the dynamic window at offset 0,
// then one slot per static __shared__ variable.
struct CrossheadEmuSharedSymbol {
  const char* name;
  size_t offset;
  int dynamic;
};
extern "C" char crosshead_emu_arena[];
extern "C" const size_t crosshead_emu_arena_bytes;
extern "C" const CrossheadEmuSharedSymbol crosshead_emu_shared_symbols[];
extern "C" const int crosshead_emu_shared_symbol_count;

namespace crosshead_emu {

struct Allocation {
  uintptr_t lo;
  size_t bytes;
  char* base;  // of the red-zoned block
  void* shadow = nullptr;  // lazily, one GlobalCell per 2 bytes
};

namespace {

thread_local bool t_checking __attribute__((tls_model("initial-exec"))) = false;

constexpr size_t kRedzone = 64;
constexpr int16_t kNone = -1, kSeveral = -2;

struct SharedCell {
  uint32_t gen;  // block generation of the last write; older: never written in this block
  uint32_t w_bar, w_clock;
  uint32_t r_gen, r_bar, r_clock, r_wsync;
  uint32_t pending;  // block generation in which a cp.async into it is in flight
  int16_t w_tid, r_tid, r_warp;
  uint8_t atomic;
};

struct GlobalCell {
  uint32_t launch, block, bar, clock;
  int16_t tid;
  uint8_t atomic;
};

SharedCell* g_shared_shadow = nullptr;  // one per 2 bytes of the arena
size_t g_dynamic_bytes = 0;              // this launch's dynamic shared memory
uint32_t g_generation = 0;
uint32_t g_warp_syncs[kMaxThreads / kWarp];
uintptr_t g_module_lo = 0, g_module_hi = 0;

std::mutex g_alloc_mutex;
std::map<uintptr_t, Allocation*> g_allocations;

std::string hex(uintptr_t a) {
  char b[32];
  std::snprintf(b, sizeof b, "0x%llx", static_cast<unsigned long long>(a));
  return b;
}

const char* access_kind(bool write) { return write ? "write" : "read"; }

std::string shared_name(uintptr_t a) {
  const uintptr_t arena = reinterpret_cast<uintptr_t>(crosshead_emu_arena);
  if (a - arena < kDynamicSmemMax) return "dynamic shared memory + " + std::to_string(a - arena) + " bytes";
  const CrossheadEmuSharedSymbol* best = nullptr;
  for (int i = 0; i < crosshead_emu_shared_symbol_count; ++i) {
    const auto& s = crosshead_emu_shared_symbols[i];
    if (!s.dynamic && arena + s.offset <= a && (!best || s.offset > best->offset)) best = &s;
  }
  if (!best) return "shared memory";
  return std::string("static shared `") + best->name + "` + " + std::to_string(a - arena - best->offset) + " bytes";
}

int lane_of(int tid) { return tid % kWarp; }
int warp_of(int tid) { return tid / kWarp; }

// Is an access of thread `tid` in barrier epoch `bar` at its own clock `clock` ordered before the
// running thread's current access?
bool ordered(int tid, uint32_t bar, uint32_t clock) {
  const Thread& me = *g_thread;
  if (bar != g_block.barriers) return true;
  if (tid == me.state->tid) return true;
  return warp_of(tid) == me.state->warp && me.vc[lane_of(tid)] >= clock;
}

uint32_t own_clock() { return g_thread->vc[g_thread->state->lane]; }

void fail_race(const std::string& where, bool write, const char* hazard, int other, const char* other_kind) {
  fail(std::string("race on ") + where + ": this thread " + access_kind(write) + "s it after thread " +
       std::to_string(other) + " " + other_kind + " it with no __syncthreads (or, within a warp, no warp-wide "
       "sync) in between [" + hazard + "]");
}

void shared_access(uintptr_t a, size_t n, bool write, bool atomic) {
  const uintptr_t arena = reinterpret_cast<uintptr_t>(crosshead_emu_arena);
  const size_t off = a - arena;
  // bounds: the launch's dynamic window, or a static variable's slot
  bool inside = off + n <= g_dynamic_bytes;
  if (!inside) {
    for (int i = 0; i < crosshead_emu_shared_symbol_count && !inside; ++i) {
      const auto& s = crosshead_emu_shared_symbols[i];
      inside = !s.dynamic && off >= s.offset && off + n <= s.offset + kStaticSmemMax;
    }
  }
  if (!inside) {
    if (off < kDynamicSmemMax)
      fail("out-of-bounds " + std::string(access_kind(write)) + " of " + std::to_string(n) + " bytes at " +
           shared_name(a) + ": the launch has " + std::to_string(g_dynamic_bytes) + " bytes of dynamic shared memory");
    fail("out-of-bounds " + std::string(access_kind(write)) + " of " + std::to_string(n) + " bytes at " +
         shared_name(a));
  }
  const int me = g_thread->state->tid;
  const uint32_t bar = g_block.barriers;
  for (size_t c = off / 2; c < (off + n + 1) / 2; ++c) {
    SharedCell& s = g_shared_shadow[c];
    if (s.pending == g_generation)
      fail(std::string(access_kind(write)) + " of " + shared_name(arena + 2 * c) +
           " while a cp.async into it is still in flight (wait for its group first)");
    const bool written = s.gen == g_generation;
    if (!write) {
      if (!written)
        fail("read of uninitialised " + shared_name(arena + 2 * c) + ": no thread of this block has written it "
             "yet (threads run in order between barriers, so a write by a later thread before a missing "
             "__syncthreads shows up here)");
      if (!atomic && !s.atomic && !ordered(s.w_tid, s.w_bar, s.w_clock))
        fail_race(shared_name(arena + 2 * c), false, "read after write", s.w_tid, "wrote");
      if (s.r_gen != g_generation || s.r_bar != bar || s.r_tid == kNone) {
        s.r_gen = g_generation;
        s.r_bar = bar;
        s.r_tid = static_cast<int16_t>(me);
        s.r_warp = static_cast<int16_t>(warp_of(me));
        s.r_clock = own_clock();
      } else if (s.r_tid != me) {
        s.r_tid = kSeveral;
        if (s.r_warp != warp_of(me)) s.r_warp = kNone;
      }
      s.r_wsync = g_warp_syncs[warp_of(me)];
      continue;
    }
    if (written && !atomic) {
      if (!s.atomic && !ordered(s.w_tid, s.w_bar, s.w_clock))
        fail_race(shared_name(arena + 2 * c), true, "write after write", s.w_tid, "wrote");
      if (s.r_gen == g_generation && s.r_bar == bar && s.r_tid != kNone && s.r_tid != me) {
        const bool ok = s.r_tid >= 0 ? ordered(s.r_tid, s.r_bar, s.r_clock)
                                     : (s.r_warp == warp_of(me) && g_warp_syncs[warp_of(me)] != s.r_wsync);
        if (!ok) fail_race(shared_name(arena + 2 * c), true, "write after read", s.r_tid >= 0 ? s.r_tid : -1, "read");
      }
    }
    s.gen = g_generation;
    s.w_tid = static_cast<int16_t>(me);
    s.w_bar = bar;
    s.w_clock = own_clock();
    s.r_gen = 0;
    s.atomic = atomic;
  }
}

void global_access(Allocation& al, uintptr_t a, size_t n, bool write, bool atomic) {
  if (!write && !al.shadow) return;  // never written by a kernel since it was allocated
  if (!al.shadow) {
    al.shadow = std::calloc((al.bytes + 1) / 2 + 1, sizeof(GlobalCell));
    if (!al.shadow) fail("out of host memory for the race checker's shadow");
  }
  auto* cells = reinterpret_cast<GlobalCell*>(al.shadow);
  Thread& t = *g_thread;
  const int me = t.state->tid;
  for (size_t c = (a - al.lo) / 2; c < (a - al.lo + n + 1) / 2; ++c) {
    GlobalCell& s = cells[c];
    const bool this_launch = s.launch == g_block.launch;
    if (this_launch && !(atomic && s.atomic)) {
      if (s.block != g_block.linear_block) {
        if (write || !(t.acquired || s.atomic))
          fail("race on global memory at " + hex(al.lo + 2 * c) + " (byte " + std::to_string(2 * c) + " of a " +
               std::to_string(al.bytes) + "-byte tensor): this thread " + access_kind(write) +
               "s it after thread " + std::to_string(s.tid) + " of block #" + std::to_string(s.block) +
               " (linear index) wrote it in the same launch; blocks are not ordered");
      } else if (!s.atomic && !ordered(s.tid, s.bar, s.clock)) {
        fail_race("global memory at " + hex(al.lo + 2 * c), write, write ? "write after write" : "read after write",
                  s.tid, "wrote");
      }
    }
    if (write) {
      s.launch = g_block.launch;
      s.block = g_block.linear_block;
      s.bar = g_block.barriers;
      s.clock = own_clock();
      s.tid = static_cast<int16_t>(me);
      s.atomic = atomic;
    }
  }
}

Allocation* find_allocation(uintptr_t a) {
  std::lock_guard<std::mutex> lock(g_alloc_mutex);
  auto it = g_allocations.upper_bound(a);
  if (it == g_allocations.begin()) return nullptr;
  --it;
  Allocation* al = it->second;
  return a - al->lo < std::max<size_t>(al->bytes, 1) ? al : nullptr;
}

std::string describe_unknown(uintptr_t a, size_t n) {
  for (int i = 0; i < g_block.size; ++i) {
    const Fiber& f = g_block.threads[i].fiber;
    if (a >= reinterpret_cast<uintptr_t>(f.stack_lo) && a < reinterpret_cast<uintptr_t>(f.stack_hi))
      return "the local memory (stack) of thread " + std::to_string(i);
  }
  std::lock_guard<std::mutex> lock(g_alloc_mutex);
  auto it = g_allocations.upper_bound(a);
  std::ostringstream o;
  o << "address " << hex(a) << ", which is in no tensor allocation";
  if (it != g_allocations.begin()) {
    const Allocation* prev = std::prev(it)->second;
    const uintptr_t end = prev->lo + prev->bytes;
    if (a >= end && a - end < 4096)
      o << ": " << a - end << " bytes past the end of a " << prev->bytes << "-byte tensor allocation";
  }
  if (it != g_allocations.end() && it->second->lo > a && it->second->lo - a < 4096 && a + n <= it->second->lo)
    o << " (" << it->second->lo - a << " bytes before the start of a " << it->second->bytes << "-byte allocation)";
  return o.str();
}

inline void check(uintptr_t a, size_t n, bool write, bool atomic = false) {
  Unchecked unchecked;
  Thread& t = *g_thread;
  const uintptr_t arena = reinterpret_cast<uintptr_t>(crosshead_emu_arena);
  const bool vector = n == 2 || n == 4 || n == 8 || n == 16;
  if (a - arena < crosshead_emu_arena_bytes) {
    if (vector && (a & (n - 1)))
      fail("misaligned " + std::to_string(n) + "-byte " + access_kind(write) + " at " + shared_name(a));
    shared_access(a, n, write, atomic);
    return;
  }
  const uintptr_t stack_lo = reinterpret_cast<uintptr_t>(t.fiber.stack_lo);
  if (a - stack_lo < static_cast<uintptr_t>(t.fiber.stack_hi - t.fiber.stack_lo)) return;
  Allocation* al = const_cast<Allocation*>(t.last_alloc);
  if (!al || a - al->lo >= al->bytes) al = find_allocation(a);
  if (al) {
    t.last_alloc = al;
    if (a + n > al->lo + al->bytes)
      fail("out-of-bounds " + std::string(access_kind(write)) + " of " + std::to_string(n) + " bytes at " + hex(a) +
           ": it runs " + std::to_string(a + n - al->lo - al->bytes) + " bytes past the end of a " +
           std::to_string(al->bytes) + "-byte tensor allocation");
    if (vector && (a & (n - 1)))
      fail("misaligned " + std::to_string(n) + "-byte " + access_kind(write) + " of global memory at " + hex(a));
    global_access(*al, a, n, write, atomic);
    return;
  }
  if (a >= g_module_lo && a + n <= g_module_hi) return;  // this library's own data (constants, runtime state)
  fail("out-of-bounds " + std::string(access_kind(write)) + " of " + std::to_string(n) + " bytes: " +
       describe_unknown(a, n));
}

// --------------------------------------------------------------- the checking allocator

struct CheckingCPUAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    char* base = static_cast<char*>(c10::alloc_cpu(n + 2 * kRedzone));
    char* data = base + kRedzone;
    std::memset(data, 0xff, n);  // uninitialised memory reads as NaN (all types' all-ones pattern)
    auto* al = new Allocation{reinterpret_cast<uintptr_t>(data), n, base};
    {
      std::lock_guard<std::mutex> lock(g_alloc_mutex);
      g_allocations[al->lo] = al;
    }
    return {data, al, &CheckingCPUAllocator::release, c10::Device(c10::DeviceType::CPU)};
  }
  static void release(void* ctx) {
    auto* al = static_cast<Allocation*>(ctx);
    {
      std::lock_guard<std::mutex> lock(g_alloc_mutex);
      g_allocations.erase(al->lo);
    }
    std::free(al->shadow);
    c10::free_cpu(al->base);
    delete al;
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }
};

CheckingCPUAllocator g_allocator;

int find_module(struct dl_phdr_info* info, size_t, void*) {
  const uintptr_t probe = reinterpret_cast<uintptr_t>(&g_allocator);
  uintptr_t lo = UINTPTR_MAX, hi = 0;
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const auto& ph = info->dlpi_phdr[i];
    if (ph.p_type != PT_LOAD) continue;
    lo = std::min<uintptr_t>(lo, info->dlpi_addr + ph.p_vaddr);
    hi = std::max<uintptr_t>(hi, info->dlpi_addr + ph.p_vaddr + ph.p_memsz);
  }
  if (probe >= lo && probe < hi) {
    g_module_lo = lo;
    g_module_hi = hi;
    return 1;
  }
  return 0;
}

struct Init {
  Init() {
    c10::SetCPUAllocator(&g_allocator, /*priority=*/100);
    dl_iterate_phdr(&find_module, nullptr);
    g_shared_shadow = static_cast<SharedCell*>(std::calloc(crosshead_emu_arena_bytes / 2 + 1, sizeof(SharedCell)));
  }
} g_init;

}  // namespace

void set_checking(bool on) { t_checking = on; }
bool checking() { return t_checking; }

void memcheck_begin_block(size_t dynamic_smem, uint32_t generation) {
  g_dynamic_bytes = dynamic_smem;
  g_generation = generation;
  // Fresh shared memory reads as NaN, as left over from another block would be garbage.
  std::memset(crosshead_emu_arena, 0xff, std::min(dynamic_smem, kDynamicSmemMax));
  for (int i = 0; i < crosshead_emu_shared_symbol_count; ++i) {
    const auto& s = crosshead_emu_shared_symbols[i];
    if (!s.dynamic) std::memset(crosshead_emu_arena + s.offset, 0xff, kStaticSmemMax);
  }
  for (auto& w : g_warp_syncs) w = 0;
}

void memcheck_thread_start(Thread& t) {
  std::fill(std::begin(t.vc), std::end(t.vc), 0u);
  t.vc[t.state->lane] = 1;
  t.acquired = false;
}

void warp_synchronised(int warp, unsigned lanes) {
  uint32_t merged[kWarp] = {};
  Thread* members[kWarp];
  int count = 0;
  for (int l = 0; l < kWarp; ++l) {
    if (!(lanes >> l & 1u)) continue;
    Thread& t = g_block.threads[warp * kWarp + l];
    members[count++] = &t;
    for (int k = 0; k < kWarp; ++k) merged[k] = std::max(merged[k], t.vc[k]);
  }
  for (int i = 0; i < count; ++i) {
    std::copy(std::begin(merged), std::end(merged), members[i]->vc);
    ++members[i]->vc[members[i]->state->lane];
  }
  ++g_warp_syncs[warp];
}

void check_access(const void* address, size_t bytes, bool write) {
  check(reinterpret_cast<uintptr_t>(address), bytes, write);
}

bool is_shared(const void* address, size_t bytes) {
  const uintptr_t off = reinterpret_cast<uintptr_t>(address) - reinterpret_cast<uintptr_t>(crosshead_emu_arena);
  return off < crosshead_emu_arena_bytes && off + bytes <= crosshead_emu_arena_bytes;
}

void mark_pending(const void* dst, size_t bytes, bool pending) {
  const size_t off = static_cast<const char*>(dst) - crosshead_emu_arena;
  for (size_t c = off / 2; c < (off + bytes + 1) / 2; ++c) g_shared_shadow[c].pending = pending ? g_generation : 0;
}

void check_vector_alignment(const void* address, size_t bytes) {
  if (!t_checking || reinterpret_cast<uintptr_t>(address) % bytes == 0) return;
  Unchecked unchecked;
  const uintptr_t a = reinterpret_cast<uintptr_t>(address);
  fail("misaligned " + std::to_string(bytes) + "-byte vector access at " +
       (is_shared(address, bytes) ? shared_name(a) : hex(a)) + " (a GPU faults on it)");
}

void note_atomic(const void* address, size_t bytes) {
  if (!t_checking) return;
  Unchecked unchecked;
  const uintptr_t a = reinterpret_cast<uintptr_t>(address);
  check(a, bytes, true, /*atomic=*/true);
  if (!is_shared(address, bytes)) g_thread->acquired = true;
}

}  // namespace crosshead_emu

// ------------------------------------------------------------- compiler instrumentation hooks

#define CROSSHEAD_EMU_HOOK(kind, n, write)                                                            \
  extern "C" __attribute__((visibility("hidden"))) void __asan_##kind##n##_noabort(uintptr_t a) {      \
    if (crosshead_emu::t_checking) crosshead_emu::check(a, n, write);                                   \
  }                                                                                                    \
  extern "C" __attribute__((visibility("hidden"))) void __asan_##kind##n(uintptr_t a) {                \
    if (crosshead_emu::t_checking) crosshead_emu::check(a, n, write);                                   \
  }
CROSSHEAD_EMU_HOOK(load, 1, false)
CROSSHEAD_EMU_HOOK(load, 2, false)
CROSSHEAD_EMU_HOOK(load, 4, false)
CROSSHEAD_EMU_HOOK(load, 8, false)
CROSSHEAD_EMU_HOOK(load, 16, false)
CROSSHEAD_EMU_HOOK(store, 1, true)
CROSSHEAD_EMU_HOOK(store, 2, true)
CROSSHEAD_EMU_HOOK(store, 4, true)
CROSSHEAD_EMU_HOOK(store, 8, true)
CROSSHEAD_EMU_HOOK(store, 16, true)

extern "C" __attribute__((visibility("hidden"))) void __asan_loadN_noabort(uintptr_t a, size_t n) {
  if (crosshead_emu::t_checking) crosshead_emu::check(a, n, false);
}
extern "C" __attribute__((visibility("hidden"))) void __asan_storeN_noabort(uintptr_t a, size_t n) {
  if (crosshead_emu::t_checking) crosshead_emu::check(a, n, true);
}
extern "C" __attribute__((visibility("hidden"))) void __asan_loadN(uintptr_t a, size_t n) {
  if (crosshead_emu::t_checking) crosshead_emu::check(a, n, false);
}
extern "C" __attribute__((visibility("hidden"))) void __asan_storeN(uintptr_t a, size_t n) {
  if (crosshead_emu::t_checking) crosshead_emu::check(a, n, true);
}
extern "C" __attribute__((visibility("hidden"))) void __asan_handle_no_return() {}
extern "C" __attribute__((visibility("hidden"))) void __asan_before_dynamic_init(const char*) {}
extern "C" __attribute__((visibility("hidden"))) void __asan_after_dynamic_init() {}
