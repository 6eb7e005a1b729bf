"""One registry of everything the benchmark compares: name → how to build one timed call, why it
cannot run here (or None), and what it costs (bench/costs.py).

Two levels, both with matched (B, h, N, d):
- "op": the attention op alone on (B, h, N, d) tensors q, k, v (crosshead's landmarks + imhsa,
  its obvious version and its compiled version, from bench/imhsa_cases.py; and
  scaled_dot_product_attention with each backend);
- "module": an attention layer x (B, N, h·d) → (B, N, h·d) with its qkv and output projections
  (crosshead's InteractiveMultiheadAttention, a plain softmax MHSA layer, and the peers from their
  own packages: timm's Talking-Heads, performer-pytorch, nystrom-attention, linformer).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .cases import Case, _dtype, _gen, _qkv, _randn
from .config import Config
from .imhsa_cases import (_imhsa_case, _imhsa_torch_path, _naive_case, _why_not_compile,
                          _why_not_fused)


@dataclass
class Contender:
    name: str
    level: str  # "op" or "module"
    what: str  # one line: what exactly runs
    cost_kind: tuple | None  # key for bench.costs.cost; None: no cost model (no roofline)
    build: Callable[[Config, int], Case]
    why_not: Callable[[Config], str | None]
    # N×N maps (B·h·N² float32 each) held at the peak of a forward and of a forward+backward,
    # for the pre-flight memory check; 0 for contenders linear in N
    maps: tuple[float, float] = (0.0, 0.0)
    options: dict = field(default_factory=dict)


def _missing(module: str, package: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return f"package {package!r} is not installed (pip install {package})"
    return None


# ---------------------------------------------------------------------------------- crosshead op


# ------------------------------------------------------------------------------------------ SDPA


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend
    return {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION}[name]


def _sdpa_case(cfg: Config, side: int, backend: str) -> Case:
    from torch.nn.attention import sdpa_kernel
    q, k, v, g = _qkv(cfg, side)
    be = _sdpa_backend(backend)

    def forward():
        with sdpa_kernel([be]):
            return F.scaled_dot_product_attention(q, k, v)
    return Case(forward, [q, k, v], g)


def _why_not_sdpa(backend: str):
    def why(cfg: Config) -> str | None:
        if backend in ("efficient", "cudnn") and cfg.device != "cuda":
            return f"the {backend} SDPA backend exists only on CUDA (this run is on CPU)"
        if cfg.device == "cuda" and not torch.cuda.is_available():
            return "no CUDA GPU is visible to torch"
        import warnings
        from torch.nn.attention import sdpa_kernel
        x = torch.randn(1, 2, 64, cfg.head_dim, device=cfg.device, dtype=_dtype(cfg), requires_grad=True)
        try:
            with warnings.catch_warnings(record=True) as caught, sdpa_kernel([_sdpa_backend(backend)]):
                warnings.simplefilter("always")
                F.scaled_dot_product_attention(x, x, x).sum().backward()
        except RuntimeError as e:
            detail = "; ".join(str(w.message).splitlines()[0] for w in caught)
            return f"SDPA {backend} backend cannot run {cfg.dtype} d={cfg.head_dim} here: " + (
                detail or str(e).splitlines()[0])
        return None
    return why


# -------------------------------------------------------------------------------------- modules


class SoftmaxMHSA(nn.Module):
    """The plain softmax attention layer of a timm ViT (qkv Linear → SDPA, default dispatch →
    proj Linear), written out so the module-level comparison has a softmax row with no timm."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.h = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.h, C // self.h).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))


def _module_case(cfg: Config, side: int, make: Callable[[Config, int], nn.Module],
                 call=None, autocast: bool = False) -> Case:
    """autocast: in a half dtype the module keeps float32 parameters and runs under torch.autocast
    (for packages that build float32 tensors inside their forward and so cannot run in pure bf16)."""
    torch.manual_seed(0)
    n = side * side
    dtype = _dtype(cfg)
    amp = autocast and dtype in (torch.float16, torch.bfloat16)
    module = make(cfg, n).to(device=cfg.device, dtype=torch.float32 if amp else dtype)
    gen = _gen(cfg, side)
    x = _randn(cfg, cfg.batch, n, cfg.dim, gen=gen)
    g = _randn(cfg, cfg.batch, n, cfg.dim, gen=gen, requires_grad=False)

    def run():
        return module(x) if call is None else call(module, x, (side, side))

    if amp:
        def forward():
            with torch.autocast(device_type=torch.device(cfg.device).type, dtype=dtype):
                return run()
    else:
        forward = run
    return Case(forward, [x, *module.parameters()], g)


def _make_imhsa_module(cfg, n):
    from crosshead.nn import InteractiveMultiheadAttention
    return InteractiveMultiheadAttention(cfg.dim, cfg.heads, landmarks=cfg.landmarks, mix=cfg.mix)


def _make_talking_heads(cfg, n):
    from timm.models.cait import TalkingHeadAttn
    return TalkingHeadAttn(cfg.dim, num_heads=cfg.heads)


def _make_performer(cfg, n):
    from performer_pytorch import SelfAttention
    return SelfAttention(dim=cfg.dim, heads=cfg.heads, dim_head=cfg.head_dim,
                         nb_features=cfg.performer_features or None)


def _make_nystrom(cfg, n):
    from nystrom_attention import NystromAttention
    return NystromAttention(dim=cfg.dim, dim_head=cfg.head_dim, heads=cfg.heads,
                            num_landmarks=cfg.nystrom_landmarks or cfg.num_landmarks)


def _make_linformer(cfg, n):
    from linformer import LinformerSelfAttention
    return LinformerSelfAttention(dim=cfg.dim, seq_len=n, k=cfg.linformer_k, heads=cfg.heads,
                                  dim_head=cfg.head_dim)


def _why_not_timm(cfg: Config) -> str | None:
    reason = _missing("timm", "timm")
    if reason:
        return reason
    try:
        importlib.import_module("timm.models.cait")
    except Exception as e:  # noqa: BLE001  (timm without torchvision, a version mismatch, ...)
        return f"timm is installed but cannot be imported here: {type(e).__name__}: {e}"
    return None


def _always(cfg: Config) -> None:
    return None


# ------------------------------------------------------------------------------------- registry


def _registry() -> dict[str, Contender]:
    L = "L={L}"
    items = [
        Contender("imhsa-cuda", "op", "crosshead landmarks + imhsa, fused CUDA kernels",
                  ("op", "imhsa"), lambda c, s: _imhsa_case(c, s, "api"), _why_not_fused),
        Contender("imhsa-torch", "op", f"crosshead landmarks + imhsa, pure-torch path ({L})",
                  ("op", "imhsa"), lambda c, s: _imhsa_case(c, s, _imhsa_torch_path(c)), _always),
        Contender("imhsa-naive", "op",
                  "crosshead landmarks + imhsa written the obvious way: softmax, einsum mixing, @, autograd",
                  ("op", "imhsa"), _naive_case, _always),
        Contender("imhsa-torch-compile", "op",
                  "crosshead.reference landmarks + imhsa under torch.compile (inductor autograd)",
                  ("op", "imhsa"), lambda c, s: _imhsa_case(c, s, "compile"), _why_not_compile),
    ]
    for be, maps in (("math", (2.5, 3.5)), ("flash", (0, 0)), ("efficient", (0, 0)), ("cudnn", (0, 0))):
        items.append(Contender(
            f"sdpa-{be}", "op", f"F.scaled_dot_product_attention, {be} backend", ("op", f"sdpa_{be}"),
            (lambda b: lambda c, s: _sdpa_case(c, s, b))(be), _why_not_sdpa(be), maps))
    items += [
        Contender("imhsa-module", "module",
                  f"crosshead.nn.InteractiveMultiheadAttention ({L}, learned w_q, w_k)",
                  ("module", "imhsa"),
                  lambda c, s: _module_case(c, s, _make_imhsa_module, lambda m, x, grid: m(x, grid)),
                  _always),
        Contender("mhsa-sdpa-module", "module", "softmax MHSA layer (qkv → SDPA default dispatch → proj)",
                  ("module", "sdpa"), lambda c, s: _module_case(c, s, lambda c, n: SoftmaxMHSA(c.dim, c.heads)),
                  _always, (0.0, 0.0)),
        Contender("talking-heads", "module", "timm.models.cait.TalkingHeadAttn (quadratic cross-head)",
                  ("module", "talking_heads"), lambda c, s: _module_case(c, s, _make_talking_heads),
                  _why_not_timm, (4.0, 9.0)),
        Contender("performer", "module", "performer_pytorch.SelfAttention (FAVOR+, m={m_perf})",
                  ("module", "performer"), lambda c, s: _module_case(c, s, _make_performer),
                  lambda c: _missing("performer_pytorch", "performer-pytorch")),
        Contender("nystrom", "module",
                  "nystrom_attention.NystromAttention (m={m_nys}, 6 pinv iterations; in half dtypes float32 "
                  "weights under autocast: the package builds float32 tensors inside)",
                  ("module", "nystrom"), lambda c, s: _module_case(c, s, _make_nystrom, autocast=True),
                  lambda c: _missing("nystrom_attention", "nystrom-attention")),
        Contender("linformer", "module", "linformer.LinformerSelfAttention (k={k_lin}, E, F sized to N)",
                  ("module", "linformer"), lambda c, s: _module_case(c, s, _make_linformer),
                  lambda c: _missing("linformer", "linformer")),
    ]
    return {c.name: c for c in items}


CONTENDERS = _registry()


def describe(c: Contender, cfg: Config) -> str:
    from .costs import _performer_default
    return c.what.format(L=cfg.num_landmarks, m_perf=cfg.performer_features or _performer_default(cfg.head_dim),
                         m_nys=cfg.nystrom_landmarks or cfg.num_landmarks, k_lin=cfg.linformer_k)


def names() -> list[str]:
    return list(CONTENDERS)


def baseline_contenders() -> dict[str, Contender]:
    """Optional extra rows from crosshead.baselines (module level), if that package imports."""
    try:
        from crosshead import baselines
    except Exception:  # noqa: BLE001
        return {}
    out = {}
    for name in baselines.names():
        def build(cfg, side, name=name):
            # sized for this N (linformer's length, rpe_linear's table, mra2's blocks per row)
            return _module_case(cfg, side,
                                lambda c, n: baselines.create_for(name, c.dim, c.heads,
                                                                  grid=(side, side)),
                                lambda m, x, grid: m(x, grid=grid))

        def why(cfg, name=name):
            return None if name in baselines.available() else f"crosshead.baselines says {name!r} is not available here"
        out[f"baselines/{name}"] = Contender(f"baselines/{name}", "module",
                                             f"crosshead.baselines.create_for({name!r}, grid=(side, side))", None,
                                             build, why)
    return out


def get(name: str) -> Contender:
    if name in CONTENDERS:
        return CONTENDERS[name]
    if name.startswith("baselines/"):
        extra = baseline_contenders()
        if name in extra:
            return extra[name]
    raise KeyError(f"unknown contender {name!r}; known: {', '.join(CONTENDERS)} and baselines/<name>")
