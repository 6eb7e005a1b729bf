// The one place the crosshead operator schemas are declared (see ../shared/design/imhsa.md).
// Kernels attach per device with TORCH_LIBRARY_IMPL(crosshead, <Key>, m): the CUDA ones in cuda/,
// the CPU ones (the pure-torch reference) from Python, crosshead/_library.py. The Python mirror of
// these strings (used when this library is not built) is checked against this file by
// tests/test_packaging.py.
#include <torch/library.h>

TORCH_LIBRARY(crosshead, m) {
  m.def("landmarks(Tensor x, SymInt[] grid, int[] size, SymInt prefix) -> Tensor");
  m.def("landmarks_backward(Tensor grad, SymInt num_tokens, SymInt[] grid, int[] size, SymInt prefix) -> Tensor");
  m.def("imhsa(Tensor q, Tensor k, Tensor v, Tensor q_land, Tensor k_land, Tensor? w_q, Tensor? w_k, str mix, float scale) -> (Tensor out, Tensor z, Tensor lse_k, Tensor lse_q)");
  m.def("imhsa_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor q_land, Tensor k_land, Tensor? w_q, Tensor? w_k, Tensor z, Tensor lse_k, Tensor lse_q, str mix, float scale) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_q_land, Tensor grad_k_land, Tensor grad_w_q, Tensor grad_w_k)");
}
