// CUDA implementations of crosshead::imhsa and crosshead::imhsa_backward (schemas in
// ../crosshead.cpp, math in imhsa.md and crosshead/reference.py): argument checks, then the key
// side (Z = Â_K·v) and the query side (out = Â_Q·Z), right to left; the backward runs them in
// reverse. No N×L map reaches global memory; saved between passes are only z (B, h, L, d) and the
// per-row logsumexps lse_k (B, h, L) and lse_q (B, h, N).
#include "cuda/common.cuh"
#include "cuda/sides.h"
#include "op_checks.h"

#include <torch/library.h>

#include <optional>
#include <string_view>

namespace crosshead {
namespace {

constexpr const char* kFallback = "; the pure-torch path (crosshead.reference, e.g. on CPU) serves other sizes";

struct Dims {
  int64_t B, H, N, d, L;
};

// The ops' argument checks (op_checks.h, identical on every device), then what these kernels can do.
Dims check_capabilities(const char* op, const at::Tensor& q, const at::Tensor& q_land) {
  const auto dt = q.scalar_type();
  TORCH_CHECK(q.is_cuda(), "crosshead::", op, ": q must be a CUDA tensor, got device ", q.device());
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, "crosshead::", op, ": q has dtype ",
              checks::dtype_name(dt), "; the CUDA kernels support float32, float16 and bfloat16 (float64 runs on "
              "the pure-torch path crosshead.reference, e.g. on CPU)");
  Dims s{q.size(0), q.size(1), q.size(2), q.size(3), q_land.size(2)};
  TORCH_CHECK(s.H <= kMaxHeads, "crosshead::", op, ": the CUDA kernels support 1 <= h <= ", kMaxHeads,
              " heads, got h=", s.H, kFallback);
  TORCH_CHECK(s.d <= kMaxHeadDim, "crosshead::", op, ": the CUDA kernels support head dim 1 <= d <= ", kMaxHeadDim,
              ", got d=", s.d, kFallback);
  TORCH_CHECK(s.L <= kMaxLandmarks, "crosshead::", op, ": the CUDA kernels support 1 <= L <= ", kMaxLandmarks,
              " landmarks (q_land.size(2)), got L=", s.L, kFallback);
  TORCH_CHECK(s.B <= 65535 && s.N < (int64_t(1) << 31), "crosshead::", op, ": batch ", s.B, " or tokens ", s.N,
              " too large for the CUDA kernels (B <= 65535, N < 2^31)");
  return s;
}

// float32, contiguous and 16-byte aligned (the kernels read landmark operands as float4).
at::Tensor as_float(const at::Tensor& t) {
  at::Tensor f = t.to(at::kFloat).contiguous();
  return reinterpret_cast<uintptr_t>(f.data_ptr()) % 16 == 0 ? f : f.clone();
}

at::Tensor weight_f(const std::optional<at::Tensor>& w) {
  return w.has_value() ? as_float(w.value()) : at::Tensor();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> imhsa_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& q_land,
    const at::Tensor& k_land, const std::optional<at::Tensor>& w_q, const std::optional<at::Tensor>& w_k,
    c10::string_view mix, double scale) {
  checks::imhsa("imhsa", q, k, v, q_land, k_land, w_q, w_k, mix, scale);
  const Dims s = check_capabilities("imhsa", q, q_land);
  c10::cuda::CUDAGuard guard(q.device());
  const bool pre = mix == "pre";
  auto fopt = q.options().dtype(at::kFloat);
  at::Tensor out = at::empty({s.B, s.H, s.N, s.d}, q.options());
  at::Tensor z = at::empty({s.B, s.H, s.L, s.d}, fopt);
  at::Tensor lse_k = at::empty({s.B, s.H, s.L}, fopt);
  at::Tensor lse_q = at::empty({s.B, s.H, s.N}, fopt);
  if (s.B == 0) return {out, z, lse_k, lse_q};
  const bool use_tc = tensor_cores_enabled();  // CROSSHEAD_CUDA_TENSOR_CORES, read once per call
  key_side_forward(unit_stride_last(k), unit_stride_last(v), as_float(q_land), weight_f(w_k), pre, scale, z,
                   lse_k, use_tc);
  if (!query_forward_mma(q, k_land, z, w_q, pre, scale, out, lse_q, use_tc)) {
    query_side_forward(unit_stride_last(q), as_float(k_land), z, weight_f(w_q), pre, scale, out, lse_q, use_tc);
  }
  return {out, z, lse_k, lse_q};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> imhsa_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& q_land, const at::Tensor& k_land, const std::optional<at::Tensor>& w_q,
    const std::optional<at::Tensor>& w_k, const at::Tensor& z, const at::Tensor& lse_k, const at::Tensor& lse_q,
    c10::string_view mix, double scale) {
  const char* op = "imhsa_backward";
  checks::imhsa_backward(grad_out, q, k, v, q_land, k_land, w_q, w_k, z, lse_k, lse_q, mix, scale);
  const Dims s = check_capabilities(op, q, q_land);
  c10::cuda::CUDAGuard guard(q.device());
  const bool pre = mix == "pre";
  auto opt = q.options();
  at::Tensor dq = at::empty({s.B, s.H, s.N, s.d}, opt);
  at::Tensor dk = at::empty({s.B, s.H, s.N, s.d}, opt);
  at::Tensor dv = at::empty({s.B, s.H, s.N, s.d}, opt);
  at::Tensor dq_land = at::empty({s.B, s.H, s.L, s.d}, opt);
  at::Tensor dk_land = at::empty({s.B, s.H, s.L, s.d}, opt);
  auto w_grad = [&](const std::optional<at::Tensor>& w) {
    return w.has_value() ? at::empty({s.H, s.H}, w->options()) : at::empty({0}, grad_out.options());
  };
  at::Tensor dw_q = w_grad(w_q), dw_k = w_grad(w_k);
  if (s.B == 0) {
    dw_q.zero_();
    dw_k.zero_();
    return {dq, dk, dv, dq_land, dk_land, dw_q, dw_k};
  }
  const at::Tensor zc = as_float(z);
  at::Tensor dz = at::empty({s.B, s.H, s.L, s.d}, opt.dtype(at::kFloat));
  const bool use_tc = tensor_cores_enabled();  // CROSSHEAD_CUDA_TENSOR_CORES, read once per call
  query_side_backward(unit_stride_last(grad_out), unit_stride_last(q), as_float(k_land), zc, weight_f(w_q),
                      lse_q.contiguous(), pre, scale, dq, dz, dk_land, dw_q, use_tc);
  key_side_backward(unit_stride_last(k), unit_stride_last(v), as_float(q_land), weight_f(w_k), zc, dz,
                    lse_k.contiguous(), pre, scale, dk, dv, dq_land, dw_k, use_tc);
  return {dq, dk, dv, dq_land, dk_land, dw_q, dw_k};
}

}  // namespace

TORCH_LIBRARY_IMPL(crosshead, CUDA, m) {
  m.impl("imhsa", &imhsa_cuda);
  m.impl("imhsa_backward", &imhsa_backward_cuda);
}

}  // namespace crosshead
