"""From run folders to results: ``summary.json``, ``table.md``, the plots of every study and ``logs/``.

The accuracy reported is the last epoch's test accuracy (no epoch is picked on the test set).
Training time is the sum of the epochs' ``train_time_s`` (the training loop only, without
evaluation; a resumed run's epochs add up the same).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from . import configs, grid, stats


def load_run(run: configs.Run, runs_dir: Path) -> dict | None:
    """The run's figures, or None when it is not done."""
    folder = runs_dir / run.key
    if grid.status(run, folder) != "done":
        return None
    records = grid.read_log(folder / "log.jsonl")
    config = next(r for r in records if r["kind"] == "config")
    epochs = sorted((r for r in records if r["kind"] == "epoch"), key=lambda r: r["epoch"])
    t, curve = 0.0, []
    for r in epochs:
        t += r["train_time_s"]
        curve.append({"epoch": r["epoch"], "test_acc": r["test_acc"], "train_acc": r["train_acc"],
                      "train_loss": r["train_loss"], "train_time_s": t})
    return {"key": run.key, "attn": run.attn, "heads": run.heads, "seed": run.seed, "params": config["params"],
            "test_acc": epochs[-1]["test_acc"], "train_time_s": t, "img_per_s": epochs[-1]["train_img_per_s"],
            "curve": curve, "torch": config["torch"], "device": config["device"]}


def _fmt_pm(m: float, s: float, pct: bool = True) -> str:
    k = 100.0 if pct else 1.0
    return f"{m * k:.1f} ± {s * k:.1f}" if not math.isnan(s) else f"{m * k:.1f}"


def _fmt_diff(d: dict | None) -> str:
    if d is None:
        return "n/a (fewer than 2 paired seeds)"
    lo, hi = d["ci95"]
    flag = " *" if d["excludes_zero"] else ""
    return f"{d['mean'] * 100:+.1f} [{lo * 100:+.1f}, {hi * 100:+.1f}]{flag}"


def summarise(cfg: configs.Config, runs_dir: Path) -> dict:
    """Every study's cells (attention × heads: mean ± std over the seeds done) and paired differences."""
    out = {"config": cfg.name, "seeds": list(cfg.seeds), "budget_exceptions": [list(e) for e in cfg.budget_exceptions],
           "studies": []}
    for study in cfg.studies:
        task = cfg.task(study.task)
        cells, by = [], {}
        for heads in study.heads:
            for attn in study.attentions:
                got = [load_run(configs.Run(task, attn, heads, s), runs_dir) for s in cfg.seeds]
                got = [g for g in got if g is not None]
                by[(attn, heads)] = {g["seed"]: g for g in got}
                if not got:
                    cells.append({"attn": attn, "heads": heads, "n": 0})
                    continue
                acc_m, acc_s = stats.mean_std([g["test_acc"] for g in got])
                t_m, _ = stats.mean_std([g["train_time_s"] for g in got])
                cells.append({"attn": attn, "heads": heads, "n": len(got), "params": got[0]["params"],
                              "test_acc_mean": acc_m, "test_acc_std": acc_s, "train_time_s_mean": t_m,
                              "img_per_s_mean": stats.mean_std([g["img_per_s"] for g in got])[0],
                              "runs": got})
        pairs = []
        for heads in study.heads:
            names = [(a, b) for a, b in configs.INTERACTION_PAIRS if a in study.attentions and b in study.attentions]
            if "imhsa_post" in study.attentions:
                names += [("imhsa_post", p) for p in study.attentions if p in configs.PEERS]
            for a, b in names:
                d = stats.paired_diff({s: g["test_acc"] for s, g in by[(a, heads)].items()},
                                      {s: g["test_acc"] for s, g in by[(b, heads)].items()})
                pairs.append({"a": a, "b": b, "heads": heads, "diff": d})
        out["studies"].append({"name": study.name, "title": study.title, "task": task.name,
                               "task_spec": _task_spec(task), "cells": cells, "pairs": pairs})
    return out


def _task_spec(t: configs.Task) -> dict:
    import dataclasses

    return {**dataclasses.asdict(t), "tokens": t.tokens, "L": t.landmarks ** 2}


def params_spread(study: dict, skip=()) -> float:
    """(max − min) / min of the parameter counts over the study's cells at one head count (the
    attentions in ``skip`` left out), the largest."""
    worst = 0.0
    for heads in {c["heads"] for c in study["cells"]}:
        p = [c["params"] for c in study["cells"] if c["heads"] == heads and c["n"] and c["attn"] not in skip]
        if p:
            worst = max(worst, (max(p) - min(p)) / min(p))
    return worst


def _budget_line(summary: dict, study: dict) -> str:
    exceptions = dict(summary.get("budget_exceptions", ()))
    line = (f"Parameter counts differ by at most {params_spread(study, exceptions) * 100:.1f} % between "
            "attentions")
    named = [a for a in exceptions if any(c["attn"] == a and c["n"] for c in study["cells"])]
    return line + "".join(f"; {a} excepted: {exceptions[a]}" for a in named) + "."


def markdown(summary: dict) -> str:
    lines = [f"# Quality benchmark, configuration `{summary['config']}`", "",
             f"Seeds {summary['seeds']}. Test accuracy of the last epoch, % (mean ± sample std over the seeds "
             "done, n, and the lowest and highest run). Paired differences: per-seed A − B in points, mean and "
             "95 % Student-t interval; `*` marks an interval that excludes 0. Time: training loop only, per run; "
             "img/s: training throughput of the last epoch, per process.", ""]
    for st in summary["studies"]:
        t = st["task_spec"]
        lines += [f"## {st['title']}", "",
                  f"Task `{st['task']}`: {t['dataset']} at {t['image_size']} px, patch {t['patch']} "
                  f"({t['tokens'] - 1} tokens + CLS), width {t['width']}, depth {t['depth']}, L = {t['L']}; "
                  f"{t['epochs']} epochs, batch {t['batch_size']}, lr {t['lr']}"
                  + (f", {t['train_size']} training / {t['test_size']} test samples" if t["train_size"] else "")
                  + ". " + _budget_line(summary, st), "",
                  "| attention | heads | params | test acc % | min – max | n | train time s | img/s |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for c in st["cells"]:
            if not c["n"]:
                lines.append(f"| {c['attn']} | {c['heads']} | | not run yet | | 0 | | |")
                continue
            accs = [r["test_acc"] * 100 for r in c["runs"]]
            lines.append(f"| {c['attn']} | {c['heads']} | {c['params']:,} | "
                         f"{_fmt_pm(c['test_acc_mean'], c['test_acc_std'])} | {min(accs):.1f} – {max(accs):.1f} | "
                         f"{c['n']} | {c['train_time_s_mean']:.0f} | {c['img_per_s_mean']:.0f} |")
        lines += ["", "| A − B | heads | difference, points [95 % CI] |", "| --- | ---: | --- |"]
        for p in st["pairs"]:
            lines.append(f"| {p['a']} − {p['b']} | {p['heads']} | {_fmt_diff(p['diff'])} |")
        lines.append("")
    return "\n".join(lines)


def plots(summary: dict, out: Path) -> list[Path]:
    """Per study: learning curves, accuracy against training time, and accuracy against heads when
    the study has several head counts. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for st in summary["studies"]:
        cells = [c for c in st["cells"] if c["n"]]
        if not cells:
            continue
        several = len({c["heads"] for c in cells}) > 1
        label = (lambda c: f"{c['attn']} h={c['heads']}") if several else (lambda c: c["attn"])
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for c in cells:
            n_ep = min(len(r["curve"]) for r in c["runs"])
            xs = list(range(1, n_ep + 1))
            ys = [[r["curve"][i]["test_acc"] * 100 for r in c["runs"]] for i in range(n_ep)]
            m = [sum(y) / len(y) for y in ys]
            s = [stats.mean_std(y)[1] if len(y) > 1 else 0.0 for y in ys]
            line, = ax.plot(xs, m, marker="o", ms=3, label=label(c), linestyle=_style(c["attn"]))
            ax.fill_between(xs, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)],
                            color=line.get_color(), alpha=0.12)
        ax.set(xlabel="epoch", ylabel="test accuracy % (mean ± std over seeds)", title=st["title"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        written.append(_save(fig, out / f"{st['name']}-curves.png"))
        fig, ax = plt.subplots(figsize=(7, 4.5))
        markers = "osD^v<>ph*"
        for i, c in enumerate(cells):
            ax.errorbar(c["train_time_s_mean"], c["test_acc_mean"] * 100, label=label(c), capsize=3,
                        yerr=0.0 if math.isnan(c["test_acc_std"]) else c["test_acc_std"] * 100,
                        fmt=markers[i % len(markers)], alpha=0.85)
        times = [c["train_time_s_mean"] for c in cells]
        log_x = max(times) > 5 * min(times)
        if log_x:
            ax.set_xscale("log")
        ax.set(xlabel="training time per run, s" + (" (log)" if log_x else ""), ylabel="final test accuracy % "
               "(mean ± std)", title=st["title"])
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, ncol=2)
        written.append(_save(fig, out / f"{st['name']}-acc-vs-time.png"))
        if several:
            fig, ax = plt.subplots(figsize=(6, 4))
            for attn in dict.fromkeys(c["attn"] for c in cells):
                cs = sorted((c for c in cells if c["attn"] == attn), key=lambda c: c["heads"])
                ax.errorbar([c["heads"] for c in cs], [c["test_acc_mean"] * 100 for c in cs],
                            yerr=[0.0 if math.isnan(c["test_acc_std"]) else c["test_acc_std"] * 100 for c in cs],
                            marker="o", capsize=3, label=attn, linestyle=_style(attn))
            ax.set_xscale("log", base=2)
            hs = sorted({c["heads"] for c in cells})
            ax.set_xticks(hs, [str(h) for h in hs])
            ax.set(xlabel="heads (fixed width)", ylabel="final test accuracy %", title=st["title"])
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            written.append(_save(fig, out / f"{st['name']}-heads.png"))
    return written


def _style(attn: str) -> str:
    """iMHSA variants solid, peers dashed."""
    return "-" if attn in configs.IMHSA else "--"


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(cfg: configs.Config, runs_dir: Path, out: Path) -> dict:
    """summary.json, table.md and the plots into ``out``; returns the summary."""
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(cfg, runs_dir)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "table.md").write_text(markdown(summary) + "\n")
    plots(summary, out)
    copy_logs(summary, runs_dir, out / "logs")
    return summary


def copy_logs(summary: dict, runs_dir: Path, dest: Path) -> None:
    """Each reported run's ``log.jsonl`` to ``dest/<task>/<attention>-h<heads>/seed<seed>.jsonl``."""
    for st in summary["studies"]:
        for c in st["cells"]:
            for r in c.get("runs", ()):
                target = dest / f"{r['key']}.jsonl"
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes((runs_dir / r["key"] / "log.jsonl").read_bytes())
