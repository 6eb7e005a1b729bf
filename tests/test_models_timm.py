"""The five models through timm, held to the checks of timm's own model tests (tests/test_models.py of
pytorch-image-models: forward, backward, default cfgs, features, forward_intermediates, FX) and to what
timm's users do with a model (layer decay, data config, Hugging Face's TimmBackbone).

TorchScript is not tested: it is deprecated in this torch (docs/models.md)."""

import math

import pytest
import torch

timm = pytest.importorskip("timm", reason="timm is only in the cuda venv")
import timm.optim  # noqa: E402
import crosshead.models as M  # noqa: E402  (registers the models with timm)

IVIT = ["ivit_tiny", "ivit_small", "ivit_base"]
DEIT = ["deit_imhsa_tiny", "deit_imhsa_small"]
SMALL = {**{n: dict(dims=(16, 32, 64, 128), depths=(1, 1, 2, 1), num_heads=(4, 8)) for n in IVIT},
         **{n: dict(depth=3) for n in DEIT}}


def _input_size(model, target):
    """timm's rule: the default input size, or the minimum one when the default exceeds ``target``."""
    cfg = model.pretrained_cfg
    size = cfg["input_size"]
    return cfg["min_input_size"] if max(size) > target and cfg.get("min_input_size") else size


@pytest.mark.parametrize("name", IVIT + DEIT)
def test_registered_with_pretrained_cfg(name):
    assert name in timm.list_models(module="zoo")
    assert timm.get_pretrained_cfg_value(name, "input_size") == (3, 224, 224)
    assert timm.get_pretrained_cfg_value(name, "first_conv") in ("stem.0", "patch_embed.proj")
    assert not timm.models.is_model_pretrained(name)  # no weights exist
    with pytest.raises(ValueError, match="no pretrained weights exist"):
        timm.create_model(name, pretrained=True)


@pytest.mark.parametrize("name", IVIT + DEIT)
def test_forward_and_grad_checkpointing(name):
    # timm's test_model_forward at its target size (384 caps 224), then set_grad_checkpointing
    model = timm.create_model(name).eval()
    x = torch.randn(1, *_input_size(model, 384))
    y = model(x)
    assert y.shape == (1, 1000) and not y.isnan().any()
    model.set_grad_checkpointing()
    torch.testing.assert_close(model(x), y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", IVIT + DEIT)
def test_backward_every_parameter(name):
    # timm's test_model_backward: at target 128 the minimum input size, num_classes=42, train mode
    model = timm.create_model(name, num_classes=42).train()
    x = torch.randn(2, *_input_size(model, 128))
    y = model(x)
    y.mean().backward()
    assert y.shape == (2, 42) and not y.isnan().any()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", IVIT)
def test_default_cfg_hierarchical(name):
    # timm's test_model_default_cfgs, for models with an NCHW map: pool_size, widths, pooling removal
    model = timm.create_model(name).eval()
    cfg = model.default_cfg
    assert model.num_classes == 1000 and model.num_features > 0 and model.head_hidden_size > 0
    x = torch.randn(1, *cfg["input_size"])
    f = model.forward_features(x)
    pre = model.forward_head(f, pre_logits=True)
    assert tuple(f.shape[2:]) == cfg["pool_size"] and f.shape[1] == model.num_features
    assert pre.shape[1] == model.head_hidden_size
    model.reset_classifier(0)
    assert model.num_classes == 0 and model(x).shape == pre.shape
    model.reset_classifier(0, "")
    assert tuple(model(x).shape[2:]) == cfg["pool_size"]
    unpooled = timm.create_model(name, num_classes=0, global_pool="").eval()
    assert unpooled(x).ndim == 4 and tuple(unpooled(x).shape[2:]) == cfg["pool_size"]
    state = model.state_dict()
    assert cfg["first_conv"] + ".weight" in state and timm.create_model(name).default_cfg["classifier"] == "head"


@pytest.mark.parametrize("name", DEIT)
def test_default_cfg_plain_vit(name):
    # timm's test_model_default_cfgs_non_std (a token sequence instead of a map)
    model = timm.create_model(name).eval()
    x = torch.randn(1, *_input_size(model, 320))
    f = model.forward_features(x)
    pre = model.forward_head(f, pre_logits=True)
    assert f.shape[-1] == model.num_features and pre.shape[1] == model.head_hidden_size
    model.reset_classifier(0)
    assert model.num_classes == 0 and model(x).shape == pre.shape
    assert timm.create_model(name, num_classes=0).eval()(x).shape[-1] == model.num_features
    state = model.state_dict()
    assert model.default_cfg["first_conv"] + ".weight" in state
    assert model.default_cfg["classifier"] + ".weight" in timm.create_model(name).state_dict()


def _check_levels(outputs, info, size, batch=1):
    assert len(outputs) == len(info.channels())
    for c, r, o in zip(info.channels(), info.reduction(), outputs):
        assert o.shape[0] == batch and o.shape[1] == c and not o.isnan().any()
        assert o.shape[2] <= math.ceil(size[0] / r) + 1 and o.shape[3] <= math.ceil(size[1] / r) + 1


@pytest.mark.parametrize("name", IVIT + DEIT)
@pytest.mark.parametrize("feature_cls", [None, "getter"])
def test_features_only(name, feature_cls):
    # timm's test_model_forward_features and test_model_forward_intermediates_features (target 96)
    kw = {} if feature_cls is None else dict(feature_cls=feature_cls)
    model = timm.create_model(name, features_only=True, **kw).eval()
    assert len(model.feature_info.channels()) >= 3 and model.default_cfg["architecture"] == name
    size = _input_size(model, 96)
    outputs = model(torch.randn(1, *size))
    _check_levels(outputs, model.feature_info, size[1:])


@pytest.mark.parametrize("name", IVIT + DEIT)
def test_forward_intermediates(name):
    # timm's test_model_forward_intermediates, on the classifier
    model = timm.create_model(name).eval()
    info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    assert len(info.channels()) >= 3
    size = _input_size(model, 96)
    x = torch.randn(1, *size)
    final, inter = model.forward_intermediates(x, output_fmt="NCHW")
    _check_levels(inter, info, size[1:])
    assert torch.allclose(final, model.forward_features(x))
    model.set_grad_checkpointing()
    again, _ = model.forward_intermediates(x, output_fmt="NCHW")
    torch.testing.assert_close(again, final, rtol=1e-4, atol=1e-5)


def _fx_model(model, train):
    """timm's _create_fx_model: torchvision's feature extractor with timm's leaf modules and functions."""
    fx = pytest.importorskip("torchvision.models.feature_extraction")
    tracer_kwargs = dict(leaf_modules=timm.models.get_notrace_modules(),
                         autowrap_functions=timm.models.get_notrace_functions(), param_shapes_constant=True)
    train_nodes, eval_nodes = fx.get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    train_return = [train_nodes[-1]]
    if train:
        graph = fx.NodePathTracer(**tracer_kwargs).trace(model)
        nodes = list(reversed(graph.nodes))
        names = [n.name for n in nodes]
        train_return = [train_nodes[-names.index(n.name)] for n in nodes[0]._input_nodes]
    return fx.create_feature_extractor(model, train_return_nodes=train_return, eval_return_nodes=[eval_nodes[-1]],
                                      tracer_kwargs=tracer_kwargs)


@pytest.mark.parametrize("name", IVIT + DEIT)
def test_fx_forward_and_backward(name):
    # timm's test_model_forward_fx / test_model_backward_fx (on the small configurations, to keep CI short)
    model = timm.create_model(name, num_classes=42, **SMALL[name]).eval()
    x = torch.randn(1, *_input_size(model, 128))
    with torch.inference_mode():
        want = model(x)
        got = torch.cat(tuple(_fx_model(model, train=False)(x).values()))
    assert torch.equal(got, want)
    model.train()
    traced = _fx_model(model, train=True)
    y = torch.cat(tuple(traced(torch.randn(2, *_input_size(model, 128))).values()))
    y.mean().backward()
    assert y.shape[-1] == 42 and all(p.grad is not None for p in traced.parameters())


@pytest.mark.parametrize("name", ["ivit_tiny", "deit_imhsa_tiny"])
def test_layer_decay_keeps_each_block_in_one_group(name):
    # timm's --layer-decay: param_groups_layer_decay through the model's group_matcher
    model = timm.create_model(name, num_classes=3, **SMALL[name])
    groups = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, layer_decay=0.5).param_groups
    where = {id(p): i for i, g in enumerate(groups) for p in g["params"]}
    names = dict(model.named_parameters())
    block_of = {}
    for n, p in names.items():
        parts = n.split(".")
        # a block (stages.s.blocks.i / blocks.i), a stage's downsample or norm, or a top-level module
        block = ".".join(parts[:4] if parts[0] == "stages" and parts[2] == "blocks" else parts[:3]
                         if parts[0] == "stages" else parts[:2] if parts[0] == "blocks" else parts[:1])
        block_of.setdefault(block, set()).add(groups[where[id(p)]]["lr_scale"])
    assert all(len(scales) == 1 for scales in block_of.values()), block_of
    scales = [next(iter(block_of[b])) for b in block_of if ".blocks." in b or b.startswith("blocks.")]
    assert scales == sorted(scales) and len(set(scales)) == len(scales)  # deeper blocks, larger lr
    for s in range(1, 4) if name in IVIT else ():  # a stage's downsampling goes with its first block
        assert block_of[f"stages.{s}.downsample"] == block_of[f"stages.{s}.blocks.0"]
    stem = "stem" if name in IVIT else "patch_embed"
    assert block_of[stem] == {min(g["lr_scale"] for g in groups)} and block_of["head"] == {1.0}


@pytest.mark.parametrize("name", ["ivit_small", "deit_imhsa_small"])
def test_data_config_and_cfg_overlay(name):
    model = timm.create_model(name, pretrained_cfg_overlay=dict(input_size=(3, 256, 256), crop_pct=1.0))
    data = timm.data.resolve_data_config(model=model)
    assert data["input_size"] == (3, 256, 256) and data["crop_pct"] == 1.0 and data["interpolation"] == "bicubic"
    assert timm.data.resolve_model_data_config(timm.create_model(name, in_chans=1))["input_size"] == (1, 224, 224)


def test_hugging_face_timm_backbone():
    transformers = pytest.importorskip("transformers", reason="Hugging Face transformers is not installed")
    from transformers import TimmBackbone, TimmBackboneConfig
    for name, levels in (("ivit_tiny", 4), ("deit_imhsa_tiny", 3)):
        backbone = TimmBackbone(TimmBackboneConfig(backbone=name), **SMALL[name]).eval()  # out_indices (-1,)
        x = torch.randn(1, 3, 64, 64)
        out = backbone(x, output_hidden_states=True)
        assert len(out.feature_maps) == 1 and len(out.hidden_states) == levels
        assert out.feature_maps[0].shape[1] == backbone.num_features[-1]
        assert torch.equal(out.feature_maps[0], out.hidden_states[-1])
        assert torch.equal(backbone(x).feature_maps[0], out.feature_maps[0])
        picked = TimmBackbone(TimmBackboneConfig(backbone=name, out_indices=(1, 2)), **SMALL[name]).eval()
        assert [f.shape[1] for f in picked(x).feature_maps] == [backbone.num_features[i] for i in (1, 2)]
    assert transformers.__version__
