// Kernels that test the SIMT emulator itself (tests/test_emulator.py), registered as
// torch.ops.crosshead_emu_selftest.*. Built into the emulator library only. Written as plain CUDA:
// the PTX ops take raw per-lane registers from the caller, so the test states the fragment layouts
// independently (from CUTLASS's CuTe layouts) instead of repeating the emulator's formulas. The
// `hazard` kernel holds deliberate bugs, one per mode, that the emulator must report.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <torch/library.h>

#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/launch.cuh"
#include "cuda/ptx.cuh"

namespace crosshead_selftest {
namespace {

using crosshead::launch_kernel;

// ------------------------------------------------------------------------ warp-wide PTX ops

__global__ void mma_kernel(const uint32_t* a, const uint32_t* b, const float* c, float* d, int kind) {
  const int lane = threadIdx.x;
  const uint32_t ra[4] = {a[4 * lane], a[4 * lane + 1], a[4 * lane + 2], a[4 * lane + 3]};
  const uint32_t rb[2] = {b[2 * lane], b[2 * lane + 1]};
  const float rc[4] = {c[4 * lane], c[4 * lane + 1], c[4 * lane + 2], c[4 * lane + 3]};
  float rd[4];
  if (kind == 0) crosshead::ptx::mma_m16n8k8_tf32(rd, ra, rb, rc);
  if (kind == 1) crosshead::ptx::mma_m16n8k16_bf16(rd, ra, rb, rc);
  if (kind == 2) crosshead::ptx::mma_m16n8k16_f16(rd, ra, rb, rc);
  for (int r = 0; r < 4; ++r) d[4 * lane + r] = rd[r];
}

// D fragments (32, 4) from per-lane A (32, 4), B (32, 2) register bits and C (32, 4).
at::Tensor mma(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, int64_t kind) {
  TORCH_CHECK(a.sizes() == at::IntArrayRef({32, 4}) && b.sizes() == at::IntArrayRef({32, 2}) &&
              c.sizes() == at::IntArrayRef({32, 4}) && kind >= 0 && kind <= 2, "mma: bad arguments");
  at::Tensor ac = a.to(at::kInt).contiguous(), bc = b.to(at::kInt).contiguous(), cc = c.to(at::kFloat).contiguous();
  at::Tensor d = at::empty({32, 4}, c.options().dtype(at::kFloat));
  launch_kernel<mma_kernel>(dim3(1), dim3(32), 0, at::cuda::getCurrentCUDAStream(),
                            reinterpret_cast<const uint32_t*>(ac.data_ptr<int>()),
                            reinterpret_cast<const uint32_t*>(bc.data_ptr<int>()), cc.data_ptr<float>(),
                            d.data_ptr<float>(), static_cast<int>(kind));
  return d;
}

template <int N, bool Trans>
__global__ void ldmatrix_kernel(const uint16_t* m, int32_t* out) {
  extern __shared__ __align__(16) uint16_t tile[];
  const int lane = threadIdx.x;
  for (int e = lane; e < N * 64; e += 32) tile[e] = m[e];
  __syncthreads();
  uint32_t r[N];
  // lanes 8i..8i+7 address the rows of matrix i; the others repeat a valid row (ignored)
  const int row = lane < 8 * N ? lane : lane % 8;
  crosshead::ptx::ldmatrix<N, Trans>(r, tile + row * 8);
  for (int i = 0; i < N; ++i) out[lane * N + i] = static_cast<int32_t>(r[i]);
}

template <int N, bool Trans>
void run_ldmatrix(const at::Tensor& m, at::Tensor& out) {
  launch_kernel<ldmatrix_kernel<N, Trans>>(dim3(1), dim3(32), size_t(N) * 128, at::cuda::getCurrentCUDAStream(),
                                           reinterpret_cast<const uint16_t*>(m.data_ptr<int16_t>()),
                                           out.data_ptr<int32_t>());
}

// Registers (32, count) that ldmatrix gives each lane from `count` 8×8 b16 matrices (count·8, 8).
at::Tensor ldmatrix(const at::Tensor& m, int64_t count, bool trans) {
  TORCH_CHECK((count == 1 || count == 2 || count == 4) && m.numel() == count * 64, "ldmatrix: bad arguments");
  at::Tensor mc = m.to(at::kShort).contiguous();
  at::Tensor out = at::empty({32, count}, m.options().dtype(at::kInt));
  if (count == 1) trans ? run_ldmatrix<1, true>(mc, out) : run_ldmatrix<1, false>(mc, out);
  if (count == 2) trans ? run_ldmatrix<2, true>(mc, out) : run_ldmatrix<2, false>(mc, out);
  if (count == 4) trans ? run_ldmatrix<4, true>(mc, out) : run_ldmatrix<4, false>(mc, out);
  return out;
}

// 64 threads each copy one 16-byte chunk of src (64·4 floats) into shared memory twice, as two
// cp.async groups (into the first and the second half of buf). mode 0: correct, out = 2·src read
// from a neighbour's chunks; 1: as 0 but the first copy keeps only `keep` bytes of each chunk
// (zero-fill); 2: reads the destination before waiting (an error); 3: wait<1> after two commits,
// then reads the first group only (correct, out = src); 4: exits without waiting (an error).
__global__ void cp_async_kernel(const float* src, float* out, int mode, int keep) {
  extern __shared__ __align__(16) float buf[];
  const int t = threadIdx.x;
  const int second = 256;  // floats: the second copy lands after the first
  crosshead::ptx::cp_async<16>(buf + 4 * t, src + 4 * t, mode == 1 ? keep : 16);
  crosshead::ptx::cp_async_commit();
  crosshead::ptx::cp_async<16>(buf + second + 4 * t, src + 4 * t, 16);
  crosshead::ptx::cp_async_commit();
  if (mode == 2) out[t] = buf[4 * t];
  if (mode == 4) return;
  if (mode == 3) {
    crosshead::ptx::cp_async_wait<1>();
    __syncthreads();
    for (int e = 0; e < 4; ++e) out[4 * t + e] = buf[4 * t + e];
    crosshead::ptx::cp_async_wait<0>();
    return;
  }
  crosshead::ptx::cp_async_wait<0>();
  __syncthreads();
  const int o = (t + 1) % 64;  // read a neighbour's chunk: needs the barrier
  for (int e = 0; e < 4; ++e) out[4 * o + e] = buf[4 * o + e] + buf[second + 4 * o + e];
}

at::Tensor cp_async(const at::Tensor& src, int64_t mode, int64_t keep) {
  TORCH_CHECK(src.numel() == 256 && src.scalar_type() == at::kFloat, "cp_async: src must be 256 floats");
  at::Tensor s = src.contiguous();
  at::Tensor out = at::empty({256}, src.options());
  launch_kernel<cp_async_kernel>(dim3(1), dim3(64), 4 * 256 * 2, at::cuda::getCurrentCUDAStream(), s.data_ptr<float>(),
                                 out.data_ptr<float>(), static_cast<int>(mode), static_cast<int>(keep));
  return out;
}

// ----------------------------------------------------------------------- warp collectives

// 64 threads, out (64, 8): xor 5, up 3, down 7, idx (lane 9 of each 16-wide segment), ballot,
// any, all, and a warp reduction by xor shuffles.
__global__ void collectives_kernel(const float* x, float* out) {
  const int t = threadIdx.x, lane = t % 32;
  const float v = x[t];
  float* o = out + 8 * t;
  o[0] = __shfl_xor_sync(0xffffffffu, v, 5);
  o[1] = __shfl_up_sync(0xffffffffu, v, 3);
  o[2] = __shfl_down_sync(0xffffffffu, v, 7);
  o[3] = __shfl_sync(0xffffffffu, v, 9, 16);
  o[4] = static_cast<float>(__ballot_sync(0xffffffffu, v > 0.f) & 0xffffu);
  o[5] = __any_sync(0xffffffffu, v > 2.5f) ? 1.f : 0.f;
  o[6] = __all_sync(0xffffffffu, v > -10.f) ? 1.f : 0.f;
  float s = v;
  for (int k = 16; k > 0; k >>= 1) s += __shfl_xor_sync(0xffffffffu, s, k);
  o[7] = s;
  (void)lane;
}

at::Tensor collectives(const at::Tensor& x) {
  TORCH_CHECK(x.numel() == 64 && x.scalar_type() == at::kFloat, "collectives: x must be 64 floats");
  at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty({64, 8}, x.options());
  launch_kernel<collectives_kernel>(dim3(1), dim3(64), 0, at::cuda::getCurrentCUDAStream(), xc.data_ptr<float>(),
                                    out.data_ptr<float>());
  return out;
}

// ------------------------------------------------------------------------ hazards by mode

constexpr int kHazardThreads = 64;

__global__ void hazard_kernel(const float* x, float* out, int mode) {
  extern __shared__ __align__(16) float sm[];
  __shared__ float fixed[kHazardThreads];
  const int t = threadIdx.x, n = blockDim.x;
  switch (mode) {
    case 0:  // correct: neighbour exchange through shared memory, both static and dynamic
      sm[t] = x[t];
      fixed[t] = 2.f * x[t];
      __syncthreads();
      out[blockIdx.x * n + t] = sm[(t + 1) % n] + fixed[(t + n - 1) % n];
      break;
    case 1:  // missing barrier, the writer runs first: read after write
      sm[t] = x[t];
      out[t] = t > 0 ? sm[t - 1] : 0.f;
      break;
    case 2:  // missing barrier, the writer runs later: reads memory nobody has written yet
      sm[t] = x[t];
      out[t] = sm[(t + 1) % n];
      break;
    case 3:  // every thread writes the same word: write after write
      sm[0] = x[t];
      __syncthreads();
      out[t] = sm[0];
      break;
    case 4:  // read a neighbour's word, then the neighbour overwrites it: write after read
      sm[t] = x[t];
      __syncthreads();
      out[t] = sm[(t + 1) % n];
      sm[t] = 0.f;
      break;
    case 5:  // warp-level exchange without __syncwarp
      sm[t] = x[t];
      out[t] = sm[t ^ 1];
      break;
    case 6:  // the same with __syncwarp: correct
      sm[t] = x[t];
      __syncwarp();
      out[t] = sm[t ^ 1];
      break;
    case 7:  // read one float past the launch's dynamic shared memory
      sm[t] = x[t];
      __syncthreads();
      out[t] = sm[t + 1];
      break;
    case 8:  // read one element past the end of the input tensor
      out[t] = x[t + 1];
      break;
    case 9: {  // misaligned float4 load from shared memory
      sm[t] = x[t];
      __syncthreads();
      const float4 v = *reinterpret_cast<const float4*>(sm + 1);
      out[t] = v.x + v.y + v.z + v.w;
      break;
    }
    case 10:  // barrier in divergent code
      if (t < 32) __syncthreads();
      out[t] = x[t];
      break;
    case 11:  // shuffle over the full warp after half of it has exited
      if (t % 32 >= 16) return;
      out[t] = __shfl_xor_sync(0xffffffffu, x[t], 1);
      break;
    case 12:
      __trap();
      break;
    case 13:  // the first thread of every block writes the same output word: a race between blocks
      if (t == 0) out[0] = x[t];
      break;
    case 14: {  // atomics from every thread and block: no race, exact sums
      if (t == 0) sm[0] = 0.f;
      __syncthreads();
      atomicAdd(&sm[0], 1.f);
      atomicAdd(&out[0], 1.f);
      __syncthreads();
      if (t == 0) out[1 + blockIdx.x] = sm[0];
      break;
    }
    case 15:  // __syncthreads_count: correct
      out[t] = static_cast<float>(__syncthreads_count(x[t] > 0.f));
      break;
    default:
      break;
  }
}

// Runs hazard mode `mode` with `blocks` blocks of 64 threads over x (64 floats); out has
// blocks·64 floats. dynamic_smem: bytes of dynamic shared memory (over 48 KiB needs `opt_in`).
at::Tensor hazard(const at::Tensor& x, int64_t mode, int64_t blocks, int64_t dynamic_smem, bool opt_in) {
  TORCH_CHECK(x.numel() == kHazardThreads && x.scalar_type() == at::kFloat, "hazard: x must be 64 floats");
  at::Tensor xc = x.contiguous();
  at::Tensor out = mode == 14 ? at::zeros({blocks * kHazardThreads}, x.options())
                              : at::empty({blocks * kHazardThreads}, x.options());
  if (opt_in) cudaFuncSetAttribute(hazard_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(dynamic_smem));
  launch_kernel<hazard_kernel>(dim3(static_cast<unsigned>(blocks)), dim3(kHazardThreads), size_t(dynamic_smem),
                               at::cuda::getCurrentCUDAStream(), xc.data_ptr<float>(), out.data_ptr<float>(),
                               static_cast<int>(mode));
  return out;
}

// crosshead::load_weights with no w: the identity (cuda_audit.md §2.10 #3: it used to write zeros).
__global__ void load_weights_kernel(const float* w, float* out, int H) {
  extern __shared__ __align__(16) float ws[];
  crosshead::load_weights(ws, w, H);
  __syncthreads();
  for (int e = threadIdx.x; e < H * H; e += blockDim.x) out[e] = ws[e];
}

at::Tensor load_weights(const std::optional<at::Tensor>& w, int64_t H) {
  at::Tensor out = at::empty({H, H}, at::TensorOptions().dtype(at::kFloat));
  at::Tensor wc = w.has_value() ? w->to(at::kFloat).contiguous() : at::Tensor();
  launch_kernel<load_weights_kernel>(dim3(1), dim3(64), size_t(H * H) * 4, at::cuda::getCurrentCUDAStream(),
                                     wc.defined() ? wc.data_ptr<float>() : nullptr, out.data_ptr<float>(),
                                     static_cast<int>(H));
  return out;
}

std::string launch_log(bool clear) {
#ifdef CROSSHEAD_EMULATOR
  return crosshead_emu::launch_log(clear);
#else
  return "";
#endif
}

}  // namespace
}  // namespace crosshead_selftest

TORCH_LIBRARY(crosshead_emu_selftest, m) {
  m.def("launch_log(bool clear) -> str", &crosshead_selftest::launch_log);  // no tensors: a catch-all kernel
  m.def("mma(Tensor a, Tensor b, Tensor c, int kind) -> Tensor");
  m.def("ldmatrix(Tensor m, int count, bool trans) -> Tensor");
  m.def("cp_async(Tensor src, int mode, int keep) -> Tensor");
  m.def("collectives(Tensor x) -> Tensor");
  m.def("hazard(Tensor x, int mode, int blocks, int dynamic_smem, bool opt_in) -> Tensor");
  m.def("load_weights(Tensor? w, int H) -> Tensor", &crosshead_selftest::load_weights);
}

TORCH_LIBRARY_IMPL(crosshead_emu_selftest, CUDA, m) {
  m.impl("mma", &crosshead_selftest::mma);
  m.impl("ldmatrix", &crosshead_selftest::ldmatrix);
  m.impl("cp_async", &crosshead_selftest::cp_async);
  m.impl("collectives", &crosshead_selftest::collectives);
  m.impl("hazard", &crosshead_selftest::hazard);
}
