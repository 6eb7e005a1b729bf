"""Smoke test of the benchmark suite: the quick mode on a tiny sweep writes a JSON and a markdown
report that parse, and every contender has a figure or a reason at every point."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import contenders, costs, report, timing  # noqa: E402
from bench.config import Config  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, "-m", "bench", "--quick", "--grids", "8", "--threads", "1", "--min-reps", "2",
           "--max-reps", "3", "--budget", "0", "--no-progress", "--out", str(out), "--tag", "smoke"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out, proc.stdout


def test_quick_outputs_parse(quick_run):
    out, stdout = quick_run
    results = json.loads((out / "smoke.json").read_text())
    md = (out / "smoke.md").read_text()
    assert results["machine"]["torch"] and results["machine"]["crosshead_backend"]
    assert "copy_bandwidth_Bps" in results["roofline"] and results["roofline"]["matmul_flops"] > 0
    assert md.startswith("# crosshead benchmark") and "## Points without a figure" in md
    for line in md.splitlines():  # every markdown table row has as many cells as its header
        assert not line.startswith("|") or line.count("|") >= 3
    assert (out / "smoke-time.png").stat().st_size > 0 and (out / "smoke-memory.png").stat().st_size > 0
    assert "imhsa-torch" in stdout
    # the pure-torch path against the obvious version and torch.compile, both passes
    assert "## The pure-torch path against the obvious version and torch.compile" in md
    assert {r["pass"] for r in results["pure_torch"]} == set(results["config"]["passes"])
    assert all(r["naive_ratio"] > 0 for r in results["pure_torch"])


def test_every_contender_has_a_figure_or_a_reason(quick_run):
    out, _ = quick_run
    results = json.loads((out / "smoke.json").read_text())
    records = results["records"]
    cfg = results["config"]
    assert {r["contender"] for r in records} == set(contenders.names())
    assert len(records) == len(contenders.names()) * len(cfg["grids"]) * len(cfg["passes"])
    for r in records:
        if r["status"] == "ok":
            assert r["median_s"] > 0 and r["p20_s"] <= r["median_s"] <= r["p80_s"], r
            assert r["peak_bytes"] >= 0 and r["reps"] >= 2, r
        else:
            assert r["status"] in ("unavailable", "skipped", "failed") and r["reason"], r
    ok = {r["contender"] for r in records if r["status"] == "ok"}
    # always runnable on a CPU with crosshead and torch alone
    assert {"imhsa-torch", "sdpa-math", "imhsa-module", "mhsa-sdpa-module"} <= ok
    by_name = {r["contender"]: r for r in records}
    assert "CUDA" in by_name["imhsa-cuda"]["reason"] or by_name["imhsa-cuda"]["status"] == "ok"


def test_comparison_and_costs():
    cfg = Config()
    f_imhsa, b_imhsa = costs.cost(cfg, 16384, ("op", "imhsa"), "fwd")
    f_math, b_math = costs.cost(cfg, 16384, ("op", "sdpa_math"), "fwd")
    assert f_imhsa < f_math / 50 and b_imhsa < b_math / 100
    rec = [{"contender": c, "pass": "fwd", "n": 16384, "status": "ok", "median_s": t, "peak_bytes": m}
           for c, t, m in (("imhsa-torch", 0.1, 10), ("sdpa-math", 2.0, 1000))]
    (comp,) = report.comparison(rec)
    assert comp["time_ratio"] == pytest.approx(20) and comp["memory_ratio"] == pytest.approx(100)
    assert comp["imhsa_faster"] and comp["imhsa_less_memory"]


def test_pure_torch_table():
    rec = [{"contender": c, "pass": p, "n": 16384, "status": "ok", "median_s": t, "peak_bytes": 1}
           for c, p, t in (("imhsa-torch", "fwd", 0.1), ("imhsa-naive", "fwd", 0.15),
                           ("imhsa-torch-compile", "fwd", 0.05), ("imhsa-torch", "fwdbwd", 0.2),
                           ("imhsa-naive", "fwdbwd", 0.3))]
    rec.append({"contender": "imhsa-torch-compile", "pass": "fwdbwd", "n": 16384, "status": "failed"})
    fwd, fwdbwd = report.pure_torch(rec)
    assert fwd["naive_ratio"] == pytest.approx(1.5) and fwd["compile_ratio"] == pytest.approx(0.5)
    assert fwdbwd["naive_ratio"] == pytest.approx(1.5) and fwdbwd["compile_ratio"] is None
    md = "\n".join(report._pure_torch_section([fwd, fwdbwd]))
    assert "| fwd | 16384 | 100 | 150 | **1.50** | 50 | **0.50** |" in md
    assert "| fwdbwd | 16384 | 200 | 300 | **1.50** | - | - |" in md


def test_rounds_report_the_median_round():
    from bench import run

    def rec(status, t=None, name="imhsa-torch"):
        r = {"contender": name, "pass": "fwd", "n": 196, "status": status}
        return {**r, "median_s": t, "p20_s": t, "p80_s": t} if status == "ok" else {**r, "reason": "x"}
    rounds = [[rec("ok", 3.0), rec("failed", name="b")], [rec("ok", 1.0), rec("failed", name="b")],
              [rec("failed"), rec("failed", name="b")], [rec("ok", 2.0), rec("failed", name="b")]]
    merged, failed = run.merge_rounds(rounds)
    assert merged["median_s"] == 2.0 and merged["round_medians_s"] == [3.0, 1.0, None, 2.0]
    assert failed["status"] == "failed" and "round_medians_s" not in failed
    assert run.merge_rounds(rounds[:1]) == rounds[0]


def test_cpu_clock_leaves_out_time_off_the_core():
    """--clock cpu times the thread's CPU time: a call that sleeps costs (almost) nothing."""
    import time

    def nap():
        time.sleep(0.01)
    wall = timing.measure(nap, device="cpu", warmup=1, min_reps=3, max_reps=3, budget_s=0)
    cpu = timing.measure(nap, device="cpu", warmup=1, min_reps=3, max_reps=3, budget_s=0, clock="cpu")
    assert wall["median_s"] >= 0.009 and cpu["median_s"] < 0.003
    from bench import run
    with pytest.raises(SystemExit, match="--threads 1"):
        run.make_config(run.parse_args(["--device", "cpu", "--threads", "2", "--clock", "cpu"]))
    assert run.make_config(run.parse_args(["--device", "cpu", "--threads", "1", "--clock", "cpu"])).clock == "cpu"


@pytest.mark.parametrize("mix", ["post", "pre"])
@pytest.mark.parametrize("interaction", [True, False], ids=["w", "no_w"])
def test_naive_contender_computes_crosshead_imhsa(mix, interaction):
    """imhsa-naive (bench) is the same op as crosshead.imhsa: forward and gradients agree in float64
    and in float32, each within twice the op's rounding bound (tests/error_bounds.py: both are
    computations of the same exact values, the naive one through a subset of the same sums)."""
    import crosshead
    import error_bounds
    from bench.imhsa_cases import naive_imhsa
    from helpers import imhsa_inputs

    B, h, N, d, L, scale = 2, 3, 64, 8, 16, 0.4
    inputs = imhsa_inputs(B, h, N, d, L, dtype=torch.float64, interaction=interaction, requires_grad=True)
    g = torch.randn(B, h, N, d, dtype=torch.float64)
    for dtype in (torch.float64, torch.float32):
        x = [None if t is None else t.detach().to(dtype).requires_grad_() for t in inputs]
        x2 = [None if t is None else t.detach().requires_grad_() for t in x]
        ours = crosshead.imhsa(*x, mix=mix, scale=scale)
        ours.backward(g.to(dtype))
        naive = naive_imhsa(*x2, mix=mix, scale=scale)
        naive.backward(g.to(dtype))
        error_bounds.assert_imhsa_within(x, ours, g.to(dtype), naive.detach(),
                                         [None if t is None else t.grad for t in x2], mix, scale,
                                         slack=2)


def test_timing_summary():
    s = timing.summary([3.0, 1.0, 2.0, 4.0, 5.0])
    assert s["median_s"] == 3.0 and s["p20_s"] == pytest.approx(1.8) and s["p80_s"] == pytest.approx(4.2)


def test_every_baseline_runs_by_name(tmp_path):
    """issue: the benchmark suite can run every crosshead.baselines entry by name, sized for each N
    (with create's defaults linformer fails at any N but 196 and rpe_linear beyond 14 x 14)."""
    from crosshead import baselines

    usable = [n for n, why in baselines.available().items() if why is None]
    cmd = [sys.executable, "-m", "bench", "--device", "cpu", "--grids", "8,16", "--threads", "1",
           "--with-baselines", "--contenders", "imhsa-torch", "--passes", "fwd", "--min-reps", "1",
           "--max-reps", "1", "--budget", "0", "--no-plots", "--no-progress", "--out", str(tmp_path),
           "--tag", "baselines"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    records = json.loads((tmp_path / "baselines.json").read_text())["records"]
    status = {(r["contender"], r["n"]): r for r in records}
    for name in baselines.names():
        for n in (64, 256):
            r = status[(f"baselines/{name}", n)]
            if name in usable:
                assert r["status"] == "ok" and r["median_s"] > 0, r
            else:
                assert r["status"] == "unavailable" and r["reason"], r


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_nystrom_peer_runs_in_half_dtypes(dtype):
    """nystrom_attention builds float32 tensors inside its forward, so in bf16 it failed every GPU
    point of the H200 sweep (issue #10); the peer now keeps float32 weights under autocast."""
    pytest.importorskip("nystrom_attention", reason="the nystrom-attention package is not installed")
    c = contenders.get("nystrom")
    cfg = Config(device="cpu", dtype=dtype, batch=1, heads=2, head_dim=8)
    case = c.build(cfg, 7)
    out = case.forward()
    assert out.dtype == getattr(torch, dtype) and out.shape == (1, 49, 16) and torch.isfinite(out).all()
    out.float().backward(torch.randn(out.shape))
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in case.leaves)
