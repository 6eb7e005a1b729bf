"""The README's main job (python -m crosshead.demo) runs and reports what it did."""

import subprocess
import sys
from pathlib import Path


def test_demo_runs_on_this_machine():
    proc = subprocess.run([sys.executable, "-m", "crosshead.demo", "--grid", "14", "--device", "cpu"], capture_output=True,
                          text=True, timeout=600, cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "operator library:" in out and "served by:" in out
    for mix in ("post", "pre"):
        line = next(l for l in out.splitlines() if l.startswith(f"mix={mix}:"))
        err = float(line.split("vs float64 pure-torch ")[1].split(",")[0])
        assert err < 1e-3, line
    assert "all gradients finite" in out
