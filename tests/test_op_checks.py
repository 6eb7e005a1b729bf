"""The raw ops refuse bad arguments on every device, with one message: the pure-torch kernels and the
fake (meta) kernels run crosshead/_op_checks.py, the compiled CUDA kernels csrc/op_checks.h.

Each case runs on the CPU (the pure-torch kernel; under CROSSHEAD_CUDA_EMULATOR=1 the C++ CUDA host
code on the emulator, which tools/test.sh also runs this file under), on the meta device (the fake
kernel), under torch.compile (the fake kernel while tracing) and on a GPU when there is one, and
must raise ValueError with exactly the expected message everywhere."""

import math

import pytest
import torch

import crosshead  # noqa: F401  (registers the ops)
from crosshead import _library

ops = torch.ops.crosshead
B, h, N, d, L = 2, 3, 10, 4, 3
DEVICES = ["cpu", "meta"] + (["cuda"] if torch.cuda.is_available() else [])


def tensors(device, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, N, d, generator=g, dtype=dtype).to(device) for _ in range(3))
    ql, kl = (torch.randn(B, h, L, d, generator=g, dtype=dtype).to(device) for _ in range(2))
    return q, k, v, ql, kl


def saved(device, n=N):
    return (torch.zeros(B, h, L, d, device=device), torch.zeros(B, h, L, device=device),
            torch.zeros(B, h, n, device=device))


def other(device):
    return "meta" if device != "meta" else "cpu"


# name: (call(device) -> op result, the message)
CASES = {
    "mix in capitals": (lambda dv: ops.imhsa(*tensors(dv), None, None, "POST", 0.5),
                        "crosshead::imhsa: mix must be 'post' or 'pre', got 'POST'"),
    "integer tensors": (lambda dv: ops.imhsa(*(t.long() for t in tensors(dv)), None, None, "post", 0.5),
                        "crosshead::imhsa: q has dtype int64; supported: float16, bfloat16, float32, float64"),
    "bool tensors": (lambda dv: ops.imhsa(*(t.bool() for t in tensors(dv)), None, None, "post", 0.5),
                     "crosshead::imhsa: q has dtype bool; supported: float16, bfloat16, float32, float64"),
    "nan scale": (lambda dv: ops.imhsa(*tensors(dv), None, None, "post", math.nan),
                  "crosshead::imhsa: scale must be finite, got nan"),
    "k from another dtype": (lambda dv: ops.imhsa(*(t.half() if i == 1 else t for i, t in enumerate(tensors(dv))),
                                                  None, None, "pre", 0.5),
                             "crosshead::imhsa: k has dtype float16 but q has float32"),
    "w on another device": (lambda dv: ops.imhsa(*tensors(dv), torch.eye(h, device=other(dv)), None, "post", 0.5),
                            "crosshead::imhsa: w_q is on {other} but q is on {device}"),
    "w of the wrong shape": (lambda dv: ops.imhsa(*tensors(dv), None, torch.eye(h + 1, device=dv), "post", 0.5),
                             "crosshead::imhsa: w_k must be (h, h) = (3, 3), got shape [4, 4]"),
    "integer w": (lambda dv: ops.imhsa(*tensors(dv), torch.eye(h, dtype=torch.long, device=dv), None, "post", 0.5),
                  "crosshead::imhsa: w_q has dtype int64; it must be float32 or q's dtype float32"),
    "k shorter than q": (lambda dv: ops.imhsa(*(t[:, :, :5] if i == 1 else t for i, t in enumerate(tensors(dv))),
                                              None, None, "post", 0.5),
                         "crosshead::imhsa: k must have q's shape [2, 3, 10, 4], got [2, 3, 5, 4]"),
    "3-D v": (lambda dv: ops.imhsa(*(t[0] if i == 2 else t for i, t in enumerate(tensors(dv))), None, None,
                                   "post", 0.5),
              "crosshead::imhsa: v must have 4 dimensions (B, h, N, d), got shape [3, 10, 4]"),
    "q_land of another head count": (
        lambda dv: ops.imhsa(*(t[:, :2] if i >= 3 else t for i, t in enumerate(tensors(dv))), None, None, "post", 0.5),
        "crosshead::imhsa: q_land must be (B, h, L, d) with q's B, h, d, got [2, 2, 3, 4] for q [2, 3, 10, 4]"),
    "k_land unlike q_land": (
        lambda dv: ops.imhsa(*(t[:, :, :2] if i == 4 else t for i, t in enumerate(tensors(dv))), None, None,
                             "post", 0.5),
        "crosshead::imhsa: k_land must have q_land's shape [2, 3, 3, 4], got [2, 3, 2, 4]"),
    "no landmarks": (lambda dv: ops.imhsa(*(t[:, :, :0] if i >= 3 else t for i, t in enumerate(tensors(dv))),
                                          None, None, "post", 0.5),
                     "crosshead::imhsa: need at least one head, token, channel and landmark, got (h, N, d, L) = "
                     "(3, 10, 4, 0)"),
    "backward with a wrong lse_q": (
        lambda dv: ops.imhsa_backward(tensors(dv)[0], *tensors(dv), None, None, *saved(dv, N + 1), "post", 0.5),
        "crosshead::imhsa_backward: lse_q must be the float32 [2, 3, 10] tensor the forward returned on q's device, "
        "got float32 [2, 3, 11] on {device}"),
    "backward with a half grad_out": (
        lambda dv: ops.imhsa_backward(tensors(dv)[0].half(), *tensors(dv), None, None, *saved(dv), "post", 0.5),
        "crosshead::imhsa_backward: grad_out has dtype float16 but q has float32"),
    "negative prefix": (lambda dv: ops.landmarks(tensors(dv)[0], [], [3], -1),
                        "crosshead::landmarks: prefix must be in [0, N), got prefix=-1 with N=10"),
    "prefix of every token": (lambda dv: ops.landmarks(tensors(dv)[0], [], [3], 10),
                              "crosshead::landmarks: prefix must be in [0, N), got prefix=10 with N=10"),
    "size larger than the grid": (
        lambda dv: ops.landmarks(tensors(dv)[0], [2, 5], [3, 2], 0),
        "crosshead::landmarks: size [3, 2] must be positive and no larger than the grid [2, 5]"),
    "1-D size larger than the tokens": (
        lambda dv: ops.landmarks(tensors(dv)[0], [], [9], 2),
        "crosshead::landmarks: size [9] must be positive and no larger than the grid [8]"),
    "negative grid": (lambda dv: ops.landmarks(tensors(dv)[0], [-2, -5], [1, 1], 0),
                      "crosshead::landmarks: grid [-2, -5] must be positive and hold the N - prefix = 10 grid tokens"),
    "grid of the wrong size": (
        lambda dv: ops.landmarks(tensors(dv)[0], [3, 3], [1, 1], 0),
        "crosshead::landmarks: grid [3, 3] must be positive and hold the N - prefix = 10 grid tokens"),
    "2-D size for 1-D tokens": (lambda dv: ops.landmarks(tensors(dv)[0], [], [2, 2], 0),
                                "crosshead::landmarks: with grid=[] (1-D tokens) size must be [L], got [2, 2]"),
    "integer x": (lambda dv: ops.landmarks(tensors(dv)[0].int(), [], [3], 0),
                  "crosshead::landmarks: x has dtype int32; supported: float16, bfloat16, float32, float64"),
    "backward with the wrong landmark count": (
        lambda dv: ops.landmarks_backward(tensors(dv)[3], 10, [2, 5], [2, 2], 0),
        "crosshead::landmarks_backward: grad has 3 landmarks but size [2, 2] makes 4"),
    "backward with a negative prefix": (
        lambda dv: ops.landmarks_backward(tensors(dv)[3], 10, [], [3], -4),
        "crosshead::landmarks_backward: prefix must be in [0, N), got prefix=-4 with N=10"),
}


def expected(case, device):
    return CASES[case][1].format(device=device, other=other(device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
def test_refused_with_the_same_message_on_every_device(case, device):
    with pytest.raises(ValueError) as info:
        CASES[case][0](device)
    assert str(info.value).splitlines()[0] == expected(case, device)


COMPILED = {
    "k shorter than q": lambda q, k, v, ql, kl: ops.imhsa(q, k[:, :, :5], v, ql, kl, None, None, "post", 0.5),
    "size larger than the grid": lambda q, k, v, ql, kl: ops.landmarks(q, [2, 5], [3, 2], 0),
    "mix in capitals": lambda q, k, v, ql, kl: ops.imhsa(q, k, v, ql, kl, None, None, "POST", 0.5),
    "backward with a wrong lse_q": lambda q, k, v, ql, kl: ops.imhsa_backward(
        q, q, k, v, ql, kl, None, None, kl.new_zeros(B, h, L, d), kl.new_zeros(B, h, L), q.new_zeros(B, h, N + 1),
        "post", 0.5),
}


@pytest.mark.parametrize("case", list(COMPILED))
def test_refused_while_compiling(case):
    """Under torch.compile the fake kernel sees the arguments first: the op's own error, not a crash
    deeper in inductor."""
    torch._dynamo.reset()
    with pytest.raises(Exception) as info:
        torch.compile(COMPILED[case], fullgraph=True, backend="inductor")(*tensors("cpu"))
    assert expected(case, "cpu") in str(info.value)


def test_the_cpu_cases_reach_the_kernel_they_name():
    """Under the emulator the CPU cases above exercise the C++ checks; else the Python ones."""
    served_by_python = ("imhsa", "CPU") in _library.python_kernels
    assert served_by_python == (not _library.emulated)


@pytest.mark.parametrize("device", DEVICES)
def test_valid_edge_arguments_pass_every_check(device):
    q, k, v, ql, kl = tensors(device)
    w32 = torch.eye(h, device=device)
    out = ops.imhsa(q.half(), k.half(), v.half(), ql.half(), kl.half(), w32, w32, "pre", 0.5)[0]
    assert out.shape == q.shape and out.dtype == torch.float16
    empty = [t[:0] for t in (q, k, v, ql, kl)]
    assert ops.imhsa(*empty, None, None, "post", 0.5)[0].shape == (0, h, N, d)
    assert ops.landmarks(q, [], [10], 0).shape == (B, h, 10, d)
    assert ops.landmarks(q, [1, 1], [1, 1], 9).shape == (B, h, 1, d)
