"""crosshead.nn.InteractiveMultiheadAttention: the functional path, grids, prefixes, autocast,
torch.compile and the timm drop-in."""

import pytest
import torch
from torch import nn

import crosshead
import error_bounds
from crosshead.nn import InteractiveMultiheadAttention


def _manual(m, x, grid, prefix):
    """The module's computation spelled out with the public functions."""
    B, N, C = x.shape
    h = m.num_heads
    q, k, v = m.qkv(x).reshape(B, N, 3, h, C // h).permute(2, 0, 3, 1, 4)
    ql = crosshead.landmarks(q, grid, m.landmarks, prefix)
    kl = crosshead.landmarks(k, grid, m.landmarks, prefix)
    out = crosshead.imhsa(q, k, v, ql, kl, m.w_q, m.w_k, mix=m.mix)
    return m.proj(out.transpose(1, 2).reshape(B, N, C))


@pytest.mark.parametrize("mix", ["post", "pre"])
@pytest.mark.parametrize("prefix", [0, 1, 4])
def test_module_is_the_documented_composition(mix, prefix):
    m = InteractiveMultiheadAttention(48, num_heads=4, landmarks=(3, 4), mix=mix, num_prefix_tokens=prefix)
    with torch.no_grad():
        m.w_q.add_(0.2 * torch.randn(4, 4))
        m.w_k.add_(0.2 * torch.randn(4, 4))
    x = torch.randn(2, prefix + 6 * 8, 48)
    torch.testing.assert_close(m(x, (6, 8)), _manual(m, x, (6, 8), prefix))


def test_fresh_layer_is_plain_two_hop_attention():
    m = InteractiveMultiheadAttention(32, num_heads=4, landmarks=(2, 2))
    assert torch.equal(m.w_q, torch.eye(4)) and torch.equal(m.w_k, torch.eye(4))
    plain = InteractiveMultiheadAttention(32, num_heads=4, landmarks=(2, 2), interaction=False)
    assert plain.w_q is None and plain.w_k is None
    plain.load_state_dict(m.state_dict(), strict=False)
    x = torch.randn(2, 16, 32)
    torch.testing.assert_close(m(x), plain(x))


def test_square_grid_inferred_and_non_square_refused():
    m = InteractiveMultiheadAttention(32, num_heads=2, landmarks=(3, 3), num_prefix_tokens=1)
    x = torch.randn(1, 1 + 49, 32)
    torch.testing.assert_close(m(x), m(x, (7, 7)))
    with pytest.raises(ValueError, match="do not form a square: pass grid"):
        m(torch.randn(1, 1 + 48, 32))
    assert m(torch.randn(1, 1 + 48, 32), (6, 8)).shape == (1, 49, 32)


def test_1d_sequences():
    m = InteractiveMultiheadAttention(24, num_heads=3, landmarks=5)
    x = torch.randn(2, 37, 24, requires_grad=True)
    y = m(x)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.isfinite().all()


def test_backward_reaches_every_parameter():
    m = InteractiveMultiheadAttention(32, num_heads=4, landmarks=(2, 2), num_prefix_tokens=1)
    m(torch.randn(2, 17, 32)).square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_constructor_and_forward_errors():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        InteractiveMultiheadAttention(30, num_heads=4)
    with pytest.raises(ValueError, match="mix must be"):
        InteractiveMultiheadAttention(32, mix="mid")
    m = InteractiveMultiheadAttention(32, num_heads=4)
    with pytest.raises(ValueError, match=r"x must be \(B, N, dim\)"):
        m(torch.randn(16, 32))
    with pytest.raises(NotImplementedError, match="attn_mask"):
        m(torch.randn(1, 49, 32), attn_mask=torch.ones(49, 49, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="causal"):
        m(torch.randn(1, 49, 32), is_causal=True)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_heads=0), r"num_heads must be a positive int, got 0"),
    (dict(num_heads=-4), r"num_heads must be a positive int"),
    (dict(num_heads=4.0), r"num_heads must be a positive int"),
    (dict(num_heads=True), r"num_heads must be a positive int"),
    (dict(dim=0), r"dim must be a positive int"),
    (dict(dim=32.0), r"dim must be a positive int"),
    (dict(dim=30), r"dim=30 must be divisible by num_heads=4"),
    (dict(landmarks=(0, 7)), r"landmarks must be positive, got \(0, 7\)"),
    (dict(landmarks=-3), r"landmarks must be a positive int"),
    (dict(landmarks=0), r"landmarks must be a positive int"),
    (dict(landmarks="7x7"), r"landmarks must be a positive int L .* or a pair"),
    (dict(landmarks=True), r"landmarks must be"),
    (dict(landmarks=(7.0, 7)), r"landmarks must be"),
    (dict(landmarks=(7, 7, 7)), r"landmarks must be"),
    (dict(mix="mid"), r"mix must be 'post' or 'pre'"),
    (dict(mix=None), r"mix must be 'post' or 'pre'"),
    (dict(num_prefix_tokens=1.5), r"num_prefix_tokens must be a non-negative int, got 1.5"),
    (dict(num_prefix_tokens=-1), r"num_prefix_tokens must be a non-negative int"),
    (dict(num_prefix_tokens=True), r"num_prefix_tokens must be a non-negative int"),
    (dict(scale=float("nan")), r"scale must be None or a finite positive float, got nan"),
    (dict(scale=float("inf")), r"scale must be None or a finite positive float"),
    (dict(scale=0.0), r"scale must be None or a finite positive float"),
    (dict(scale=-0.5), r"scale must be None or a finite positive float"),
    (dict(scale="0.5"), r"scale must be None or a finite positive float"),
    (dict(qkv_bias=1), r"qkv_bias must be a bool"),
    (dict(proj_bias=None), r"proj_bias must be a bool"),
    (dict(interaction="no"), r"interaction must be a bool"),
])
def test_constructor_refuses_bad_arguments_by_name(kwargs, match):
    kwargs = {"dim": 32, "num_heads": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        InteractiveMultiheadAttention(**kwargs)


def test_constructor_accepts_and_normalises_good_arguments():
    m = InteractiveMultiheadAttention(32, 4, landmarks=[3, 4], scale=1, num_prefix_tokens=2)
    assert m.landmarks == (3, 4) and m.scale == 1.0 and isinstance(m.scale, float)
    assert InteractiveMultiheadAttention(32, 4, landmarks=5).landmarks == 5


def test_forward_with_no_grid_tokens_is_refused():
    m = InteractiveMultiheadAttention(32, num_heads=4, landmarks=(1, 1), num_prefix_tokens=2)
    with pytest.raises(ValueError, match="no grid tokens after its 2 prefix tokens"):
        m(torch.randn(1, 2, 32))


def test_cpu_autocast_bfloat16():
    """Under autocast the Linear layers give bfloat16 activations while w_q, w_k stay float32."""
    m = InteractiveMultiheadAttention(32, num_heads=4, landmarks=(2, 2))
    x = torch.randn(2, 16, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
        assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert m.w_q.grad.dtype == torch.float32
    # each within its bound of the exact output: Linear layers at bfloat16's u = 2⁻⁸, then float32
    # (a worst-case bound, wide for bfloat16: a logit's rounding error passes through exp)
    magnitude, f_bf16 = error_bounds.attention_module_bound(m, x, linear_roundoff=2.0 ** -8)
    _, f_32 = error_bounds.attention_module_bound(m, x)
    assert error_bounds.excess(y.float(), m(x), magnitude, f_bf16 + f_32, torch.float32) <= 1


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = InteractiveMultiheadAttention(32, num_heads=4, landmarks=(2, 2), num_prefix_tokens=1)
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        return self.head(x + self.attn(x, (4, 4)))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    model = _Model()
    x = torch.randn(2, 17, 32)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    out = compiled(x)
    # two float32 evaluations of one function (inductor may fuse and reorder): each within the
    # module's bound of the exact value, the head's Linear and the residual sum added
    magnitude, factor = error_bounds.attention_module_bound(model.attn, x, grid=(4, 4))
    with torch.no_grad():
        magnitude = (x.abs().double() + magnitude) @ model.head.weight.double().abs().T \
            + model.head.bias.double().abs()
    factor += 2 * error_bounds.linear_factor(32, 2.0 ** -24)
    assert error_bounds.excess(out, eager, magnitude, 2 * factor, torch.float32) <= 1
    out.sum().backward()
    assert model.attn.w_q.grad is not None
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_timm_vit_drop_in():
    timm = pytest.importorskip("timm", reason="timm needs torchvision, which this torch build lacks")
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=5)
    for block in vit.blocks:
        old = block.attn
        block.attn = InteractiveMultiheadAttention(old.qkv.in_features, num_heads=old.num_heads,
                                                   landmarks=(2, 2), num_prefix_tokens=vit.num_prefix_tokens)
    x = torch.randn(2, 3, 64, 64)
    logits = vit(x)
    assert logits.shape == (2, 5)
    logits.sum().backward()
    for block in vit.blocks:
        assert isinstance(block.attn, InteractiveMultiheadAttention)
        assert block.attn.w_q.grad is not None and block.attn.qkv.weight.grad.abs().sum() > 0
