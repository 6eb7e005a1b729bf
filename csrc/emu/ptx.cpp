// Host implementations of the warp-wide PTX operations the kernels use through csrc/cuda/ptx.cuh,
// following the fragment layouts of the PTX ISA (g = lane / 4, t = lane % 4):
//   mma.m16n8k8 .tf32      A 16×8:  a[r]  = A[g + 8·(r%2)][t + 4·(r/2)]
//                          B 8×8:   b[r]  = B[t + 4·r][g]
//   mma.m16n8k16 .bf16/.f16 (two 16-bit elements per register, element i = 2·r + half)
//                          A 16×16: a_i = A[g + 8·((i/2)%2)][2t + (i%2) + 8·(i/4)]
//                          B 16×8:  b_i = B[2t + (i%2) + 8·(i/2)][g]
//   C, D (float32) 16×8:   c[r]  = C[g + 8·(r/2)][2t + r%2]
//   ldmatrix m8n8 .b16:    lanes 8i..8i+7 address the rows of matrix i; lane l receives
//                          M_i[l/4][2(l%4)], M_i[l/4][2(l%4)+1] (.trans: M_i[2(l%4)][l/4], M_i[2(l%4)+1][l/4])
// Products are exact; each D element is accumulated in double and rounded once to float32.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstring>
#include <string>

#include "emu/internal.h"

namespace crosshead_emu {

void aligned_warp_op(int op_kind, const char* file, int line, void (*complete)(Thread** lanes, unsigned mask));

namespace {

float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// 16-bit element `half` (0 = low) of a packed register as float.
float unpack16(uint32_t reg, int half, MmaKind kind) {
  const uint16_t h = static_cast<uint16_t>(reg >> (16 * half));
  if (kind == MmaKind::m16n8k16_bf16) return static_cast<float>(c10::BFloat16(h, c10::BFloat16::from_bits()));
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
}

void complete_mma(Thread** lanes, unsigned) {
  const auto kind = static_cast<MmaKind>(lanes[0]->in[10]);
  const int K = kind == MmaKind::m16n8k8_tf32 ? 8 : 16;
  float A[16][16], B[16][8], C[16][8];
  for (int lane = 0; lane < kWarp; ++lane) {
    const Thread& t = *lanes[lane];
    if (static_cast<MmaKind>(t.in[10]) != kind) fail("mma.sync: lanes disagree on the instruction's shape or type");
    const int g = lane / 4, q = lane % 4;
    if (kind == MmaKind::m16n8k8_tf32) {
      for (int r = 0; r < 4; ++r)  // the low 13 mantissa bits of a TF32 operand are ignored
        A[g + 8 * (r % 2)][q + 4 * (r / 2)] = bits_to_float(static_cast<uint32_t>(t.in[r]) & 0xffffe000u);
      for (int r = 0; r < 2; ++r) B[q + 4 * r][g] = bits_to_float(static_cast<uint32_t>(t.in[4 + r]) & 0xffffe000u);
    } else {
      for (int i = 0; i < 8; ++i)
        A[g + 8 * ((i / 2) % 2)][2 * q + (i % 2) + 8 * (i / 4)] = unpack16(static_cast<uint32_t>(t.in[i / 2]), i % 2, kind);
      for (int i = 0; i < 4; ++i)
        B[2 * q + (i % 2) + 8 * (i / 2)][g] = unpack16(static_cast<uint32_t>(t.in[4 + i / 2]), i % 2, kind);
    }
    for (int r = 0; r < 4; ++r) C[g + 8 * (r / 2)][2 * q + r % 2] = bits_to_float(static_cast<uint32_t>(t.in[6 + r]));
  }
  for (int lane = 0; lane < kWarp; ++lane) {
    const int g = lane / 4, q = lane % 4;
    for (int r = 0; r < 4; ++r) {
      const int m = g + 8 * (r / 2), n = 2 * q + r % 2;
      double acc = C[m][n];
      for (int k = 0; k < K; ++k) acc += static_cast<double>(A[m][k]) * B[k][n];
      lanes[lane]->out[r] = float_to_bits(static_cast<float>(acc));
    }
  }
}

void complete_ldmatrix(Thread** lanes, unsigned) {
  const int count = static_cast<int>(lanes[0]->in[1]);
  const bool trans = lanes[0]->in[2] != 0;
  uint16_t M[4][8][8];
  Thread* const running = g_thread;
  for (int i = 0; i < count; ++i) {
    for (int r = 0; r < 8; ++r) {
      Thread& src = *lanes[8 * i + r];
      if (static_cast<int>(src.in[1]) != count || (src.in[2] != 0) != trans)
        fail("ldmatrix: lanes disagree on the instruction's shape");
      const char* row = reinterpret_cast<const char*>(src.in[0]);
      if (!is_shared(row, 16))
        fail("ldmatrix: lane " + std::to_string(8 * i + r) + " gives a row address outside shared memory");
      if (reinterpret_cast<uintptr_t>(row) % 16)
        fail("ldmatrix: lane " + std::to_string(8 * i + r) + " gives a row address that is not 16-byte aligned");
      g_thread = &src;  // the read is checked as the lane that supplied the address
      g_current = src.state;
      check_access(row, 16, false);
      std::memcpy(M[i][r], row, 16);
    }
  }
  g_thread = running;
  g_current = running->state;
  for (int lane = 0; lane < kWarp; ++lane) {
    const int a = lane / 4, b = 2 * (lane % 4);
    for (int i = 0; i < count; ++i) {
      const uint16_t lo = trans ? M[i][b][a] : M[i][a][b];
      const uint16_t hi = trans ? M[i][b + 1][a] : M[i][a][b + 1];
      lanes[lane]->out[i] = uint32_t(lo) | (uint32_t(hi) << 16);
    }
  }
}

}  // namespace

uint32_t cvt_rna_tf32(float x) {
  uint32_t u = float_to_bits(x);
  if ((u & 0x7f800000u) == 0x7f800000u) return u;  // inf and NaN pass through
  u += 0x1000u;                                     // half an ulp of the 10-bit mantissa: ties away from zero
  return u & 0xffffe000u;
}

void mma(MmaKind kind, float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4], const char* file,
         int line) {
  Unchecked unchecked;
  Thread& t = *g_thread;
  for (int i = 0; i < 4; ++i) t.in[i] = a[i];
  for (int i = 0; i < 2; ++i) t.in[4 + i] = b[i];
  for (int i = 0; i < 4; ++i) t.in[6 + i] = float_to_bits(c[i]);
  t.in[10] = static_cast<uint64_t>(kind);
  aligned_warp_op(0, file, line, &complete_mma);
  for (int i = 0; i < 4; ++i) d[i] = bits_to_float(static_cast<uint32_t>(t.out[i]));
}

void ldmatrix(uint32_t* out, int count, bool trans, const void* row_address, const char* file, int line) {
  Unchecked unchecked;
  if (count != 1 && count != 2 && count != 4) fail("ldmatrix: .x" + std::to_string(count) + " does not exist");
  Thread& t = *g_thread;
  t.in[0] = reinterpret_cast<uint64_t>(row_address);
  t.in[1] = static_cast<uint64_t>(count);
  t.in[2] = trans;
  aligned_warp_op(1, file, line, &complete_ldmatrix);
  for (int i = 0; i < count; ++i) out[i] = static_cast<uint32_t>(t.out[i]);
}

void cp_async(void* dst, const void* src, int bytes, int src_bytes, const char* file, int line) {
  Unchecked unchecked;
  const std::string at = std::string(" at ") + file + ":" + std::to_string(line);
  if (bytes != 4 && bytes != 8 && bytes != 16) fail("cp.async of " + std::to_string(bytes) + " bytes" + at);
  if (src_bytes < 0 || src_bytes > bytes) fail("cp.async: src-size " + std::to_string(src_bytes) + " > cp-size" + at);
  if (!is_shared(dst, bytes)) fail("cp.async: the destination is not shared memory" + at);
  if (reinterpret_cast<uintptr_t>(dst) % bytes || reinterpret_cast<uintptr_t>(src) % bytes)
    fail("cp.async: addresses must be aligned to the copy size (" + std::to_string(bytes) + ")" + at);
  if (src_bytes > 0) check_access(src, src_bytes, false);
  check_access(dst, bytes, true);  // bounds and hazards against earlier accesses
  mark_pending(dst, bytes, true);
  g_thread->uncommitted.push_back(PendingCopy{static_cast<char*>(dst), static_cast<const char*>(src), bytes, src_bytes});
}

void cp_async_commit(const char*, int) {
  Unchecked unchecked;
  Thread& t = *g_thread;
  t.groups.push_back(std::move(t.uncommitted));
  t.uncommitted.clear();
}

void cp_async_wait(int pending, const char*, int) {
  Unchecked unchecked;
  Thread& t = *g_thread;
  while (static_cast<int>(t.groups.size()) > pending) {
    for (const PendingCopy& c : t.groups.front()) {
      mark_pending(c.dst, c.bytes, false);
      check_access(c.dst, c.bytes, true);  // the data lands now, written by this thread
      if (c.src_bytes > 0) std::memcpy(c.dst, c.src, c.src_bytes);
      std::memset(c.dst + c.src_bytes, 0, c.bytes - c.src_bytes);
    }
    t.groups.erase(t.groups.begin());
  }
}

}  // namespace crosshead_emu
