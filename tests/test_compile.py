"""torch.compile and torch.export across resolutions: the module (grid inferred, grid given, prefix
tokens, 1-D landmarks) and the models must serve every resolution the eager ones do, with no graph
break and, once a size has turned dynamic, no recompilation per resolution.

Graphs are counted with a backend that records each graph Dynamo hands it; ``fullgraph=True`` makes
any graph break an error. The tests use the "eager"/"aot_eager" backends: what is under test is the
capture (Dynamo, AOTAutograd, export), which inductor would only make slower to test on a CPU; and
the captured program must compute bitwise what eager does (_assert_same).
"""

import io

import pytest
import torch
from torch import nn
from torch.export import Dim

import crosshead.models as M
from crosshead.nn import InteractiveMultiheadAttention, symbolic_isqrt


class GraphCounter:
    """A torch.compile backend that runs each captured graph as is and counts them."""

    def __init__(self, inner="eager"):
        self.graphs = []
        self.inner = inner

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        if self.inner == "eager":
            return gm.forward
        from torch._dynamo.backends.registry import lookup_backend
        return lookup_backend(self.inner)(gm, example_inputs)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _module(prefix=1, landmarks=(2, 2), seed=0):
    torch.manual_seed(seed)
    m = InteractiveMultiheadAttention(32, num_heads=4, landmarks=landmarks, num_prefix_tokens=prefix)
    with torch.no_grad():  # interaction away from the identity, so that a wrong grid would show
        m.w_q.add_(0.2 * torch.randn(4, 4))
        m.w_k.add_(0.2 * torch.randn(4, 4))
    return m


def _tokens(side, prefix=1, batch=2):
    return torch.randn(batch, prefix + side * side, 32)


def _assert_same(got, want):
    """Compiled or exported against eager: bitwise equal. The "eager" and "aot_eager" backends and
    torch.export run the same ATen kernels on the same inputs in the same order as eager does (the
    custom ops are opaque to them), so the error bound of their difference is zero; any difference
    means the capture changed what runs. (inductor, which may fuse and reorder, is held to a
    rounding bound instead: tests/test_nn.py.)"""
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def _check_fwd_bwd(compiled, eager, x, **kw):
    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    yc, ye = compiled(xc, **kw), eager(xe, **kw)
    _assert_same(yc, ye)
    g = torch.randn_like(ye)
    yc.backward(g)
    ye.backward(g)
    _assert_same(xc.grad, xe.grad)


# ------------------------------------------------------------------------------ symbolic square root


def test_symbolic_isqrt_eager_is_exact():
    for k in (0, 1, 2, 7, 14, 56, 2 ** 26 - 1, 2 ** 26, 3 * 10 ** 9):
        assert symbolic_isqrt(k * k, "no") == k
        for n in (k * k + 1, (k + 1) ** 2 - 1):
            if n != k * k and n != (k + 1) ** 2:
                with pytest.raises(ValueError, match="^no$"):
                    symbolic_isqrt(n, "no")
    with pytest.raises(ValueError):
        symbolic_isqrt(-4, "no")


def test_symbolic_root_formula_is_exact_for_squares_up_to_2_53():
    """The traced path's candidate, trunc(sqrt(float(n))), evaluated on ints as guards and exported
    programs evaluate it: exact on every square up to 2^53, so no square is refused there."""
    largest = 94906265  # the largest k with k² <= 2^53
    assert largest ** 2 <= 2 ** 53 < (largest + 1) ** 2
    ks = [1, 2, 3, 7, 14, 1000, 2 ** 26 - 1, 2 ** 26, 2 ** 26 + 1, largest - 1, largest]
    ks += torch.randint(1, largest, (2000,), generator=torch.Generator().manual_seed(0)).tolist()
    for k in ks:
        assert torch.sym_int(torch.sym_sqrt(k * k)) == k, k
        for n in (k * k - 1, k * k + 1):  # and a non-square never passes the exact check
            if k == 1 and n == 0:
                continue
            side = torch.sym_int(torch.sym_sqrt(n))
            assert side * side != n


# ------------------------------------------------------------------------------------ torch.compile


@pytest.mark.parametrize("prefix", [0, 1])
def test_compile_grid_inferred_serves_every_resolution(prefix):
    """Automatic dynamic: the first resolution compiles a static graph, the second a dynamic one that
    then serves every further square resolution without recompiling."""
    m = _module(prefix)
    counter = GraphCounter("aot_eager")
    compiled = torch.compile(m, fullgraph=True, backend=counter)
    for side in (4, 6, 5, 9, 3):
        _check_fwd_bwd(compiled, m, _tokens(side, prefix))
    assert len(counter.graphs) == 2, [g.graph for g in counter.graphs]


def test_compile_dynamic_true_one_graph():
    m = _module()
    counter = GraphCounter()
    compiled = torch.compile(m, fullgraph=True, backend=counter, dynamic=True)
    with torch.no_grad():
        for side in (4, 6, 5, 11):
            x = _tokens(side)
            _assert_same(compiled(x), m(x))
    assert len(counter.graphs) == 1


def test_compile_no_graph_break_explain():
    m = _module()
    x = _tokens(6)
    torch._dynamo.mark_dynamic(x, 1)  # symbolic N: the path that used math.isqrt
    explanation = torch._dynamo.explain(m)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compile_non_square_still_refused():
    m = _module()
    compiled = torch.compile(m, fullgraph=True, backend=GraphCounter(), dynamic=True)
    compiled(_tokens(4))
    with pytest.raises(Exception, match="do not form a square: pass grid"):
        compiled(torch.randn(2, 1 + 30, 32))


def test_compile_grid_given_and_1d_landmarks():
    """grid=(H, W) from a feature map's shape (how the models call it), non-square grids; and 1-D
    landmarks over a sequence of any length."""
    class MapAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = _module(prefix=0, landmarks=(2, 3))

        def forward(self, fmap):
            B, C, H, W = fmap.shape
            return self.attn(fmap.flatten(2).transpose(1, 2), (H, W))

    model = MapAttention()
    counter = GraphCounter("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    for hw in ((4, 6), (6, 4), (5, 9), (8, 3)):
        _check_fwd_bwd(compiled, model, torch.randn(2, 32, *hw))
    assert len(counter.graphs) == 2

    seq = _module(prefix=1, landmarks=5)
    counter = GraphCounter("aot_eager")
    compiled = torch.compile(seq, fullgraph=True, backend=counter)
    for n in (12, 20, 37, 6):
        _check_fwd_bwd(compiled, seq, torch.randn(2, n, 32))
    assert len(counter.graphs) == 2


def test_compile_inductor_two_resolutions():
    m = _module()
    counter = GraphCounter("inductor")
    compiled = torch.compile(m, fullgraph=True, backend=counter)
    for side in (4, 6, 5):
        _check_fwd_bwd(compiled, m, _tokens(side))
    assert len(counter.graphs) == 2


# ------------------------------------------------------------------------------------- torch.export


def _export_roundtrip(ep):
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    return torch.export.load(buf)


def test_export_grid_inferred_dynamic_n():
    m = _module(prefix=1, landmarks=(2, 3)).eval()
    N = Dim("tokens", min=1 + 3 * 3, max=1 + 64 * 64)
    ep = torch.export.export(m, (_tokens(4),), dynamic_shapes=({1: N},))
    for program in (ep.module(), _export_roundtrip(ep).module()):
        with torch.no_grad():
            for side in (3, 7, 12):
                x = _tokens(side)
                _assert_same(program(x), m(x))
            with pytest.raises(Exception, match="do not form a square: pass grid"):
                program(torch.randn(2, 1 + 30, 32))


def test_export_grid_too_small_for_landmarks_is_a_range():
    m = _module(prefix=1, landmarks=(3, 3)).eval()
    with pytest.raises(Exception, match="min=10"):  # export suggests the range that works: N - 1 >= 3 x 3
        torch.export.export(m, (_tokens(4),), dynamic_shapes=({1: Dim("tokens", min=5, max=4097)},))


def test_export_1d_landmarks_dynamic_n():
    m = _module(prefix=1, landmarks=5).eval()
    ep = torch.export.export(m, (torch.randn(2, 20, 32),), dynamic_shapes=({1: Dim("tokens", min=6, max=5000)},))
    with torch.no_grad():
        for n in (6, 33, 101):
            x = torch.randn(2, n, 32)
            _assert_same(ep.module()(x), m(x))


# ------------------------------------------------------------------------------------------- models

SMALL_IVIT = dict(dims=(16, 32, 64, 128), depths=(1, 1, 2, 1), num_heads=(4, 8))


def _models():
    """Default landmarks (7, 7), at sizes where every attention grid is at least 7 x 7: there the landmark
    count L = 49 is fixed, the regime a single graph or exported program serves (see docs/models.md)."""
    torch.manual_seed(0)
    return {"deit": (M.deit_imhsa_tiny(depth=2, num_classes=5).eval(), 16,
                     [(128, 128), (160, 112), (112, 240), (224, 224)]),
            "ivit": (M.ivit_tiny(num_classes=5, **SMALL_IVIT).eval(), 32,
                     [(224, 224), (288, 224), (256, 320)])}


@pytest.mark.parametrize("name", ["deit", "ivit"])
def test_models_compile_across_resolutions(name):
    model, _, resolutions = _models()[name]
    counter = GraphCounter()
    compiled = torch.compile(model, fullgraph=True, backend=counter, dynamic=True)
    with torch.no_grad():
        for hw in resolutions:
            x = torch.randn(2, 3, *hw)
            _assert_same(compiled(x), model(x))
    # the first call has H = W, which duck sizing turns into one symbol; the first non-square input
    # recompiles once; the 224² input (DeiT's own position table) is served without recompiling
    assert len(counter.graphs) == 2


@pytest.mark.parametrize("name", ["deit", "ivit"])
def test_models_export_dynamic_image_size(name):
    model, unit, resolutions = _models()[name]
    H, W = Dim("height", min=7, max=64), Dim("width", min=7, max=64)
    ep = torch.export.export(model, (torch.randn(2, 3, *resolutions[0]),),
                             dynamic_shapes=({2: unit * H, 3: unit * W},))
    with torch.no_grad():
        for hw in resolutions[1:]:
            x = torch.randn(2, 3, *hw)
            _assert_same(ep.module()(x), model(x))


def test_timm_vit_with_the_module_compiles_and_exports():
    timm = pytest.importorskip("timm", reason="timm is only in the cuda venv")
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=5, depth=2,
                            dynamic_img_size=True).eval()
    for block in vit.blocks:  # grid inferred from N: timm's blocks call attn(x)
        block.attn = InteractiveMultiheadAttention(192, num_heads=3, landmarks=(2, 2),
                                                   num_prefix_tokens=vit.num_prefix_tokens)
    compiled = torch.compile(vit, fullgraph=True, backend=GraphCounter())
    side = Dim("side", min=2, max=32)
    ep = torch.export.export(vit, (torch.randn(2, 3, 64, 64),), dynamic_shapes=({2: 16 * side, 3: 16 * side},))
    with torch.no_grad():
        for r in (96, 128, 48):
            x = torch.randn(2, 3, r, r)
            _assert_same(compiled(x), vit(x))
            _assert_same(ep.module()(x), vit(x))
