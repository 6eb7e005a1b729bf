"""The models' timm-style API without timm: forward_intermediates, features_only, pooling, gradient
checkpointing, layer-decay groups, FX tracing and pretrained cfgs (test_models_timm.py: through timm)."""

import re

import pytest
import torch
import torch.fx

import crosshead.models as M
from crosshead.models import cfgs, features, pooling

SMALL_IVIT = dict(dims=(16, 32, 64, 128), depths=(1, 1, 2, 1), num_heads=(4, 8))
SMALL_DEIT = dict(depth=3)


def _ivit(**kw):
    return M.ivit_tiny(**{**SMALL_IVIT, **kw})


def _deit(**kw):
    return M.deit_imhsa_tiny(**{**SMALL_DEIT, **kw})


def _stage_maps(model, x):
    x = model.stem(x)
    out = []
    for stage in model.stages:
        x = stage(x)
        out.append(x)
    return out


def _block_tokens(model, x):
    x, grid = model._embed(x)
    out = []
    for blk in model.blocks:
        x = blk(x, grid)
        out.append(x)
    return out, grid


def test_ivit_forward_intermediates_are_the_stage_outputs():
    model = _ivit(num_classes=3).eval()
    x = torch.randn(2, 3, 64, 96)
    maps = _stage_maps(model, x)
    final, inter = model.forward_intermediates(x)
    assert torch.equal(final, model.forward_features(x))
    assert len(inter) == 4 and all(torch.equal(a, b) for a, b in zip(inter, maps))
    assert [t.shape[1] for t in inter] == [f["num_chs"] for f in model.feature_info]
    assert [64 // t.shape[2] for t in inter] == [f["reduction"] for f in model.feature_info]
    for indices, want in ((2, [2, 3]), ([-1], [3]), ((0, 2), [0, 2]), (None, [0, 1, 2, 3])):
        got = model.forward_intermediates(x, indices=indices, intermediates_only=True)
        assert len(got) == len(want) and all(torch.equal(g, maps[i]) for g, i in zip(got, want))
    nhwc = model.forward_intermediates(x, indices=[1], output_fmt="NHWC", intermediates_only=True)[0]
    assert torch.equal(nhwc, maps[1].permute(0, 2, 3, 1))
    early, inter = model.forward_intermediates(x, indices=[1], stop_early=True)
    assert torch.equal(early, maps[1]) and torch.equal(inter[0], maps[1])
    assert torch.equal(model.forward_pyramid(x)[2], maps[2])


def test_deit_forward_intermediates_are_the_block_outputs():
    model = _deit(num_classes=3).eval()
    x = torch.randn(2, 3, 32, 48)
    tokens, grid = _block_tokens(model, x)
    final, inter = model.forward_intermediates(x)
    assert torch.equal(final, model.forward_features(x))
    assert grid == (2, 3) and len(inter) == 3
    for t, y in zip(tokens, inter):
        assert torch.equal(y, t[:, 1:].reshape(2, 2, 3, -1).permute(0, 3, 1, 2))
    nlc = model.forward_intermediates(x, indices=1, output_fmt="NLC", norm=True, intermediates_only=True)
    assert torch.equal(nlc[0], model.norm(tokens[2])[:, 1:])
    pairs = model.forward_intermediates(x, indices=[0], output_fmt="NLC", return_prefix_tokens=True,
                                        intermediates_only=True)
    assert torch.equal(pairs[0][0], tokens[0][:, 1:]) and torch.equal(pairs[0][1], tokens[0][:, :1])


@pytest.mark.parametrize("indices,match", [
    (5, r"indices=5 asks for the last 5 levels; this model has 1 to 4"), (0, "asks for the last 0"),
    ([4], r"ints in \[-4, 4\)"), ([-5], r"ints in \[-4, 4\)"), ([1.0], "ints in"), ([True], "ints in"),
    ([2, 1], "increasing order"), ([1, 1], "distinct"), ([1, -3], "distinct"), ([], "at least one"),
    ("0", "must be None, an int"), (True, "must be None, an int")])
def test_bad_indices_are_refused_by_name(indices, match):
    with pytest.raises(ValueError, match=match):
        _ivit().forward_intermediates(torch.randn(1, 3, 32, 32), indices=indices)
    with pytest.raises(ValueError, match=match.replace("indices", "out_indices") if "indices=" in match else match):
        _ivit(features_only=True, out_indices=indices)


def test_bad_output_fmt_is_refused():
    with pytest.raises(ValueError, match=r"output_fmt must be one of \('NCHW', 'NHWC'\)"):
        _ivit().forward_intermediates(torch.randn(1, 3, 32, 32), output_fmt="NLC")
    with pytest.raises(ValueError, match=r"output_fmt must be one of \('NCHW', 'NLC'\)"):
        _deit(features_only=True, output_fmt="NHWC")


@pytest.mark.parametrize("family", ["ivit", "deit"])
def test_features_only_is_the_pruned_classifier(family):
    full = _ivit() if family == "ivit" else _deit()
    x = torch.randn(2, 3, 64, 64)
    levels = len(full.feature_info)
    for out_indices, want in (((-1,), [levels - 1]), ((1, 2), [1, 2]), ((-2,), [levels - 2]), (1, [levels - 1])):
        feat = (_ivit if family == "ivit" else _deit)(features_only=True, out_indices=out_indices).eval()
        missing, unexpected = feat.load_state_dict(full.state_dict(), strict=False)
        assert not missing  # same parameter names: a classifier's weights load into its features model
        # pruned: the head, the levels after the last requested one, and DeiT's final norm (kept with norm=True)
        later = re.compile(rf"^(stages|blocks)\.({'|'.join(map(str, range(max(want) + 1, levels)))})\.")
        dropped = ("head.", "norm.") if family == "deit" else ("head.",)
        assert set(unexpected) == {k for k in full.state_dict() if k.startswith(dropped) or later.match(k)}
        assert len(feat.stages if family == "ivit" else feat.blocks) == max(want) + 1
        assert feat.feature_info.out_indices == tuple(want) == feat.out_indices
        assert [d["index"] for d in feat.feature_info.get_dicts()] == want
        assert feat.feature_info.channels() == [full.feature_info[i]["num_chs"] for i in want]
        assert feat.feature_info.reduction() == [full.feature_info[i]["reduction"] for i in want]
        assert feat.feature_info.module_name() == [full.feature_info[i]["module"] for i in want]
        assert len(feat.feature_info) == levels and feat.pretrained_cfg["architecture"] == full.pretrained_cfg["architecture"]
        ref = full.eval().forward_intermediates(x, indices=want, intermediates_only=True)
        got = feat(x)
        assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, ref))
        # Hugging Face's TimmBackbone asks for every level through return_layers (output_hidden_states)
        feat.return_layers = {d["module"]: str(i) for i, d in enumerate(feat.feature_info.info)}
        every = feat(x)
        assert len(every) == max(want) + 1  # levels after the last requested one were pruned
        assert all(torch.equal(a, b) for a, b in zip(every, full.forward_intermediates(x, intermediates_only=True)))


def test_features_only_arguments_need_features_only():
    with pytest.raises(ValueError, match=r"\['out_indices'\] apply to features_only=True models only"):
        _ivit(out_indices=(1, 2))
    with pytest.raises(ValueError, match="feature_cls='hook' is not offered"):
        _ivit(features_only=True, feature_cls="hook")
    with pytest.raises(ValueError, match=r"feature_cfg keys \['bogus'\] are not supported"):
        _deit(features_only=True, feature_cfg=dict(bogus=1))
    feat = _deit(features_only=True, feature_cfg=dict(out_indices=(0,), feature_cls="getter"))
    assert feat.feature_info.out_indices == (0,)
    with pytest.raises(ValueError, match="output_stride=16 is not offered"):
        _ivit(output_stride=16)
    assert _deit(output_stride=16).num_classes == 1000


def _pool_reference(x, pool, prefix=None):
    if prefix is not None:  # tokens
        if pool == "token":
            return x[:, 0]
        x = x[:, prefix:].transpose(1, 2).unsqueeze(-1)
    mean, peak = x.mean((2, 3)), x.amax((2, 3))
    return {"avg": mean, "max": peak, "avgmax": (mean + peak) / 2, "catavgmax": torch.cat([mean, peak], 1)}[pool]


@pytest.mark.parametrize("family,pools", [("ivit", pooling.MAP_POOLS), ("deit", pooling.TOKEN_POOLS)])
def test_global_pools(family, pools):
    build = _ivit if family == "ivit" else _deit
    x = torch.randn(2, 3, 64, 64)
    for pool in pools:
        model = build(num_classes=7, global_pool=pool).eval()
        f = model.forward_features(x)
        pre = model.forward_head(f, pre_logits=True)
        assert model.head_hidden_size == (2 if pool == "catavgmax" else 1) * model.num_features
        if pool:
            want = _pool_reference(f, pool, None if family == "ivit" else 1)
            torch.testing.assert_close(pre, want, rtol=0, atol=0)
            assert pre.shape == (2, model.head_hidden_size) and model(x).shape == (2, 7)
        else:  # no pooling: the classifier applies per position (iViT) or per token (DeiT)
            assert torch.equal(pre, f)
            logits = model(x)
            per_position = torch.einsum("bchw,kc->bkhw", f, model.head.weight) if family == "ivit" else f @ model.head.weight.T
            per_position = per_position + (model.head.bias[:, None, None] if family == "ivit" else model.head.bias)
            torch.testing.assert_close(logits, per_position)
        # reset_classifier(0, pool) and the constructor with num_classes=0 give the same thing
        model.reset_classifier(0, pool)
        assert model.num_classes == 0 and torch.equal(model(x), pre)
        model.reset_classifier(5)
        assert model.global_pool == pool and model(x).shape[1 if family == "ivit" or pool else -1] == 5
        assert build(num_classes=0, global_pool=pool).eval()(x).shape == pre.shape


@pytest.mark.parametrize("family,pool,why", [
    ("ivit", "token", None), ("ivit", "map", "attention pooling"), ("deit", "map", "attention pooling"),
    ("deit", "catavgmax", "use 'avgmax'"), ("ivit", "fast", "use 'avg'"), ("deit", None, None), ("ivit", "AVG", None)])
def test_unknown_pools_are_refused_by_constructor_and_reset_classifier_alike(family, pool, why):
    build = _ivit if family == "ivit" else _deit
    match = "global_pool must be one of" + (f".*{re.escape(why)}" if why else "")
    with pytest.raises(ValueError, match=match):
        build(global_pool=pool)
    model = build()
    with pytest.raises(ValueError, match=match):
        model.reset_classifier(3, pool if pool is not None else 0)
    assert model.num_classes == 1000  # nothing changed by the refused call
    with pytest.raises(ValueError, match="num_classes must be a non-negative int"):
        model.reset_classifier(-1)


def test_reset_classifier_keeps_device_and_dtype():
    model = _ivit(num_classes=3).double()
    model.reset_classifier(4, "catavgmax")
    assert model.head.weight.dtype == torch.float64 and model.head.in_features == 256
    assert model(torch.randn(1, 3, 32, 32, dtype=torch.float64)).shape == (1, 4)


@pytest.mark.parametrize("family", ["ivit", "deit"])
def test_grad_checkpointing_recomputes_and_changes_nothing(family):
    build = _ivit if family == "ivit" else _deit
    torch.manual_seed(0)
    model = build(num_classes=5, drop_path_rate=0.3).train()
    x = torch.randn(2, 3, 64, 64)
    blocks = [b for s in model.stages for b in s.blocks] if family == "ivit" else list(model.blocks)
    calls = []
    for b in blocks:
        b.register_forward_pre_hook(lambda *_: calls.append(1))  # the recomputation may stop before the end
    results = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # same drop-path masks
        calls.clear()
        y = model(x)
        y.square().sum().backward()
        results.append((y.detach(), [p.grad.clone() for p in model.parameters()], len(calls)))
    (y0, g0, n0), (y1, g1, n1) = results
    assert n0 == len(blocks) and n1 == 2 * len(blocks)  # each block ran again in the backward
    assert torch.equal(y0, y1)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    final, _ = model.forward_intermediates(x[:1])  # grad checkpointing also serves forward_intermediates
    assert final.shape[0] == 1


def _groups(model):
    """Parameter name → layer key, as timm's group_with_matcher orders them (first matching regex;
    the captured ints, then the suffix); names matching nothing are None."""
    matcher = model.group_matcher()
    rules = [(matcher["stem"], (0,))] + [(p, s) for p, s in matcher["blocks"]]
    out = {}
    for name, _ in model.named_parameters():
        for pattern, suffix in rules:
            m = re.match(pattern, name)
            if m:
                out[name] = ("stem",) if pattern == matcher["stem"] else tuple(int(g) for g in m.groups()) + (suffix or ())
                break
        else:
            out[name] = None
    return out


@pytest.mark.parametrize("family", ["ivit", "deit"])
def test_group_matcher_keeps_each_block_whole_and_in_depth_order(family):
    model = _ivit(num_classes=3) if family == "ivit" else _deit(num_classes=3)
    groups = _groups(model)
    assert {n for n, g in groups.items() if g is None} == {"head.weight", "head.bias"}
    block = re.compile(r"^(stages\.\d+\.blocks\.\d+|blocks\.\d+)\.")
    by_block = {}
    for name, key in groups.items():
        m = block.match(name)
        if m:
            by_block.setdefault(m.group(1), set()).add(key)
    assert by_block and all(len(keys) == 1 for keys in by_block.values()), by_block
    order = [next(iter(by_block[b])) for b in by_block]  # named_parameters visits blocks in depth order
    assert order == sorted(order) and len(set(order)) == len(order)
    stem = [n for n, g in groups.items() if g == ("stem",)]
    assert stem and all(n.startswith(("stem", "patch_embed", "cls_token", "pos_embed")) for n in stem)


class _LeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, M.FX_LEAF_MODULES) or super().is_leaf_module(m, qualname)


@pytest.mark.parametrize("family", ["ivit", "deit"])
@pytest.mark.parametrize("train", [False, True])
def test_fx_symbolic_trace_with_the_attention_as_leaf(family, train):
    model = (_ivit(num_classes=4) if family == "ivit" else _deit(num_classes=4)).train(train)
    if train:  # drop path active: the masks come from the RNG, so compare under one seed
        for m in model.modules():
            if isinstance(m, M.blocks.DropPath):
                m.p = 0.2
    graph = torch.fx.GraphModule(model, _LeafTracer().trace(model))
    x = torch.randn(2, 3, 64, 96)
    torch.manual_seed(3)
    want = model(x)
    torch.manual_seed(3)
    got = graph(x)
    assert torch.equal(got, want)
    got.sum().backward()
    assert all(p.grad is not None for p in graph.parameters())
    with pytest.raises(ValueError, match="divisible by"):  # the wrapped input check still runs
        graph(torch.randn(1, 3, 40, 48))


def test_fx_needs_the_attention_as_leaf():
    # the reason FX_LEAF_MODULES exists: the iMHSA module branches on the input's shape
    with pytest.raises(Exception, match="(?i)symbolically traced variables cannot be used as inputs to control flow"):
        torch.fx.symbolic_trace(_deit(num_classes=4))


def test_pretrained_cfg_resolution():
    model = _ivit(num_classes=10, in_chans=1)
    cfg = model.pretrained_cfg
    assert model.default_cfg is cfg and cfg["architecture"] == "ivit_tiny"
    assert cfg["num_classes"] == 10 and cfg["input_size"] == (1, 224, 224) and cfg["min_input_size"] == (1, 32, 32)
    assert cfg["pool_size"] == (7, 7) and cfg["first_conv"] + ".weight" in model.state_dict()
    assert cfg["classifier"] + ".weight" in model.state_dict()
    over = _deit(pretrained_cfg_overlay=dict(mean=(0.5,) * 3, crop_pct=1.0))
    assert over.pretrained_cfg["mean"] == (0.5,) * 3 and over.pretrained_cfg["crop_pct"] == 1.0
    # the configuration's num_classes and channels are the model's defaults, as in timm
    own = _deit(pretrained_cfg=dict(cfgs.DEFAULT_CFGS["deit_imhsa_tiny"], num_classes=7, input_size=(1, 64, 64)))
    assert own.num_classes == 7 and own.patch_embed.proj.in_channels == 1
    assert own.pretrained_cfg["input_size"] == (1, 64, 64)
    assert _ivit(img_size=256).pretrained_cfg["input_size"] == (3, 256, 256)
    assert _ivit(features_only=True).pretrained_cfg["architecture"] == "ivit_tiny"
    assert cfgs.DEFAULT_CFGS["ivit_tiny"]["num_classes"] == 1000  # a model's cfg is its own copy


@pytest.mark.parametrize("kwargs,match", [
    (dict(pretrained_cfg_overlay=dict(bogus=1)), r"keys \['bogus'\] are not pretrained-cfg fields"),
    (dict(pretrained_cfg="in1k"), "unknown pretrained tag 'in1k'"),
    (dict(pretrained_cfg=3), "pretrained_cfg must be None, a tag string"),
    (dict(pretrained_cfg_overlay=[("mean", 0)]), "pretrained_cfg_overlay must be a dict"),
    (dict(img_size=100), "img_size must be a positive multiple of 32"),
    (dict(pretrained=True), "no pretrained weights exist.*load_state_dict"),
    (dict(pretrained=True, pretrained_cfg_overlay=dict(file="w.pth")), r"names \['file'\], but loading them is not"),
])
def test_bad_cfg_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _ivit(**kwargs)


def test_feature_info_class():
    info = features.FeatureInfo([dict(num_chs=c, reduction=r, module=f"m{i}")
                                 for i, (c, r) in enumerate(((8, 4), (16, 8), (32, 16)))], 2)
    assert info.out_indices == (1, 2) and info.channels() == [16, 32] and info.reduction(0) == 4
    assert info.channels([0, 2]) == [8, 32] and info.module_name() == ["m1", "m2"]
    assert info.get_dicts(keys=["num_chs"]) == [{"num_chs": 16}, {"num_chs": 32}]
    assert info.get_dicts(idx=0)["index"] == 0 and len(info) == 3 and info[2]["module"] == "m2"
    other = info.from_other((-3,))
    assert other.out_indices == (0,) and info.out_indices == (1, 2)


@pytest.mark.parametrize("patch", [2, 4, 8])
def test_deit_conv_stem_gives_the_patch_grid_and_trains(patch):
    """stem='conv' (early convolutions): the same token grid as a patch of that size, from overlapping
    3×3 convs (a pixel outside a patch moves its token), and gradients reach the first conv."""
    torch.manual_seed(0)
    model = _deit(embed_dim=32, num_heads=4, patch_size=patch, img_size=32, stem="conv", num_classes=3, in_chans=1)
    assert isinstance(model.patch_embed, M.deit.ConvStem) and model.patch_embed.patch_size == patch
    convs = [m for m in model.patch_embed.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 2 * (patch.bit_length() - 1) and all(c.kernel_size == (3, 3) for c in convs)
    x = torch.randn(2, 1, 32, 32)
    tokens = model.forward_intermediates(x, indices=1, intermediates_only=True)[0]
    assert tokens.shape == (2, 32, 32 // patch, 32 // patch)
    model.eval()
    emb = model.patch_embed(x)
    y = x.clone()
    y[..., patch, patch] += 1.0  # first pixel of token (1, 1): the 3×3 convs reach token (0, 0) too
    moved = (model.patch_embed(y) - emb).abs().amax(1)[0]
    assert moved[0, 0] > 0 and moved[1, 1] > 0
    model.train()
    model(x).sum().backward()
    assert convs[0].weight.grad.abs().sum() > 0


def test_deit_cpe_adds_a_depthwise_conv_to_every_block():
    torch.manual_seed(0)
    plain = _deit(embed_dim=32, num_heads=4, patch_size=4, img_size=32, in_chans=1, num_classes=2)
    torch.manual_seed(0)
    with_cpe = _deit(embed_dim=32, num_heads=4, patch_size=4, img_size=32, in_chans=1, num_classes=2, cpe=True)
    extra = dict(with_cpe.named_parameters()).keys() - dict(plain.named_parameters()).keys()
    assert extra == {f"blocks.{i}.cpe.{w}" for i in range(3) for w in ("weight", "bias")}
    assert all(b.cpe.groups == 32 and b.cpe.kernel_size == (3, 3) for b in with_cpe.blocks)
    x = torch.randn(2, 1, 32, 32)
    assert with_cpe(x).shape == plain(x).shape == (2, 2)
    assert with_cpe(torch.randn(1, 1, 48, 48)).shape == (1, 2)  # any grid: the conv needs no table


@pytest.mark.parametrize("kwargs,match", [
    (dict(stem="convs"), r"stem must be one of \['conv', 'patch'\], got 'convs'"),
    (dict(stem="conv", patch_size=6, img_size=48), r"stem='conv' needs patch_size a power of 2, at least 2, got 6"),
    (dict(stem="conv", patch_size=1, img_size=32), r"stem='conv' needs patch_size a power of 2, at least 2, got 1"),
    (dict(cpe=1), r"cpe must be a bool, got 1"),
])
def test_deit_bad_stem_and_cpe_are_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _deit(**kwargs)
