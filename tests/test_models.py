"""crosshead.models: iViT and DeiT-iMHSA build (through timm when installed), run forward and backward at
two resolutions, expose a stride-8/16/32 pyramid, and swap their attention by name."""

import pytest
import torch

import crosshead.models as M
from crosshead.models.attention import GridInteractiveAttention, SoftmaxAttention
from crosshead.nn import InteractiveMultiheadAttention

IVIT = ["ivit_tiny", "ivit_small", "ivit_base"]
DEIT = ["deit_imhsa_tiny", "deit_imhsa_small"]
RES = {**{n: (64, 96) for n in IVIT}, **{n: (32, 64) for n in DEIT}}
SMALL_IVIT = dict(dims=(16, 32, 64, 128), depths=(1, 1, 2, 1), num_heads=(4, 8))


def _create(name, **kw):
    timm = pytest.importorskip("timm", reason="timm is only in the cuda venv")
    return timm.create_model(name, pretrained=False, **kw)


def _fwd_bwd(model, res, in_chans=3, batch=2):
    x = torch.randn(batch, in_chans, *((res, res) if isinstance(res, int) else res))
    y = model(x)
    y.square().mean().backward()
    return y


@pytest.mark.parametrize("name", IVIT + DEIT)
def test_timm_builds_forward_backward_two_resolutions(name):
    model = _create(name, num_classes=10)
    assert model.num_classes == 10 and model.pretrained_cfg["architecture"] == name
    for res in RES[name]:
        model.zero_grad(set_to_none=True)
        y = _fwd_bwd(model, res, batch=1)
        assert y.shape == (1, 10) and torch.isfinite(y).all()
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert not missing, f"no gradient at {res}px for {missing[:5]}"
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", IVIT + DEIT)
def test_builds_without_timm(name):
    # the same entry points through crosshead's own registry (the path the cpu venv has)
    model = M.create_model(name, num_classes=5, in_chans=1)
    y = _fwd_bwd(model, RES[name][0], in_chans=1, batch=1)
    assert y.shape == (1, 5)


def test_timm_listing_and_pretrained_refused():
    timm = pytest.importorskip("timm", reason="timm is only in the cuda venv")
    assert set(IVIT + DEIT) <= set(timm.list_models("*imhsa*") + timm.list_models("ivit_*"))
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("ivit_tiny", pretrained=True)


def test_features_only_pyramid_strides():
    model = _create("ivit_tiny", features_only=True)
    assert model.feature_info.reduction() == [8, 16, 32]
    assert model.feature_info.channels() == [128, 256, 512]
    for hw in ((64, 64), (96, 160)):
        feats = model(torch.randn(1, 3, *hw))
        assert [tuple(f.shape[1:]) for f in feats] == [(c, hw[0] // r, hw[1] // r) for c, r in
                                                       zip(model.feature_info.channels(), [8, 16, 32])]
        sum(f.sum() for f in feats).backward()
    all4 = M.ivit_tiny(features_only=True, out_indices=(0, 1, 2, 3), **SMALL_IVIT)
    assert all4.feature_info.reduction() == [4, 8, 16, 32]


def test_forward_features_and_head():
    model = M.ivit_tiny(num_classes=7, **SMALL_IVIT)
    x = torch.randn(2, 3, 64, 96)
    f = model.forward_features(x)
    assert f.shape == (2, 128, 2, 3)
    assert torch.allclose(model.forward_head(f), model(x))
    assert model.forward_head(f, pre_logits=True).shape == (2, 128)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    deit = M.deit_imhsa_tiny(num_classes=4, depth=2)
    assert deit.forward_features(torch.randn(1, 3, 48, 64)).shape == (1, 1 + 3 * 4, 192)
    # a plain ViT's features: stride-16 maps of its last blocks (test_models_api.py has the rest)
    feats = M.deit_imhsa_tiny(features_only=True, depth=2, out_indices=(0, 1))(torch.randn(1, 3, 48, 64))
    assert [tuple(f.shape) for f in feats] == [(1, 192, 3, 4)] * 2


def test_input_must_be_divisible_by_32():
    model = M.ivit_tiny(**SMALL_IVIT)
    with pytest.raises(ValueError, match="divisible by 32"):
        model(torch.randn(1, 3, 48, 64))


def test_deit_imhsa_matches_timm_deit_size():
    timm = pytest.importorskip("timm", reason="timm is only in the cuda venv")
    for ours, theirs, heads in (("deit_imhsa_tiny", "deit_tiny_patch16_224", 3),
                                ("deit_imhsa_small", "deit_small_patch16_224", 6)):
        a, b = timm.create_model(ours), timm.create_model(theirs)
        extra = {k for k in a.state_dict()} - set(b.state_dict())
        assert extra == {f"blocks.{i}.attn.{w}" for i in range(12) for w in ("w_q", "w_k")}
        assert set(b.state_dict()) <= set(a.state_dict())
        n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        assert n(a) - n(b) == 12 * 2 * heads * heads


@pytest.mark.parametrize("attn,mix,interaction", [("imhsa_post", "post", True), ("imhsa_pre", "pre", True),
                                                   ("imhsa_nointeraction", "post", False), ("imhsa", "post", True)])
def test_attn_swap_imhsa_variants(attn, mix, interaction):
    for model in (M.ivit_tiny(attn=attn, num_classes=3, **SMALL_IVIT), M.deit_imhsa_tiny(attn=attn, depth=2)):
        mods = [m for m in model.modules() if isinstance(m, InteractiveMultiheadAttention)]
        assert mods and all(m.mix == mix and (m.w_q is not None) == interaction for m in mods)
        assert not any(isinstance(m, SoftmaxAttention) for m in model.modules())
        _fwd_bwd(model, 64, batch=1)


def test_attn_swap_softmax():
    model = M.ivit_tiny(attn="softmax", num_classes=3, **SMALL_IVIT)
    assert sum(isinstance(m, SoftmaxAttention) for m in model.modules()) == 3
    assert not any(isinstance(m, InteractiveMultiheadAttention) for m in model.modules())
    _fwd_bwd(model, 64, batch=1)
    # same parameter names as the iMHSA model without interaction: checkpoints line up
    ref = M.ivit_tiny(attn="imhsa_nointeraction", num_classes=3, **SMALL_IVIT)
    assert set(model.state_dict()) == set(ref.state_dict())


def test_attn_unknown_name():
    with pytest.raises(ValueError, match="unknown attention"):
        M.ivit_tiny(attn="no_such_attention", **SMALL_IVIT)


def test_attn_swap_baselines_registry():
    baselines = pytest.importorskip("crosshead.baselines", reason="baselines registry not importable")
    avail = [n for n, why in baselines.available().items() if why is None]
    if not avail:
        pytest.skip("no baseline attention available here")
    worked = []
    for name in avail:
        attn = name if name not in M.ATTENTIONS else f"baselines:{name}"
        model = M.ivit_tiny(attn=attn, num_classes=3, **SMALL_IVIT)
        stage_attn = model.stages[2].blocks[0].attn
        assert not isinstance(stage_attn, (InteractiveMultiheadAttention, SoftmaxAttention)), name
        try:
            y = _fwd_bwd(model, 64, batch=1)
        except ValueError as e:
            # fixed-length attentions (Linformer's N x k projections) cannot serve stages of different N;
            # they must say so, and that is the only failure allowed
            assert "seq_len" in str(e), (name, e)
            continue
        assert torch.isfinite(y).all(), name
        worked.append(name)
    assert worked


def test_grid_attention_is_the_core_module_when_grid_is_large_enough():
    torch.manual_seed(0)
    ours = GridInteractiveAttention(64, 4, landmarks=(3, 3), mix="pre")
    core = InteractiveMultiheadAttention(64, 4, landmarks=(3, 3), mix="pre")
    core.load_state_dict(ours.state_dict())
    with torch.no_grad():
        ours.w_q.add_(0.1 * torch.randn(4, 4))
        core.w_q.copy_(ours.w_q)
    x = torch.randn(2, 5 * 6, 64)
    torch.testing.assert_close(ours(x, (5, 6)), core(x, (5, 6)))
    # smaller grid than landmarks: pooled to the grid itself (identity pooling)
    small = InteractiveMultiheadAttention(64, 4, landmarks=(2, 3), mix="pre")
    small.load_state_dict(ours.state_dict())
    x = torch.randn(2, 2 * 3, 64)
    torch.testing.assert_close(ours(x, (2, 3)), small(x, (2, 3)))


def test_landmarks_fixed_so_attention_flops_are_linear():
    from torch.utils.flop_counter import FlopCounterMode

    from crosshead.models.profile import _custom_mapping
    mapping = _custom_mapping()
    cost = {}
    for attn, op in (("imhsa_post", torch.ops.crosshead.imhsa), ("softmax", None)):
        model = M.deit_imhsa_tiny(attn=attn, depth=1, num_classes=0).eval()
        cost[attn] = []
        for r in (224, 448):
            with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as fc:
                model(torch.zeros(1, 3, r, r))
            counts = fc.get_flop_counts()["Global"]
            attn_ops = [k for k in counts if (k is op if op else "scaled_dot_product" in str(k))]
            assert len(attn_ops) == 1, list(counts)
            cost[attn].append(counts[attn_ops[0]])
    n1, n2 = 1 + 14 * 14, 1 + 28 * 28
    # L = 49 at both sizes: iMHSA's FLOPs grow like N, softmax attention's like N²
    assert cost["imhsa_post"][1] * n1 == cost["imhsa_post"][0] * n2
    assert cost["softmax"][1] * n1 * n1 == cost["softmax"][0] * n2 * n2
    assert cost["imhsa_post"][1] < cost["softmax"][1]


def test_no_weight_decay_names():
    model = M.deit_imhsa_tiny(depth=2)
    assert {"pos_embed", "cls_token", "blocks.0.attn.w_q", "blocks.1.attn.w_k"} <= model.no_weight_decay()


@pytest.mark.parametrize("kwargs,match", [
    (dict(embed_dim=100), r"embed_dim=100 must be divisible by num_heads=3"),
    (dict(embed_dim=0), r"embed_dim must be a positive int"),
    (dict(num_heads=0), r"num_heads must be a positive int"),
    (dict(depth=0), r"depth must be a positive int"),
    (dict(depth=2.5), r"depth must be a positive int"),
    (dict(patch_size=0), r"patch_size must be a positive int"),
    (dict(img_size=100), r"img_size=100 must be a multiple of patch_size=16"),
    (dict(img_size=(224, 224)), r"img_size must be a positive int"),
    (dict(landmarks=7), r"landmarks must be a pair \(Lh, Lw\)"),
    (dict(landmarks=(0, 7)), r"landmarks must be positive"),
    (dict(num_classes=-1), r"num_classes must be a non-negative int"),
    (dict(in_chans=0), r"in_chans must be a positive int"),
    (dict(mlp_ratio=0), r"mlp_ratio must be a finite positive number"),
    (dict(drop_rate=1.0), r"drop_rate must be a number in \[0, 1\)"),
    (dict(drop_path_rate=-0.1), r"drop_path_rate must be a number in \[0, 1\)"),
])
def test_deit_constructor_refuses_bad_arguments_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        M.deit_imhsa_tiny(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(dims=(16, 32, 64)), r"dims must be 4 ints"),
    (dict(dims=(1, 32, 64, 128)), r"dims must be >= 2"),
    (dict(dims="abcd"), r"dims must be 4 ints"),
    (dict(depths=(1, -1, 2, 1)), r"depths must be >= 0"),
    (dict(num_heads=(4,)), r"num_heads must be 2 ints"),
    (dict(num_heads=(5, 8)), r"dims\[2\]=64 must be divisible by num_heads\[0\]=5"),
    (dict(num_heads=(4, 0)), r"num_heads must be positive"),
    (dict(landmarks=(7, 7.5)), r"landmarks must be"),
    (dict(landmarks=7), r"landmarks must be a pair \(Lh, Lw\)"),
    (dict(num_classes=2.0), r"num_classes must be a non-negative int"),
    (dict(in_chans=0), r"in_chans must be a positive int"),
    (dict(mlp_ratio=float("nan")), r"mlp_ratio must be a finite positive number"),
    (dict(drop_path_rate=1.5), r"drop_path_rate must be a number in \[0, 1\)"),
])
def test_ivit_constructor_refuses_bad_arguments_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        M.ivit_tiny(**{**SMALL_IVIT, **kwargs})


def test_softmax_attention_refuses_bad_arguments_by_name():
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        SoftmaxAttention(32, 0)
    with pytest.raises(ValueError, match="dim=30 must be divisible by num_heads=4"):
        SoftmaxAttention(30, 4)
    with pytest.raises(ValueError, match="scale must be None or a finite positive float"):
        SoftmaxAttention(32, 4, scale=float("nan"))
