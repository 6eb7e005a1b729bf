"""Parameter counts and FLOPs of the model zoo: ``python -m crosshead.models.profile [--res 224 ...]``.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per multiply-add; matmuls,
convolutions and SDPA only: no elementwise, norm or softmax work). FlopCounterMode knows no formula
for the custom op ``crosshead::imhsa``, so it is given one here from imhsa.md's cost section
(:func:`crosshead.models.attention.imhsa_flops`); landmark pooling is not counted. Nor does it
count SDPA's CPU kernel, which gets the usual 4·B·h·N²·d here.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from .attention import imhsa_flops
from .zoo import create_model, list_models


def _sdpa_cpu_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """SDPA's CPU kernel (no built-in formula): QKᵀ and AV, 2·B·h·N·M·d MACs."""
    B, h, N, d = q_shape
    return 4 * B * h * N * k_shape[2] * d


def _custom_mapping() -> dict:
    mapping = {torch.ops.crosshead.imhsa: imhsa_flops}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:
        mapping[cpu_sdpa] = _sdpa_cpu_flops
    return mapping


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops(model: torch.nn.Module, res: int, in_chans: int = 3) -> int:
    """Forward FLOPs (2·MACs) for one image at res×res."""
    model.eval()
    x = torch.zeros(1, in_chans, res, res)
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_custom_mapping()) as fc:
        model(x)
    return fc.get_total_flops()


def table(names, resolutions, attns=("imhsa_post",)) -> str:
    rows = ["| model | attn | params (M) | " + " | ".join(f"GFLOPs @{r}" for r in resolutions) + " |",
            "| --- | --- | ---: | " + " | ".join("---:" for _ in resolutions) + " |"]
    for name in names:
        for attn in attns:
            own = name in list_models()
            if not own and attn != attns[0]:
                continue
            kw = {"attn": attn} if own else {"dynamic_img_size": True}  # timm ViTs: any resolution
            m = create_model(name, num_classes=1000, **kw)
            cells = [f"{flops(m, r) / 1e9:.2f}" for r in resolutions]
            rows.append(f"| {name} | {kw.get('attn', '(timm)')} | {params(m) / 1e6:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=list_models())
    ap.add_argument("--res", nargs="*", type=int, default=[224, 384])
    ap.add_argument("--attn", nargs="*", default=["imhsa_post"])
    a = ap.parse_args(argv)
    print(table(a.models, a.res, a.attn))


if __name__ == "__main__":
    main()
