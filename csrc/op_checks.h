// Argument checks of the crosshead ops, shared by every compiled kernel: the C++ twin of
// crosshead/_op_checks.py (which the pure-torch and fake kernels run). Same conditions, same
// messages word for word, same exception (ValueError); tests/test_op_checks.py holds the two to
// each other. Capability limits of a particular kernel (largest h, d, L, supported dtypes) are not
// here: they stay with that kernel.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace crosshead::checks {

// torch's Python name of a dtype ("float32", not C++'s "Float"), as the Python checks print it.
inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kLong: return "int64";
    case at::kInt: return "int32";
    case at::kShort: return "int16";
    case at::kChar: return "int8";
    case at::kByte: return "uint8";
    case at::kBool: return "bool";
    case at::kComplexFloat: return "complex64";
    case at::kComplexDouble: return "complex128";
    default: return c10::toString(t);
  }
}

inline bool floating(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

inline void rank4(const char* op, const char* name, const at::Tensor& t, const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == 4, "crosshead::", op, ": ", name, " must have 4 dimensions ", layout, ", got shape ",
                    t.sizes());
}

inline void floating_dtype(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(floating(t.scalar_type()), "crosshead::", op, ": ", name, " has dtype ",
                    dtype_name(t.scalar_type()), "; supported: float16, bfloat16, float32, float64");
}

inline void like_q(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK_VALUE(t.device() == q.device(), "crosshead::", op, ": ", name, " is on ", t.device(), " but q is on ",
                    q.device());
  TORCH_CHECK_VALUE(t.scalar_type() == q.scalar_type(), "crosshead::", op, ": ", name, " has dtype ",
                    dtype_name(t.scalar_type()), " but q has ", dtype_name(q.scalar_type()));
}

inline void imhsa(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& q_land, const at::Tensor& k_land, const std::optional<at::Tensor>& w_q,
                  const std::optional<at::Tensor>& w_k, std::string_view mix, double scale) {
  rank4(op, "q", q, "(B, h, N, d)");
  rank4(op, "k", k, "(B, h, N, d)");
  rank4(op, "v", v, "(B, h, N, d)");
  rank4(op, "q_land", q_land, "(B, h, L, d)");
  rank4(op, "k_land", k_land, "(B, h, L, d)");
  floating_dtype(op, "q", q);
  like_q(op, "k", k, q);
  like_q(op, "v", v, q);
  like_q(op, "q_land", q_land, q);
  like_q(op, "k_land", k_land, q);
  TORCH_CHECK_VALUE(k.sizes() == q.sizes(), "crosshead::", op, ": k must have q's shape ", q.sizes(), ", got ",
                    k.sizes());
  TORCH_CHECK_VALUE(v.sizes() == q.sizes(), "crosshead::", op, ": v must have q's shape ", q.sizes(), ", got ",
                    v.sizes());
  const int64_t B = q.size(0), h = q.size(1), N = q.size(2), d = q.size(3);
  TORCH_CHECK_VALUE(q_land.size(0) == B && q_land.size(1) == h && q_land.size(3) == d, "crosshead::", op,
                    ": q_land must be (B, h, L, d) with q's B, h, d, got ", q_land.sizes(), " for q ", q.sizes());
  TORCH_CHECK_VALUE(k_land.sizes() == q_land.sizes(), "crosshead::", op, ": k_land must have q_land's shape ",
                    q_land.sizes(), ", got ", k_land.sizes());
  const int64_t L = q_land.size(2);
  TORCH_CHECK_VALUE(h >= 1 && N >= 1 && d >= 1 && L >= 1, "crosshead::", op,
                    ": need at least one head, token, channel and landmark, got (h, N, d, L) = (", h, ", ", N, ", ",
                    d, ", ", L, ")");
  for (auto [name, w] : {std::pair{"w_q", &w_q}, std::pair{"w_k", &w_k}}) {
    if (!w->has_value()) continue;
    const at::Tensor& t = w->value();
    TORCH_CHECK_VALUE(t.device() == q.device(), "crosshead::", op, ": ", name, " is on ", t.device(),
                      " but q is on ", q.device());
    TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == h && t.size(1) == h, "crosshead::", op, ": ", name,
                      " must be (h, h) = (", h, ", ", h, "), got shape ", t.sizes());
    TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat || t.scalar_type() == q.scalar_type(), "crosshead::", op, ": ",
                      name, " has dtype ", dtype_name(t.scalar_type()), "; it must be float32 or q's dtype ",
                      dtype_name(q.scalar_type()));
  }
  TORCH_CHECK_VALUE(mix == "post" || mix == "pre", "crosshead::", op, ": mix must be 'post' or 'pre', got '", mix,
                    "'");
  TORCH_CHECK_VALUE(std::isfinite(scale), "crosshead::", op, ": scale must be finite, got ", scale);
}

inline void imhsa_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                           const at::Tensor& v, const at::Tensor& q_land, const at::Tensor& k_land,
                           const std::optional<at::Tensor>& w_q, const std::optional<at::Tensor>& w_k,
                           const at::Tensor& z, const at::Tensor& lse_k, const at::Tensor& lse_q,
                           std::string_view mix, double scale) {
  const char* op = "imhsa_backward";
  imhsa(op, q, k, v, q_land, k_land, w_q, w_k, mix, scale);
  rank4(op, "grad_out", grad_out, "(B, h, N, d)");
  like_q(op, "grad_out", grad_out, q);
  TORCH_CHECK_VALUE(grad_out.sizes() == q.sizes(), "crosshead::", op, ": grad_out must have q's shape ", q.sizes(),
                    ", got ", grad_out.sizes());
  const int64_t B = q.size(0), h = q.size(1), N = q.size(2), d = q.size(3), L = q_land.size(2);
  const at::ScalarType saved = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (auto [name, t, shape] : {std::tuple{"z", &z, std::vector<int64_t>{B, h, L, d}},
                                std::tuple{"lse_k", &lse_k, std::vector<int64_t>{B, h, L}},
                                std::tuple{"lse_q", &lse_q, std::vector<int64_t>{B, h, N}}}) {
    TORCH_CHECK_VALUE(t->device() == q.device() && t->scalar_type() == saved && t->sizes() == at::IntArrayRef(shape),
                      "crosshead::", op, ": ", name, " must be the ", dtype_name(saved), " ", at::IntArrayRef(shape),
                      " tensor the forward returned on q's device, got ", dtype_name(t->scalar_type()), " ",
                      t->sizes(), " on ", t->device());
  }
}

// The pooling geometry of landmarks and landmarks_backward: grid [] (1-D tokens, size [L]) or
// [H, W] (size [Lh, Lw]). Returns dims (the pooled axes: [N - prefix] or [H, W]).
inline std::vector<int64_t> geometry(const char* op, int64_t num_tokens, const std::vector<int64_t>& grid,
                                     at::IntArrayRef size, int64_t prefix) {
  TORCH_CHECK_VALUE(prefix >= 0 && prefix < num_tokens, "crosshead::", op, ": prefix must be in [0, N), got prefix=",
                    prefix, " with N=", num_tokens);
  const int64_t n = num_tokens - prefix;
  std::vector<int64_t> dims;
  if (grid.empty()) {
    TORCH_CHECK_VALUE(size.size() == 1, "crosshead::", op, ": with grid=[] (1-D tokens) size must be [L], got ", size);
    dims = {n};
  } else {
    TORCH_CHECK_VALUE(grid.size() == 2 && size.size() == 2, "crosshead::", op,
                      ": grid must be [H, W] and size [Lh, Lw], got grid ", at::IntArrayRef(grid), " and size ", size);
    TORCH_CHECK_VALUE(grid[0] >= 1 && grid[1] >= 1 && grid[0] * grid[1] == n, "crosshead::", op, ": grid ",
                      at::IntArrayRef(grid), " must be positive and hold the N - prefix = ", n, " grid tokens");
    dims = grid;
  }
  for (size_t i = 0; i < size.size(); ++i) {
    TORCH_CHECK_VALUE(size[i] >= 1 && size[i] <= dims[i], "crosshead::", op, ": size ", size,
                      " must be positive and no larger than the grid ", at::IntArrayRef(dims));
  }
  return dims;
}

inline void landmarks(const at::Tensor& x, const std::vector<int64_t>& grid, at::IntArrayRef size, int64_t prefix) {
  rank4("landmarks", "x", x, "(B, h, N, d)");
  floating_dtype("landmarks", "x", x);
  geometry("landmarks", x.size(2), grid, size, prefix);
}

inline void landmarks_backward(const at::Tensor& grad, int64_t num_tokens, const std::vector<int64_t>& grid,
                               at::IntArrayRef size, int64_t prefix) {
  const char* op = "landmarks_backward";
  rank4(op, "grad", grad, "(B, h, L, d)");
  floating_dtype(op, "grad", grad);
  geometry(op, num_tokens, grid, size, prefix);
  int64_t L = 1;
  for (int64_t s : size) L *= s;
  TORCH_CHECK_VALUE(grad.size(2) == L, "crosshead::", op, ": grad has ", grad.size(2), " landmarks but size ", size,
                    " makes ", L);
}

}  // namespace crosshead::checks
