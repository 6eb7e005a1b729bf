// Cooperative fibers for the emulated CUDA threads: a hand-written context switch on x86-64
// (callee-saved registers, MXCSR and the x87 control word), ucontext elsewhere. Stacks are mmap'd
// with a guard page below.
#include <sys/mman.h>

#include <cstdlib>
#include <stdexcept>

#include "emu/internal.h"

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace crosshead_emu {

void fiber_alloc_stack(Fiber& f, size_t bytes) {
  const size_t page = 4096;
  void* p = mmap(nullptr, bytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) throw std::runtime_error("crosshead emulator: cannot map a fiber stack");
  mprotect(p, page, PROT_NONE);  // overflow faults instead of corrupting a neighbour
  f.stack_lo = static_cast<char*>(p) + page;
  f.stack_hi = f.stack_lo + bytes;
}

#if defined(__x86_64__)

extern "C" void crosshead_emu_switch(void** save_sp, void* new_sp);
extern "C" void crosshead_emu_fiber_trampoline();

asm(R"(
  .text
  .p2align 4
  .type crosshead_emu_switch, @function
crosshead_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size crosshead_emu_switch, .-crosshead_emu_switch

  .p2align 4
  .type crosshead_emu_fiber_trampoline, @function
crosshead_emu_fiber_trampoline:
  movq %r13, %rdi
  callq *%r12
  ud2
  .size crosshead_emu_fiber_trampoline, .-crosshead_emu_fiber_trampoline
)");

void fiber_start(Fiber& f, void (*entry)(void*), void* arg) {
  // After the first switch pops the frame below, `ret` enters the trampoline with rsp 16-aligned,
  // r12 = entry and r13 = arg.
  uintptr_t top = (reinterpret_cast<uintptr_t>(f.stack_hi) - 64) & ~uintptr_t(15);
  uint64_t* sp = reinterpret_cast<uint64_t*>(top - 64);
  uint32_t mx;
  uint16_t cw;
  asm volatile("stmxcsr %0" : "=m"(mx));
  asm volatile("fnstcw %0" : "=m"(cw));
  sp[0] = uint64_t(mx) | (uint64_t(cw) << 32);
  sp[1] = 0;                                          // r15
  sp[2] = 0;                                          // r14
  sp[3] = reinterpret_cast<uint64_t>(arg);            // r13
  sp[4] = reinterpret_cast<uint64_t>(entry);          // r12
  sp[5] = 0;                                          // rbx
  sp[6] = 0;                                          // rbp
  sp[7] = reinterpret_cast<uint64_t>(&crosshead_emu_fiber_trampoline);
  f.sp = sp;
}

void fiber_switch(Fiber& from, Fiber& to) { crosshead_emu_switch(&from.sp, to.sp); }

#else  // portable fallback

struct UContextFiber {
  ucontext_t ctx;
};

void fiber_start(Fiber& f, void (*entry)(void*), void* arg) {
  auto* uc = static_cast<UContextFiber*>(f.sp);
  if (!uc) f.sp = uc = new UContextFiber;
  getcontext(&uc->ctx);
  uc->ctx.uc_stack.ss_sp = f.stack_lo;
  uc->ctx.uc_stack.ss_size = f.stack_hi - f.stack_lo;
  uc->ctx.uc_link = nullptr;
  makecontext(&uc->ctx, reinterpret_cast<void (*)()>(entry), 1, arg);  // pointer fits one int arg on LP64 glibc
}

void fiber_switch(Fiber& from, Fiber& to) {
  if (!from.sp) from.sp = new UContextFiber;
  swapcontext(&static_cast<UContextFiber*>(from.sp)->ctx, &static_cast<UContextFiber*>(to.sp)->ctx);
}

#endif

}  // namespace crosshead_emu
