// Host entry points of the two sides of iMHSA and the split reductions (imhsa.md "The core op").
// Landmark tensors and mixing weights arrive as float32 contiguous; token tensors (q, k, v,
// grad_out) in their own dtype with unit stride over d; outputs are preallocated contiguous.
// A null (undefined) w means the identity (no interaction). `tensor_cores` (tensor_cores_enabled(),
// read once per op call) lets float16/bfloat16 inputs with d in {32, 64, 128} take the tensor-core
// tile products; otherwise, and always for float32, the float32 CUDA-core ones run.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace crosshead {

// Z = Â_K·v (float32) and lse_k (B, h, L).
void key_side_forward(const at::Tensor& k, const at::Tensor& v, const at::Tensor& q_land_f,
                      const at::Tensor& w_k_f, bool pre, double scale, at::Tensor& z, at::Tensor& lse_k,
                      bool tensor_cores);

// out = Â_Q·Z and lse_q (B, h, N).
void query_side_forward(const at::Tensor& q, const at::Tensor& k_land_f, const at::Tensor& z,
                        const at::Tensor& w_q_f, bool pre, double scale, at::Tensor& out, at::Tensor& lse_q,
                        bool tensor_cores);

// Second generation (README.md, "Second generation"): whether the tensor-core m16n8k16 kernels
// serve q (float16/bfloat16, d in {32, 64, 128}, h <= 16, L <= 64, sm_80+, tensor cores allowed).
bool mma_path_serves(const at::Tensor& q, int64_t L, bool tensor_cores);

// out = Â_Q·Z and lse_q in one kernel (query_forward_mma.cu) from q, k_land and w_q as given;
// returns false, doing nothing, where mma_path_serves does not hold.
bool query_forward_mma(const at::Tensor& q, const at::Tensor& k_land, const at::Tensor& z,
                       const std::optional<at::Tensor>& w_q, bool pre, double scale, at::Tensor& out,
                       at::Tensor& lse_q, bool tensor_cores);

// From grad_out: dq, dZ (float32), dk_land and dw_q ((h, h) in w_q's dtype; only when w_q is defined).
void query_side_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k_land_f,
                         const at::Tensor& z, const at::Tensor& w_q_f, const at::Tensor& lse_q, bool pre,
                         double scale, at::Tensor& dq, at::Tensor& dz, at::Tensor& dk_land, at::Tensor& dw_q,
                         bool tensor_cores);

// From dZ: dk, dv, dq_land and dw_k ((h, h) in w_k's dtype; only when w_k is defined).
void key_side_backward(const at::Tensor& k, const at::Tensor& v, const at::Tensor& q_land_f,
                       const at::Tensor& w_k_f, const at::Tensor& z, const at::Tensor& dz,
                       const at::Tensor& lse_k, bool pre, double scale, at::Tensor& dk, at::Tensor& dv,
                       at::Tensor& dq_land, at::Tensor& dw_k, bool tensor_cores);

// out[o, i] = alpha · Σ_s part[o, s, i], s in order; part float32 (O, S, I), out (O, I) contiguous in
// float32, float16 or bfloat16.
void reduce_splits(const at::Tensor& part, double alpha, at::Tensor& out);

// lse[o, i] = logsumexp over s of the partial (max, sum-of-exp) pairs, s in order.
void reduce_logsumexp(const at::Tensor& part_m, const at::Tensor& part_s, at::Tensor& lse);

}  // namespace crosshead
