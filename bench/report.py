"""The outputs of a run: <tag>.json (every raw figure), <tag>.md (header and tables),
<tag>-time.png and <tag>-memory.png (log-log against N, one line per contender)."""

from __future__ import annotations

import json
from pathlib import Path

MiB = 1 << 20
PASS_TITLES = {"fwd": "forward", "fwdbwd": "forward + backward"}
HEADLINE = ("imhsa-torch", "sdpa-math")
HEADLINE_N = 16384


def header_text(head: dict, cfg) -> str:
    dev = head.get("gpu") or head["cpu"]
    return (f"crosshead {head['crosshead']} ({head['crosshead_backend']}), torch {head['torch']}"
            f" (CUDA {head['torch_cuda']}), {cfg.device}: {dev}, {cfg.threads} threads\n"
            f"B={cfg.batch} h={cfg.heads} d={cfg.head_dim} L={cfg.num_landmarks} {cfg.dtype} mix={cfg.mix} "
            f"N={', '.join(str(s * s) for s in cfg.grids)}")


def roofline_text(roof: dict) -> str:
    text = (f"copy bandwidth {roof['copy_bandwidth_Bps'] / 1e9:.1f} GB/s, "
            f"{roof['matmul_dtype']} matmul {roof['matmul_flops'] / 1e12:.3f} TFLOP/s")
    if "matmul_bf16_flops" in roof:
        text += f", bfloat16 matmul {roof['matmul_bf16_flops'] / 1e12:.1f} TFLOP/s"
    return text


def _index(records):
    return {(r["contender"], r["pass"], r["n"]): r for r in records}


def comparison(records: list[dict]) -> list[dict]:
    """iMHSA's pure-torch path against math SDPA at N = 16384, or else at the largest N where both
    have a figure, per pass: time and peak-memory ratios (SDPA / iMHSA, > 1 means iMHSA wins)."""
    idx = _index(records)
    out = []
    for pass_ in PASS_TITLES:
        both = sorted(n for (c, p, n), r in idx.items() if c == HEADLINE[0] and p == pass_ and r["status"] == "ok"
                      and idx.get((HEADLINE[1], p, n), {}).get("status") == "ok")
        if not both:
            continue
        n = HEADLINE_N if HEADLINE_N in both else both[-1]
        a, b = idx[(HEADLINE[0], pass_, n)], idx[(HEADLINE[1], pass_, n)]
        out.append({"pass": pass_, "n": n, "imhsa_s": a["median_s"], "sdpa_math_s": b["median_s"],
                    "imhsa_peak_bytes": a["peak_bytes"], "sdpa_math_peak_bytes": b["peak_bytes"],
                    "time_ratio": b["median_s"] / a["median_s"],
                    "memory_ratio": b["peak_bytes"] / max(a["peak_bytes"], 1),
                    "imhsa_faster": a["median_s"] < b["median_s"],
                    "imhsa_less_memory": a["peak_bytes"] < b["peak_bytes"]})
    return out


PURE_TORCH = ("imhsa-torch", "imhsa-naive", "imhsa-torch-compile")


def pure_torch(records: list[dict]) -> list[dict]:
    """The pure-torch path against the same math written the obvious way (imhsa-naive) and against
    torch.compile of itself, per pass and N where the pure-torch path has a figure: times and
    the ratios naive / torch and compile / torch (above 1: the pure-torch path is faster); a ratio
    is None where the other contender has no figure."""
    idx = _index(records)
    out = []
    for pass_ in PASS_TITLES:
        for n in sorted(n for (c, p, n), r in idx.items() if c == PURE_TORCH[0] and p == pass_
                        and r["status"] == "ok"):
            row = {"pass": pass_, "n": n}
            base = idx[(PURE_TORCH[0], pass_, n)]["median_s"]
            for name, key in zip(PURE_TORCH, ("torch", "naive", "compile")):
                r = idx.get((name, pass_, n))
                row[f"{key}_s"] = r["median_s"] if r and r["status"] == "ok" else None
                if key != "torch":
                    row[f"{key}_ratio"] = row[f"{key}_s"] / base if row[f"{key}_s"] else None
            out.append(row)
    return out


def pure_torch_text(rows: list[dict]) -> str:
    def ratio(x):
        return "-" if x is None else f"{x:.2f}"
    return "\n".join(f"{r['pass']} N={r['n']}: imhsa-torch {r['torch_s'] * 1e3:.3g} ms; naive / torch "
                     f"{ratio(r['naive_ratio'])}, compile / torch {ratio(r['compile_ratio'])}" for r in rows)


def _times(ratio: float, better: str, worse: str) -> str:
    return f"{ratio:.1f}x {better}" if ratio >= 1 else f"{1 / ratio:.1f}x {worse}"


def comparison_text(comp: list[dict]) -> str:
    if not comp:
        return "no N where both imhsa-torch and sdpa-math have a figure"
    lines = []
    for c in comp:
        lines.append(
            f"{PASS_TITLES[c['pass']]} at N={c['n']}: imhsa-torch {c['imhsa_s'] * 1e3:.1f} ms, "
            f"{c['imhsa_peak_bytes'] / MiB:.0f} MiB; sdpa-math {c['sdpa_math_s'] * 1e3:.1f} ms, "
            f"{c['sdpa_math_peak_bytes'] / MiB:.0f} MiB -> iMHSA time {_times(c['time_ratio'], 'faster', 'slower')}, "
            f"peak memory {_times(c['memory_ratio'], 'less', 'more')}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- markdown


def _fmt_ms(s):
    ms = s * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _fmt_mib(b):
    m = b / MiB
    return f"{m:.3g}" if m < 100 else f"{m:.0f}"


def _grid_table(records, pass_, key, fmt) -> list[str]:
    ns = sorted({r["n"] for r in records})
    names = list(dict.fromkeys(r["contender"] for r in records))
    idx = _index(records)
    lines = ["| contender | level | " + " | ".join(f"N={n}" for n in ns) + " |",
             "| --- | --- | " + " | ".join("---:" for _ in ns) + " |"]
    for name in names:
        cells = []
        for n in ns:
            r = idx.get((name, pass_, n))
            if r is None:
                cells.append("")
            elif r["status"] == "ok":
                cells.append(fmt(r[key]))
            else:
                cells.append(r["status"])
        level = next(r["level"] for r in records if r["contender"] == name)
        lines.append(f"| {name} | {level} | " + " | ".join(cells) + " |")
    return lines


def _reasons(records) -> list[str]:
    groups: dict[tuple, list[int]] = {}
    for r in records:
        if r["status"] != "ok":
            groups.setdefault((r["contender"], r["pass"], r["status"], r["reason"]), []).append(r["n"])
    lines = ["| contender | pass | N | status | reason |", "| --- | --- | --- | --- | --- |"]
    for (name, pass_, status, reason), ns in groups.items():
        reason = reason.replace("|", "/").replace("\n", " ")
        lines.append(f"| {name} | {pass_} | {', '.join(map(str, sorted(set(ns))))} | {status} | {reason} |")
    return lines if len(lines) > 2 else ["Every point has a figure."]


def _pure_torch_section(rows: list[dict]) -> list[str]:
    out = ["## The pure-torch path against the obvious version and torch.compile", ""]
    if not rows:
        return out + ["imhsa-torch has no figure in this run.", ""]

    def ms(s):
        return "-" if s is None else _fmt_ms(s)

    def ratio(x):
        return "-" if x is None else f"**{x:.2f}**"
    out += ["| pass | N | imhsa-torch ms | imhsa-naive ms | naive / torch | imhsa-torch-compile ms | "
            "compile / torch |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    out += [f"| {r['pass']} | {r['n']} | {ms(r['torch_s'])} | {ms(r['naive_s'])} | {ratio(r['naive_ratio'])} | "
            f"{ms(r['compile_s'])} | {ratio(r['compile_ratio'])} |" for r in rows]
    return out + ["", "imhsa-naive is the same math written the obvious way (torch.softmax per side, einsum "
                  "for the head mixing, @ for the products, autograd for the backward, which keeps the "
                  "N×L maps instead of recomputing them); imhsa-torch-compile is the pure-torch path "
                  "under torch.compile. Ratios are the other's time / imhsa-torch's: above 1, the "
                  "pure-torch path is faster.", ""]


def _clock_text(cfg: dict) -> str:
    if cfg["device"] == "cuda":
        return "CUDA events"
    if cfg.get("clock") == "cpu":
        return ("CPU time of the timing thread, time.thread_time: the run had one thread, and other "
                "processes on this shared machine held the cores part of the time")
    return "time.perf_counter"


def markdown(results: dict) -> str:
    head, cfg, roof, records = results["machine"], results["config"], results["roofline"], results["records"]
    dev = head.get("gpu") or head["cpu"]
    L = cfg["landmarks"][0] * cfg["landmarks"][1]
    out = [f"# crosshead benchmark: {cfg['device']} ({dev})", "",
           f"Regenerate with `{results['command'].strip()}` (this run: {results['wall_s']:.0f} s wall time, "
           f"{head['date']}).", "",
           "## Machine", "", "| | |", "| --- | --- |"]
    rows = [("device", f"{cfg['device']}: {dev}"), ("CPU", f"{head['cpu']}, {head['cpu_cores']} cores, "
            f"{head['memory_bytes'] / (1 << 30):.0f} GiB"), ("torch threads", head["threads"]),
            ("load average at start (1, 5, 15 min)", head.get("load_average_at_start")),
            ("python / torch / CUDA", f"{head['python']} / {head['torch']} / {head['torch_cuda']} "
             f"(available: {head['cuda_available']})"),
            ("crosshead", f"{head['crosshead']}, backend {head['crosshead_backend']!r}, fused CUDA kernels: "
             f"{head['crosshead_fused_cuda']} (git {head['git_commit']})"),
            ("packages", ", ".join(f"{k} {v}" for k, v in head["packages"].items() if v)),
            ("roofline rates (measured)", roofline_text(roof)),
            ("peak memory", head["memory_method"])]
    if "gpu_capability" in head:
        rows.insert(1, ("GPU", f"{head['gpu']}, sm {head['gpu_capability']}, "
                        f"{head['gpu_memory_bytes'] / (1 << 30):.0f} GiB, {head['gpu_sms']} SMs"))
    out += [f"| {k} | {v} |" for k, v in rows if v is not None]
    out += ["", "## Settings", "",
            f"B={cfg['batch']}, h={cfg['heads']}, d={cfg['head_dim']} (dim={cfg['heads'] * cfg['head_dim']}), "
            f"iMHSA landmarks {cfg['landmarks'][0]}×{cfg['landmarks'][1]} (L={L}), mix={cfg['mix']!r}, "
            f"dtype {cfg['dtype']}; N = side² for side in {list(cfg['grids'])}. "
            f"Times are the median (p20–p80 in the JSON and the last table) of at least {cfg['min_reps']} "
            f"timed calls after {cfg['warmup']} warm-up call(s), repeated for up to {cfg['budget_s']:g} s "
            f"({_clock_text(cfg)}). " + (
                f"The whole sweep ran {cfg['rounds']} times, contenders in turn, and each point reports the "
                "round with the median time (every round's median is in the JSON). "
                if cfg.get("rounds", 1) > 1 else "") +
            "`fwd` runs under torch.no_grad(); `fwdbwd` is forward plus backward of a fixed random "
            "gradient into every input and parameter. Peak memory is the call's own peak above what was "
            "allocated before it (inputs and weights excluded). \"op\" rows take (B, h, N, d) q, k, v; "
            "\"module\" rows take x (B, N, h·d) and include their qkv and output projections.", ""]
    comp = results["comparison"]
    out += ["## iMHSA (pure torch) against math SDPA", ""]
    if comp:
        out += ["| pass | N | imhsa-torch ms | sdpa-math ms | time ratio | imhsa-torch MiB | sdpa-math MiB | "
                "memory ratio |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for c in comp:
            out.append(f"| {c['pass']} | {c['n']} | {_fmt_ms(c['imhsa_s'])} | {_fmt_ms(c['sdpa_math_s'])} | "
                       f"**{c['time_ratio']:.1f}×** | {_fmt_mib(c['imhsa_peak_bytes'])} | "
                       f"{_fmt_mib(c['sdpa_math_peak_bytes'])} | **{c['memory_ratio']:.1f}×** |")
        out += ["", "Ratios are sdpa-math / imhsa-torch: above 1, iMHSA is faster / needs less memory.", ""]
    else:
        out += ["No N where both have a figure.", ""]
    out += _pure_torch_section(results.get("pure_torch") or pure_torch(records))
    for pass_ in cfg["passes"]:
        recs = [r for r in records if r["pass"] == pass_]
        out += [f"## {PASS_TITLES[pass_].capitalize()}: median time (ms)", ""]
        out += _grid_table(recs, pass_, "median_s", _fmt_ms) + [""]
        out += [f"## {PASS_TITLES[pass_].capitalize()}: peak memory of the call (MiB)", ""]
        out += _grid_table(recs, pass_, "peak_bytes", _fmt_mib) + [""]
    out += ["## Points without a figure, and why", ""] + _reasons(records) + [""]
    out += ["## Contenders", "", "| contender | level | what runs |", "| --- | --- | --- |"]
    for name in dict.fromkeys(r["contender"] for r in records):
        r = next(r for r in records if r["contender"] == name)
        out.append(f"| {name} | {r['level']} | {r['what']} |")
    out += ["", "## Every figure", "",
            "Roofline: model FLOPs and bytes of the contender's algorithm (bench/costs.py) against the "
            "matmul rate and copy bandwidth measured above; % is roofline time / measured median.", "",
            "| contender | pass | N | median ms | p20 ms | p80 ms | reps | peak MiB | GFLOP | MB moved | "
            "GFLOP/s | GB/s | roofline % |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in records:
        if r["status"] != "ok":
            continue
        f = r.get("flops")
        out.append(
            f"| {r['contender']} | {r['pass']} | {r['n']} | {_fmt_ms(r['median_s'])} | {_fmt_ms(r['p20_s'])} | "
            f"{_fmt_ms(r['p80_s'])} | {r['reps']} | {_fmt_mib(r['peak_bytes'])} | "
            + (f"{f / 1e9:.3g} | {r['bytes'] / 1e6:.3g} | {r['tflops_per_s'] * 1e3:.3g} | "
               f"{r['gbytes_per_s']:.3g} | {100 * r['roofline_fraction']:.2g} |" if f is not None
               else "| | | | |"))
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------- plots


def plot(results: dict, path: Path, key: str, ylabel: str, scale: float) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cfg, records = results["config"], results["records"]
    passes = list(cfg["passes"])
    fig, axes = plt.subplots(1, len(passes), figsize=(6.5 * len(passes), 5), squeeze=False)
    names = list(dict.fromkeys(r["contender"] for r in records))
    cmap = plt.get_cmap("tab20")
    for ax, pass_ in zip(axes[0], passes):
        for i, name in enumerate(names):
            pts = sorted((r["n"], r[key] * scale) for r in records
                         if r["contender"] == name and r["pass"] == pass_ and r["status"] == "ok" and r[key] > 0)
            if not pts:
                continue
            level = next(r["level"] for r in records if r["contender"] == name)
            lw = 2.6 if name.startswith("imhsa") else 1.4
            ax.plot(*zip(*pts), marker="o", ms=3, lw=lw, color=cmap(i % 20),
                    ls="-" if level == "op" else "--", label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tokens N")
        ax.set_ylabel(ylabel)
        ax.set_title(PASS_TITLES[pass_])
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="upper left", title="solid: op, dashed: module", title_fontsize=8)
    head = results["machine"]
    fig.suptitle(f"{head.get('gpu') or head['cpu']} ({cfg['device']}, torch threads: {head['threads']}): B={cfg['batch']} "
                 f"h={cfg['heads']} d={cfg['head_dim']} L={cfg['landmarks'][0] * cfg['landmarks'][1]} {cfg['dtype']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_all(results: dict, out: Path, tag: str, plots: bool = True) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{tag}.json", out / f"{tag}.md"]
    paths[0].write_text(json.dumps(results, indent=1) + "\n")
    paths[1].write_text(markdown(results))
    if plots:
        for name, key, label, scale in (("time", "median_s", "median time (ms)", 1e3),
                                        ("memory", "peak_bytes", "peak memory of the call (MiB)", 1 / MiB)):
            p = out / f"{tag}-{name}.png"
            if plot(results, p, key, label, scale):
                paths.append(p)
    return paths


if __name__ == "__main__":  # re-render the markdown and plots of a saved run: python -m bench.report X.json
    import sys

    src = Path(sys.argv[1])
    saved = json.loads(src.read_text())
    print(", ".join(str(p) for p in write_all(saved, src.parent, src.stem)))
