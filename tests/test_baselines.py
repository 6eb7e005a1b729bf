"""Tests for crosshead.baselines: the interface and ViT-shape forward/backward on every device.
Mechanism checks: tests/test_baselines_mechanisms.py."""

import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", category=DeprecationWarning)

baselines = pytest.importorskip("crosshead.baselines", reason="crosshead.baselines not importable")

ALL = ["softmax", "talking_heads", "performer", "nystrom", "linformer", "ra", "lara", "mra2",
       "ripple", "rpe_linear", "vars_d", "hypercube", "flash_gau", "context_pool"]
PACKAGES = {"performer": "performer_pytorch", "nystrom": "nystrom_attention",
            "linformer": "linformer", "flash_gau": "flash_pytorch"}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))]


def need(name):
    if name in PACKAGES:
        pytest.importorskip(PACKAGES[name], reason=f"optional package for {name} not installed")


# ------------------------------------------------------------------------------ interface
def test_registry_lists_every_mechanism():
    assert baselines.names() == ALL
    av = baselines.available()
    assert set(av) == set(ALL)
    for name, reason in av.items():
        if name not in PACKAGES:
            assert reason is None, (name, reason)


def test_unknown_name_and_option():
    with pytest.raises(ValueError, match="performer"):
        baselines.create("no_such_attention", 64, 4)
    with pytest.raises(TypeError, match="num_landmark"):
        baselines.create("lara", 64, 4, num_landmark=49)
    with pytest.raises(ValueError, match="divisible"):
        baselines.create("softmax", 65, 4)


@pytest.mark.parametrize("name", ["ripple", "rpe_linear", "context_pool", "lara"])
def test_grid_inference_and_errors(name):
    m = baselines.create(name, 32, 2, num_prefix_tokens=1)
    assert m(torch.randn(1, 17, 32)).shape == (1, 17, 32)           # 16 = 4x4 inferred
    assert m(torch.randn(1, 13, 32), grid=(3, 4)).shape == (1, 13, 32)
    with pytest.raises(ValueError, match="grid"):
        m(torch.randn(1, 13, 32), grid=(4, 4))                       # mismatch
    if m.needs_grid:
        with pytest.raises(ValueError, match="grid=\\(H, W\\)"):
            m(torch.randn(1, 13, 32))                                # 12 is not a square
    with pytest.raises(ValueError, match="expected x of shape"):
        m(torch.randn(1, 17, 16))


def test_linformer_fixed_length():
    need("linformer")
    m = baselines.create("linformer", 32, 2, seq_len=20)
    assert m(torch.randn(1, 20, 32)).shape == (1, 20, 32)
    with pytest.raises(ValueError, match="seq_len=20"):
        m(torch.randn(1, 17, 32))


def test_imports_without_optional_packages_and_core_does_not_import_it():
    code = textwrap.dedent("""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split('.')[0] in {'performer_pytorch', 'nystrom_attention', 'linformer',
                                          'flash_pytorch'}:
                    raise ImportError('blocked ' + name)
        sys.meta_path.insert(0, Block())
        from crosshead import baselines
        av = baselines.available()
        assert av['performer'] and 'performer-pytorch' in av['performer'], av
        assert av['flash_gau'] and 'FLASH-pytorch' in av['flash_gau'], av
        assert av['softmax'] is None and av['ripple'] is None
        try:
            baselines.create('nystrom', 64, 4)
        except ImportError as e:
            assert 'pip install nystrom-attention' in str(e), e
        else:
            raise AssertionError('no ImportError')
        baselines.create('mra2', 64, 4)
        print('OK')
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-c", "import sys, crosshead; "
                        "print('crosshead.baselines' in sys.modules)"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip("core crosshead package does not import here: " + r.stderr[-300:])
    assert r.stdout.strip() == "False"


# ------------------------------------------------------------------ ViT forward / backward
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prefix", [0, 1])
@pytest.mark.parametrize("name", ALL)
def test_vit_shapes_forward_backward(name, prefix, device):
    need(name)
    torch.manual_seed(0)
    m = baselines.create(name, 192, 3, num_prefix_tokens=prefix).to(device).train()
    x = torch.randn(2, 196 + prefix, 192, device=device, requires_grad=True)
    y = m(x, grid=(14, 14))
    assert y.shape == x.shape and y.dtype == torch.float32
    assert torch.isfinite(y).all()
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    m.eval()
    with torch.no_grad():
        assert torch.isfinite(m(x, grid=(14, 14))).all()
