"""The pretrained configurations (timm's ``pretrained_cfg``) of the model zoo, and how a model's is chosen.

No weights exist for these models: the configurations describe inputs (size, normalisation, crop,
interpolation), the unpooled output (``pool_size``) and parameter names (``first_conv``,
``classifier``), so that timm can size and preprocess inputs (``resolve_data_config``,
``get_pretrained_cfg_value``) and its tests can check the model against them. A model's own
``pretrained_cfg`` also records its ``num_classes`` and input channels.
"""

from __future__ import annotations

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# the fields of timm's PretrainedCfg (timm/models/_pretrained.py): an overlay may set only these
FIELDS = frozenset((
    "url", "file", "state_dict", "hf_hub_id", "hf_hub_filename", "source", "architecture", "tag", "custom_load",
    "input_size", "test_input_size", "min_input_size", "fixed_input_size", "interpolation", "crop_pct",
    "test_crop_pct", "crop_mode", "mean", "std", "num_classes", "label_offset", "label_names",
    "label_descriptions", "pool_size", "test_pool_size", "first_conv", "classifier", "license", "description",
    "origin_url", "paper_name", "paper_ids", "notes"))
_WEIGHT_SOURCES = ("url", "file", "state_dict", "hf_hub_id")


def _cfg(**kwargs) -> dict:
    return dict(input_size=(3, 224, 224), fixed_input_size=False, interpolation="bicubic", mean=IMAGENET_MEAN,
                std=IMAGENET_STD, num_classes=1000, classifier="head", license="bsd-3-clause",
                paper_name="Interactive Multi-Head Self-Attention with Linear Complexity",
                paper_ids="arXiv:2402.17507", notes=("no pretrained weights exist",), **kwargs)


def _ivit(**kwargs) -> dict:
    # the last stage is stride 32, so 224² gives a 7×7 map; sides must be multiples of 32
    return _cfg(pool_size=(7, 7), min_input_size=(3, 32, 32), crop_pct=0.9, first_conv="stem.0", **kwargs)


def _deit(**kwargs) -> dict:
    return _cfg(min_input_size=(3, 16, 16), crop_pct=0.875, first_conv="patch_embed.proj", **kwargs)


DEFAULT_CFGS = {
    "ivit_tiny": _ivit(), "ivit_small": _ivit(), "ivit_base": _ivit(),
    "deit_imhsa_tiny": _deit(), "deit_imhsa_small": _deit(),
}


def _as_dict(name: str, value) -> dict:
    if hasattr(value, "to_dict"):  # timm's PretrainedCfg
        return dict(value.to_dict(remove_source=False, remove_null=False))
    if isinstance(value, dict):
        return dict(value)
    raise ValueError(f"{name}: pretrained_cfg must be None, a tag string, a dict or a timm PretrainedCfg, "
                     f"got {type(value).__name__}")


def resolve(name: str, pretrained_cfg=None, overlay: dict | None = None) -> dict:
    """The configuration of model ``name``: its default, or ``pretrained_cfg`` in its place (a dict or a
    timm PretrainedCfg; a string is a tag, and these models have only the empty one), then ``overlay``
    (``pretrained_cfg_overlay``) on top. Unknown keys are refused, naming them."""
    cfg = dict(DEFAULT_CFGS[name])
    if isinstance(pretrained_cfg, str):
        if pretrained_cfg not in ("", name):
            raise ValueError(f"{name}: unknown pretrained tag {pretrained_cfg!r}; crosshead models have no "
                             "pretrained weights and one untagged configuration")
    elif pretrained_cfg is not None:
        cfg = {k: v for k, v in _as_dict(name, pretrained_cfg).items() if v is not None}
    if overlay is not None:
        if not isinstance(overlay, dict):
            raise ValueError(f"{name}: pretrained_cfg_overlay must be a dict, got {type(overlay).__name__}")
        cfg.update(overlay)
    unknown = sorted(set(cfg) - FIELDS)
    if unknown:
        raise ValueError(f"{name}: pretrained cfg keys {unknown} are not pretrained-cfg fields (timm's PretrainedCfg)")
    cfg["architecture"] = name
    return cfg


def refuse_pretrained(name: str, cfg: dict) -> None:
    sources = [k for k in _WEIGHT_SOURCES if cfg.get(k)]
    hint = (f" (the configuration names {sources}, but loading them is not supported: build with "
            "pretrained=False and call model.load_state_dict(torch.load(path)))") if sources else (
        "; to start from your own weights, build with pretrained=False and call model.load_state_dict")
    raise ValueError(f"{name}: no pretrained weights exist for crosshead models (pretrained=True){hint}")
