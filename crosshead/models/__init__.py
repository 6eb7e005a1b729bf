"""Vision backbones with iMHSA: the iViT family and DeiT-style plain ViTs.

``import crosshead.models`` registers ivit_tiny/small/base and deit_imhsa_tiny/small with timm when
timm is installed, so ``timm.create_model("ivit_tiny", num_classes=10)`` works; without timm use
:func:`create_model`. Every model takes ``attn=`` to swap the attention of its iMHSA blocks
(see :mod:`crosshead.models.attention`).
"""

from __future__ import annotations

from .attention import FX_LEAF_MODULES, OWN_NAMES as ATTENTIONS, build_attention
from .deit import DeiTFeatures, DeiTIMHSA
from .features import FeatureInfo
from .ivit import FeaturePyramid, IViT
from .zoo import (create_model, deit_imhsa_small, deit_imhsa_tiny, ivit_base, ivit_small, ivit_tiny,
                  list_models, register_with_timm)

TIMM_REGISTERED = register_with_timm()

__all__ = ["ATTENTIONS", "DeiTFeatures", "DeiTIMHSA", "FX_LEAF_MODULES", "FeatureInfo", "FeaturePyramid", "IViT",
           "build_attention", "create_model", "deit_imhsa_small", "deit_imhsa_tiny", "ivit_base", "ivit_small",
           "ivit_tiny", "list_models", "TIMM_REGISTERED"]
