"""The markdown of python -m bench.baselines: one table per grid, then the crossovers."""

from __future__ import annotations

from .baselines import crossover


def _ms(s):
    return f"{s * 1e3:.1f}" if s < 10 else f"{s * 1e3:.0f}"


def _mib(b):
    return f"{b / 2 ** 20:.0f}"


def _table(rows, side) -> list[str]:
    rows = [r for r in rows if r["side"] == side]
    ref = next((r for r in rows if r["name"] == "softmax" and r["status"] == "ok"), None)
    out = [f"### {side} x {side} grid + CLS (N = {side * side + 1})", "",
           "| name | fwd ms | × softmax | fwd+bwd ms | × softmax | fwd peak MiB | fwd+bwd peak MiB "
           "| params | Δ params vs MHSA | fwd GFLOP | effective density | what it keeps |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        if r["status"] != "ok":
            out.append(f"| `{r['name']}` | {r['reason']} |" + " |" * 10)
            continue
        ratio = (lambda k: f"{r[k] / ref[k]:.2f}") if ref else (lambda k: "–")
        delta = r["params"] - ref["params"] if ref else 0
        out.append(f"| `{r['name']}` | {_ms(r['fwd_s'])} | {ratio('fwd_s')} | {_ms(r['fwdbwd_s'])} | "
                   f"{ratio('fwdbwd_s')} | {_mib(r['fwd_peak'])} | {_mib(r['fwdbwd_peak'])} | "
                   f"{r['params']:,} | {delta:+,} | {r['flops'] / 1e9:.2f} | {r['density']:.0%} | "
                   f"{r['keeps']} |")
    return out + [""]


def _cross(name, rows, quad, lin) -> list[str]:
    out = [f"### `{name}`: `{quad}` vs `{lin}`", "",
           f"| grid | N | {quad} fwd+bwd ms | {lin} fwd+bwd ms | {quad} peak MiB | {lin} peak MiB "
           f"| {quad} fwd ms | {lin} fwd ms |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        out.append(f"| {r['side']}x{r['side']} | {r['n']} | {_ms(r[f'{quad}_fwdbwd_s'])} | "
                   f"{_ms(r[f'{lin}_fwdbwd_s'])} | {_mib(r[f'{quad}_fwdbwd_peak'])} | "
                   f"{_mib(r[f'{lin}_fwdbwd_peak'])} | {_ms(r[f'{quad}_fwd_s'])} | {_ms(r[f'{lin}_fwd_s'])} |")
    out.append("")
    for key, what in (("fwdbwd_s", "forward+backward time"), ("fwdbwd_peak", "forward+backward peak memory"),
                      ("fwd_s", "forward time"), ("fwd_peak", "forward peak memory")):
        n, measured = crossover(rows, quad, lin, key)
        how = "measured (interpolated)" if measured else "extrapolated (quadratic ∝ N², other ∝ N)"
        out.append(f"- {what}: `{lin}` wins above about {n:,.0f} grid tokens "
                   f"(~{n ** 0.5:.0f}²), {how}")
    return out + [""]


def markdown(head, rows, cross) -> str:
    out = ["# crosshead.baselines at ViT-S width on the CPU", "",
           f"`{head['command']}`: torch {head['torch']}, {head['threads']} thread(s), {head['cpu']}; "
           f"dim {head['dim']}, {head['heads']} heads, batch {head['batch']}, {head['prefix']} CLS "
           "token; each module built with `baselines.create_for` for its grid; `ra`/`lara` in eval "
           "mode (no sampling noise), the others in training mode. Time: the median of the timing "
           "thread's CPU time after a warm-up call. Memory: " + head["memory_method"] + ". FLOPs: "
           "torch's FlopCounterMode over the forward (matrix products, convolutions, SDPA; "
           "elementwise work and FFTs not counted). Effective density: the fraction of the N×N "
           "query-key pairs whose exact score enters the output.", ""]
    for side in sorted({r["side"] for r in rows}):
        out += _table(rows, side)
    out += ["## Crossovers of the two evaluations", ""]
    out += _cross("ripple", cross["ripple"], "quadratic", "dp")
    out += _cross("rpe_linear", cross["rpe_linear"], "explicit", "fft")
    return "\n".join(out)
