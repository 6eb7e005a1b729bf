"""crosshead.baselines: efficient attentions iMHSA is compared against, behind one interface.

    from crosshead import baselines
    attn = baselines.create("performer", dim=384, num_heads=6, num_prefix_tokens=1)
    y = attn(x, grid=(14, 14))          # x (B, 1 + 14*14, 384) -> (B, 197, 384)

``create_for(name, dim, num_heads, grid=(H, W), num_prefix_tokens=1)`` adds the options that depend
on the input size (linformer's length, rpe_linear's table, mra2's blocks per row).
``names()`` lists every registered mechanism, ``available()`` says which can be built here (the
package-backed ones need ``pip install crosshead[baselines]``). Optional extra: the core package
never imports this one. See docs/baselines.md for the table of papers, defaults and checks.
"""

from ._registry import available, create, names, register
from ._sizing import create_for, sized_options

# one file per mechanism family; importing them fills the registry (no optional package is
# imported here -- package-backed modules import their package when built)
from . import softmax, talking_heads  # noqa: E402,F401
from . import performer, nystrom, linformer  # noqa: E402,F401
from . import randomized, mra, ripple, rpe_linear, vars_d, hypercube  # noqa: E402,F401
from . import flash_gau, context_pool  # noqa: E402,F401

__all__ = ["create", "create_for", "sized_options", "available", "names", "register"]
