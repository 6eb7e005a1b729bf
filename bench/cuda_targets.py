"""The fused CUDA kernels against the targets of issue 3, all figures from one run on one GPU.

    python bench/cuda_targets.py [--out bench/results] [--mix post] [--n 196 784 3136 12544]

Config: bfloat16, B=32, h=8, d=64, L=49 (7×7 landmarks of a √N×√N grid), w_q and w_k given.
Contenders for the core op (landmarks are inputs, computed once outside the timed region):
  fused     torch.ops.crosshead.imhsa / imhsa_backward (the CUDA kernels)
  torch     the pure-torch path: crosshead.reference.imhsa / imhsa_backward, eager
  compiled  torch.compile of that same pure-torch forward (+ backward)
  sdpa      scaled_dot_product_attention, FlashAttention backend, on the same q, k, v
Medians of CUDA-event timings after warm-up; peak memory of fwd+bwd = max_memory_allocated above
what the inputs already hold. Targets:
  T1 forward at N >= 3136 reaches >= 50% of the measured copy bandwidth, counting the minimum
     bytes (q, k, v read once, out written once)
  T2 fwd+bwd >= 3x faster than the pure-torch path      T3 >= 1.5x faster than torch.compile of it
  T4 faster than SDPA (flash) from N = 784 on, fwd and fwd+bwd
  T5 peak memory of fwd+bwd <= the pure-torch path's
Per launch of the fused forward: measured kernel time (torch.profiler, mean of 10 calls) against
the design's global bytes, FLOPs, roofline floor and predicted fraction (bench/kernel_model.py).
Writes cuda_targets_<device>.json and .md under --out.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import crosshead  # noqa: E402
from crosshead import _library, reference  # noqa: E402

from kernel_model import forward_launches  # noqa: E402

B, H, D, LH, LW = 32, 8, 64, 7, 7
DTYPE = torch.bfloat16


def median_ms(fn, warmup=5, reps=20):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_mib(fn):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def copy_bandwidth_gbs():
    """Device-to-device copy of 1 GiB: (read + write) bytes / median time."""
    x = torch.empty(2**30 // 2, dtype=DTYPE, device="cuda")
    y = torch.empty_like(x)
    ms = median_ms(lambda: y.copy_(x), warmup=3, reps=20)
    del x, y
    return 2 * 2**30 / (ms * 1e-3) / 1e9


def matmul_tflops(n=8192):
    """bf16 n×n×n matrix product through torch on random data: 2n³ / median time."""
    a, b = (torch.randn(n, n, device="cuda", dtype=DTYPE) for _ in range(2))
    ms = median_ms(lambda: a @ b, warmup=3, reps=20)
    del a, b
    return 2 * n**3 / (ms * 1e-3) / 1e12


def guarded(fn):
    """Runs fn; an out-of-memory turns into None (reported as OOM) instead of ending the run."""
    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


CONTENDERS = ("fused", "torch", "compiled", "sdpa")


def bench_n(n, mix, warmup, reps, contenders=CONTENDERS):
    side = int(round(math.sqrt(n)))
    assert side * side == n, f"N={n} is not a square grid"
    scale = D ** -0.5
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D, device="cuda", dtype=DTYPE) for _ in range(3))
    ql = crosshead.landmarks(q, grid=(side, side), size=(LH, LW))
    kl = crosshead.landmarks(k, grid=(side, side), size=(LH, LW))
    w_q, w_k = (torch.eye(H, device="cuda") + 0.1 * torch.randn(H, H, device="cuda") for _ in range(2))
    g = torch.randn_like(q)
    args = (q, k, v, ql, kl, w_q, w_k)
    r = {"N": n}

    # fused
    def fused_fwd():
        return torch.ops.crosshead.imhsa(*args, mix, scale)

    def fused_fwdbwd():
        out = torch.ops.crosshead.imhsa(*args, mix, scale)
        return torch.ops.crosshead.imhsa_backward(g, *args, *out[1:], mix, scale)

    # the pure-torch path, eager and compiled
    def torch_fwd():
        return reference.imhsa(*args, mix, scale)

    def torch_fwdbwd():
        out = reference.imhsa(*args, mix, scale)
        return reference.imhsa_backward(g, *args, *out[1:], mix, scale)

    torch._dynamo.reset()
    comp_fwd = torch.compile(torch_fwd)
    comp_fwdbwd = torch.compile(torch_fwdbwd)

    # SDPA (FlashAttention backend) on the same q, k, v
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))

    def sdpa_fwd():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.no_grad():
            return F.scaled_dot_product_attention(q, k, v)

    def sdpa_fwdbwd():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = F.scaled_dot_product_attention(qs, ks, vs)
        return torch.autograd.grad(out, (qs, ks, vs), g)

    for name, fwd, fwdbwd in (("fused", fused_fwd, fused_fwdbwd), ("torch", torch_fwd, torch_fwdbwd),
                              ("compiled", comp_fwd, comp_fwdbwd), ("sdpa", sdpa_fwd, sdpa_fwdbwd)):
        if name not in contenders:
            r[f"{name}_fwd_ms"] = r[f"{name}_fwdbwd_ms"] = r[f"{name}_peak_mib"] = None
            continue
        t0 = time.time()
        r[f"{name}_fwd_ms"] = guarded(lambda: median_ms(fwd, warmup, reps))
        r[f"{name}_fwdbwd_ms"] = guarded(lambda: median_ms(fwdbwd, warmup, reps))
        r[f"{name}_peak_mib"] = guarded(lambda: peak_mib(fwdbwd))
        print(f"  N={n} {name}: fwd {r[f'{name}_fwd_ms']} ms, fwd+bwd {r[f'{name}_fwdbwd_ms']} ms, "
              f"peak {r[f'{name}_peak_mib']} MiB ({time.time() - t0:.0f} s with warm-up/compile)", flush=True)
    r["min_bytes"] = 4 * B * H * n * D * q.element_size()
    r["kernels_fwd_us"] = guarded(lambda: kernel_times_us(fused_fwd))
    del q, k, v, ql, kl, g, qs, ks, vs
    torch.cuda.empty_cache()
    return r


def kernel_times_us(fn, calls=10):
    """Mean device time per call of each CUDA kernel fn launches (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return {e.key: e.self_device_time_total / calls for e in prof.key_averages() if e.self_device_time_total > 0}


def launch_rows(r, copy_gbs):
    """The model's launches of the forward at r's N beside the measured kernel times."""
    rows = []
    measured = r.get("kernels_fwd_us") or {}
    for m in forward_launches(B, H, r["N"], D, LH * LW):
        base = m["launch"].split(" ")[0]
        us = sum(t for name, t in measured.items() if base in name) or None
        floor_us = m["bytes"] / (copy_gbs * 1e3) if m["bytes"] else None
        rows.append({**m, "measured_us": us, "floor_us": floor_us,
                     "achieved_fraction": ratio(floor_us, us)})
    return rows


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def evaluate(rows, copy_gbs):
    checks = []
    for r in rows:
        n = r["N"]
        if r["fused_fwd_ms"]:
            r["fused_fwd_gbs"] = r["min_bytes"] / (r["fused_fwd_ms"] * 1e-3) / 1e9
            r["fwd_bw_fraction"] = r["fused_fwd_gbs"] / copy_gbs
        else:
            r["fused_fwd_gbs"] = r["fwd_bw_fraction"] = None
        r["speedup_vs_torch"] = ratio(r["torch_fwdbwd_ms"], r["fused_fwdbwd_ms"])
        r["speedup_vs_compiled"] = ratio(r["compiled_fwdbwd_ms"], r["fused_fwdbwd_ms"])
        r["speedup_vs_sdpa_fwd"] = ratio(r["sdpa_fwd_ms"], r["fused_fwd_ms"])
        r["speedup_vs_sdpa_fwdbwd"] = ratio(r["sdpa_fwdbwd_ms"], r["fused_fwdbwd_ms"])
        r["peak_vs_torch"] = ratio(r["fused_peak_mib"], r["torch_peak_mib"])

        def add(target, value, goal, ok):
            checks.append({"N": n, "target": target, "value": value, "goal": goal,
                           "met": None if value is None else bool(ok(value))})

        if n >= 3136:
            add("T1 fwd bandwidth / copy bandwidth", r["fwd_bw_fraction"], ">= 0.5", lambda x: x >= 0.5)
        add("T2 fwd+bwd speed-up vs pure torch", r["speedup_vs_torch"], ">= 3", lambda x: x >= 3)
        add("T3 fwd+bwd speed-up vs torch.compile", r["speedup_vs_compiled"], ">= 1.5", lambda x: x >= 1.5)
        if n >= 784:
            add("T4 fwd speed-up vs SDPA flash", r["speedup_vs_sdpa_fwd"], "> 1", lambda x: x > 1)
            add("T4 fwd+bwd speed-up vs SDPA flash", r["speedup_vs_sdpa_fwdbwd"], "> 1", lambda x: x > 1)
        add("T5 peak memory fwd+bwd / pure torch", r["peak_vs_torch"], "<= 1", lambda x: x <= 1)
    return checks


def fmt(x, spec=".3g"):
    return "n.a." if x is None else format(x, spec)


def markdown(meta, rows, checks):
    lines = [f"# crosshead CUDA kernels vs the issue-3 targets on {meta['device']}", "",
             f"torch {meta['torch']}, CUDA {meta['cuda']}, library mode {meta['mode']}, mix={meta['mix']}, "
             f"bfloat16, B={B}, h={H}, d={D}, L={LH * LW}; copy bandwidth {meta['copy_gbs']:.0f} GB/s, "
             f"bf16 matmul {meta['matmul_tflops']:.0f} TFLOP/s (8192³, random data); "
             f"contenders run: {', '.join(meta.get('contenders', CONTENDERS))} (n.a.: not run, or out of memory); "
             f"medians of {meta['reps']} after {meta['warmup']} warm-up runs.", "",
             "| N | fused fwd ms | fwd GB/s (frac of copy) | fused fwd+bwd ms | torch fwd+bwd ms | compiled fwd+bwd ms "
             "| sdpa fwd / fwd+bwd ms | peak MiB fused / torch / compiled / sdpa |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(
            f"| {r['N']} | {fmt(r['fused_fwd_ms'])} | {fmt(r['fused_fwd_gbs'], '.0f')} ({fmt(r['fwd_bw_fraction'])}) "
            f"| {fmt(r['fused_fwdbwd_ms'])} | {fmt(r['torch_fwdbwd_ms'])} | {fmt(r['compiled_fwdbwd_ms'])} "
            f"| {fmt(r['sdpa_fwd_ms'])} / {fmt(r['sdpa_fwdbwd_ms'])} | {fmt(r['fused_peak_mib'], '.0f')} / "
            f"{fmt(r['torch_peak_mib'], '.0f')} / {fmt(r['compiled_peak_mib'], '.0f')} / {fmt(r['sdpa_peak_mib'], '.0f')} |")
    lines += ["", "Forward launches, measured against the design (bench/kernel_model.py; fraction = DRAM floor "
              "at the copy bandwidth / time):", "",
              "| N | launch | grid | MB | GFLOP | floor µs | measured µs | fraction measured | predicted |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        for k in r.get("launches", []):
            lines.append(f"| {r['N']} | {k['launch']} | {k['grid']} | {k['bytes'] / 1e6:.1f} | {k['flops'] / 1e9:.2f} "
                         f"| {fmt(k['floor_us'])} | {fmt(k['measured_us'])} | {fmt(k['achieved_fraction'])} "
                         f"| {fmt(k['predicted_fraction'])} |")
    lines += ["", "| N | target | value | goal | met |", "| --- | --- | --- | --- | --- |"]
    for c in checks:
        met = "n.a." if c["met"] is None else ("yes" if c["met"] else "**no**")
        lines.append(f"| {c['N']} | {c['target']} | {fmt(c['value'])} | {c['goal']} | {met} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--mix", default="post", choices=["post", "pre"])
    ap.add_argument("--n", type=int, nargs="+", default=[196, 784, 3136, 12544])
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--contenders", default=",".join(CONTENDERS),
                    help="comma-separated subset of " + ",".join(CONTENDERS) + " (the others are reported n.a.)")
    a = ap.parse_args()
    contenders = a.contenders.split(",")
    unknown = set(contenders) - set(CONTENDERS)
    if unknown:
        ap.error(f"--contenders: unknown {sorted(unknown)}; choose from {CONTENDERS}")
    if not torch.cuda.is_available():
        sys.exit("bench/cuda_targets.py needs a CUDA device")
    device = torch.cuda.get_device_name()
    print(f"device: {device}; torch {torch.__version__}; CUDA {torch.version.cuda}; "
          f"crosshead library mode: {_library.mode} ({_library.detail})", flush=True)
    copy_gbs = copy_bandwidth_gbs()
    mm_tflops = matmul_tflops()
    print(f"copy bandwidth: {copy_gbs:.0f} GB/s; bf16 matmul {mm_tflops:.0f} TFLOP/s", flush=True)
    rows = [bench_n(n, a.mix, a.warmup, a.reps, contenders) for n in a.n]
    checks = evaluate(rows, copy_gbs)
    for r in rows:
        r["launches"] = launch_rows(r, copy_gbs)
    meta = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda, "mode": _library.mode,
            "mix": a.mix, "copy_gbs": copy_gbs, "matmul_tflops": mm_tflops, "contenders": contenders,
            "warmup": a.warmup, "reps": a.reps,
            "config": {"B": B, "h": H, "d": D, "L": LH * LW, "dtype": "bfloat16"}}
    md = markdown(meta, rows, checks)
    print(md)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "_", device).strip("_").lower()
    (out / f"cuda_targets_{slug}_{a.mix}.json").write_text(json.dumps(
        {"meta": meta, "rows": rows, "checks": checks}, indent=2) + "\n")
    (out / f"cuda_targets_{slug}_{a.mix}.md").write_text(md)
    print(f"wrote {out}/cuda_targets_{slug}_{a.mix}.json and .md")


if __name__ == "__main__":
    main()
