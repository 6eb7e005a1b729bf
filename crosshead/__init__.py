"""crosshead: interactive multi-head self-attention (iMHSA) for PyTorch."""

from . import _library

_library.load()
_library.load_emulator()
_library.register_reference_kernels()

from . import _autograd, _fake, _vmap  # noqa: E402,F401  (registrations; need the ops defined first)
from . import nn  # noqa: E402
from .ops import imhsa, landmarks  # noqa: E402

__version__ = "0.1.0"
__all__ = ["imhsa", "landmarks", "nn", "__version__"]
