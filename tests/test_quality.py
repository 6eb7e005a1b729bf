"""The quality benchmark (bench/quality): a tiny grid end to end, resume and skip, the table, the plots,
the statistics, and the CPU configuration's promises (equal parameter budget, every attention)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")  # the digits data set
pytest.importorskip("matplotlib")

from bench.quality import configs, grid, presets, report, stats  # noqa: E402
from bench.quality.__main__ import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = presets.TINY


def _logs(runs_dir: Path) -> dict:
    return {p.relative_to(runs_dir).as_posix(): p.read_bytes() for p in sorted(runs_dir.rglob("log.jsonl"))}


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.quality", *args], cwd=ROOT, capture_output=True, text=True)


@pytest.fixture(scope="module")
def tiny_grid(tmp_path_factory):
    """The tiny grid (two attentions, two seeds, two epochs of two steps), run once through the CLI."""
    base = tmp_path_factory.mktemp("quality")
    runs, out = base / "runs", base / "out"
    proc = _cli("--config", "tiny", "--runs", str(runs), "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return runs, out, proc.stdout


def test_tiny_grid_writes_the_table_summary_and_plots(tiny_grid):
    runs, out, stdout = tiny_grid
    assert "4 to run" in stdout and "[4/4]" in stdout
    summary = json.loads((out / "summary.json").read_text())
    (study,) = summary["studies"]
    cells = {c["attn"]: c for c in study["cells"]}
    assert set(cells) == {"imhsa_post", "imhsa_nointeraction"}
    for attn, c in cells.items():
        assert c["n"] == 2 and c["heads"] == 2
        accs = [r["test_acc"] for r in c["runs"]]
        assert {r["seed"] for r in c["runs"]} == {0, 1}
        # the cell is the runs' mean and sample std, and each run's figure is its log's final record
        assert c["test_acc_mean"] == pytest.approx(sum(accs) / 2)
        assert c["test_acc_std"] == pytest.approx(abs(accs[0] - accs[1]) / math.sqrt(2))
        for r in c["runs"]:
            final = [x for x in grid.read_log(runs / r["key"] / "log.jsonl") if x["kind"] == "final"][-1]
            assert r["test_acc"] == final["test_acc"] and final["epochs"] == 2 and len(r["curve"]) == 2
    (pair,) = [p for p in study["pairs"] if p["b"] == "imhsa_nointeraction"]
    post = {r["seed"]: r["test_acc"] for r in cells["imhsa_post"]["runs"]}
    none = {r["seed"]: r["test_acc"] for r in cells["imhsa_nointeraction"]["runs"]}
    assert pair["diff"]["diffs"] == pytest.approx([post[s] - none[s] for s in (0, 1)])
    table = (out / "table.md").read_text()
    assert "| imhsa_post | 2 |" in table and "| imhsa_nointeraction | 2 |" in table
    assert "imhsa_post − imhsa_nointeraction" in table
    post = cells["imhsa_post"]
    accs = sorted(r["test_acc"] * 100 for r in post["runs"])
    assert (f"| {post['test_acc_mean'] * 100:.1f} ± {post['test_acc_std'] * 100:.1f} | {accs[0]:.1f} – {accs[1]:.1f} "
            f"| 2 |") in table
    for name in ("digits-curves.png", "digits-acc-vs-time.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000, name
    assert (out / "command.txt").read_text() == f"python -m bench.quality --config tiny --runs {runs} --out {out}\n"
    assert not list(runs.rglob("last.pt")), "checkpoints of finished runs are removed by default"
    for c in cells.values():
        for r in c["runs"]:
            assert (out / "logs" / f"{r['key']}.jsonl").read_bytes() == (runs / r["key"] / "log.jsonl").read_bytes()


def test_a_second_call_skips_every_finished_run(tiny_grid):
    runs, out, _ = tiny_grid
    before = _logs(runs)
    proc = _cli("--config", "tiny", "--runs", str(runs), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "4 runs selected, 4 done or left for later, 0 to run" in proc.stdout
    assert _logs(runs) == before


def test_an_interrupted_run_resumes_exactly_and_the_others_are_skipped(tmp_path, monkeypatch):
    runs, out = tmp_path / "runs", tmp_path / "out"
    first = configs.runs(TINY)[0]
    folder = runs / first.key
    # interrupt the run with the grid's own flags after its first epoch was checkpointed: the second
    # evaluation (epoch 1, before its checkpoint) raises as a Ctrl-C would
    from crosshead.train import loop
    from crosshead.train import main as train_main

    real_evaluate, calls = loop.evaluate, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(TINY.threads)  # as the grid's processes run: the same reductions, the same bits
    try:
        with monkeypatch.context() as m:
            m.setattr(loop, "evaluate", interrupted)
            with pytest.raises(KeyboardInterrupt):
                train_main([*configs.train_argv(first), "--out", str(folder)])
    finally:
        torch.set_num_threads(threads)
    assert grid.epochs_logged(grid.read_log(folder / "log.jsonl")) == {0} and (folder / "last.pt").exists()
    assert grid.status(first, folder) == "resume"
    assert main(["--config", "tiny", "--runs", str(runs), "--out", str(out), "--seeds", "0"]) == 0
    records = grid.read_log(folder / "log.jsonl")
    assert [r["kind"] for r in records].count("resume") == 1
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [0, 1]
    assert grid.status(first, folder) == "done"
    # exact: the same final weights as the same run made without the interruption
    straight = grid.execute(first, tmp_path / "straight", threads=1)
    assert straight["state"] == "start"
    hashes = [[r for r in grid.read_log(d / first.key / "log.jsonl") if r["kind"] == "final"][-1]["state_hash"]
              for d in (runs, tmp_path / "straight")]
    assert hashes[0] == hashes[1]
    done = _logs(runs)
    assert len(done) == 2  # seed 0 only: both attentions
    assert main(["--config", "tiny", "--runs", str(runs), "--out", str(out), "--seeds", "0"]) == 0
    assert _logs(runs) == done


def test_a_run_made_with_all_its_epochs_but_no_final_record_is_done(tmp_path):
    """Killed between its last epoch record and its final record: every planned epoch is logged."""
    runs = tmp_path / "runs"
    first = configs.runs(TINY)[0]
    grid.execute(first, runs, threads=1)
    log = runs / first.key / "log.jsonl"
    log.write_text("".join(line + "\n" for line in log.read_text().splitlines() if '"final"' not in line))
    assert grid.status(first, runs / first.key) == "done"
    assert report.load_run(first, runs)["test_acc"] == grid.read_log(log)[-1]["test_acc"]


def test_a_run_stopped_in_its_first_epoch_starts_again(tmp_path):
    runs = tmp_path / "runs"
    first = configs.runs(TINY)[0]
    folder = runs / first.key
    folder.mkdir(parents=True)
    (folder / "stdout.log").write_text("killed\n")
    assert grid.status(first, folder) == "start"
    res = grid.execute(first, runs, threads=1)
    assert res["state"] == "start" and res["epochs"] == first.task.epochs
    assert grid.status(first, folder) == "done"


@pytest.mark.parametrize("flag,value", [("lr", 0.5), ("epochs", 1), ("epochs", 3)])
def test_a_folder_made_with_other_flags_is_refused_not_overwritten(tmp_path, flag, value):
    runs = tmp_path / "runs"
    first = configs.runs(TINY)[0]
    folder = runs / first.key
    folder.mkdir(parents=True)
    args = grid._planned_args(first)
    args[flag] = value
    log = json.dumps({"kind": "config", "args": args}) + "\n"
    (folder / "log.jsonl").write_text(log)
    assert grid.status(first, folder) == "refused"
    with pytest.raises(grid.GridError, match=rf"other flags.*'{flag}'"):
        grid.run_grid(TINY, runs, log=lambda m: None)
    assert (folder / "log.jsonl").read_text() == log


def test_a_failing_run_stops_the_grid_naming_it(tmp_path, monkeypatch):
    first = configs.runs(TINY)[0]
    real = configs.train_argv
    monkeypatch.setattr(configs, "train_argv", lambda run: real(run) + ["--clip-grad", "-1"])
    with pytest.raises(grid.GridError, match=rf"{first.key}: crosshead.train exited 2"):
        grid.execute(first, tmp_path, threads=1)


def test_cli_refuses_unknown_studies_seeds_and_counts():
    for args, needle in ((["--study", "nope"], "--study 'nope'"), (["--seeds", "7"], "--seeds 7"),
                         (["--jobs", "0"], "--jobs must be >= 1")):
        proc = _cli("--config", "tiny", "--list", *args)
        assert proc.returncode == 2 and needle in proc.stderr, proc.stderr


def test_paired_difference_and_its_student_t_interval():
    d = stats.paired_diff({0: 0.72, 1: 0.83, 2: 0.94}, {0: 0.70, 1: 0.80, 2: 0.90, 3: 0.5})
    assert d["n"] == 3 and d["seeds"] == [0, 1, 2]  # seed 3 has no pair
    assert d["mean"] == pytest.approx(0.03) and d["std"] == pytest.approx(0.01)
    half = 4.303 * 0.01 / math.sqrt(3)
    assert d["ci95"] == pytest.approx([0.03 - half, 0.03 + half])
    assert d["excludes_zero"]
    # differences of 1, 2 and 3 points: the same spread about a smaller mean, so the interval holds 0
    assert not stats.paired_diff({0: 0.71, 1: 0.82, 2: 0.93}, {0: 0.70, 1: 0.80, 2: 0.90})["excludes_zero"]
    assert not stats.paired_diff({0: 0.1, 1: 0.9}, {0: 0.5, 1: 0.5})["excludes_zero"]
    assert stats.paired_diff({0: 0.1}, {0: 0.2}) is None
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 5, 30):
        assert stats.t975(df) == pytest.approx(scipy_stats.t.ppf(0.975, df), abs=5e-4)


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_every_attention_of_a_configuration_builds_within_the_parameter_budget(name):
    """Equal architecture: within one task and head count, parameter counts differ by at most 5 %, but for
    the attentions the configuration names as exceptions, with a reason."""
    import torch

    from crosshead.train import cli

    cfg = presets.CONFIGS[name]
    assert set(configs.ALL_ATTENTIONS) <= {a for s in cfg.studies for a in s.attentions}
    assert min(len(cfg.seeds), 3) == 3
    counts: dict = {}
    for run in configs.runs(cfg):
        if run.seed != cfg.seeds[0]:
            continue
        args = cli.parser().parse_args(configs.train_argv(run))
        from crosshead.train import data

        info = data.DataInfo(1, 2 if run.task.dataset.startswith("pathfinder") else 10, run.task.image_size,
                             (0.0,), (1.0,))
        model = cli.build_model(args, info)
        x = torch.randn(2, 1, run.task.image_size, run.task.image_size)
        assert model(x).shape == (2, info.num_classes)
        counts.setdefault((run.task.name, run.heads), {})[run.attn] = sum(p.numel() for p in model.parameters())
    exceptions = dict(cfg.budget_exceptions)
    for key, per_attn in counts.items():
        kept = [n for a, n in per_attn.items() if a not in exceptions]
        assert (max(kept) - min(kept)) / min(kept) <= configs.BUDGET, (key, per_attn)
    for attn, reason in exceptions.items():  # a declared exception must be one
        assert reason and any((c[attn] - min(c.values())) / min(c.values()) > configs.BUDGET
                              for c in counts.values() if attn in c), attn


def _train_processes(runs: Path) -> list[int]:
    """pids of crosshead.train processes writing under ``runs``."""
    out = []
    for d in Path("/proc").iterdir():
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"crosshead.train" in cmd and any(str(runs).encode() in c for c in cmd):
            out.append(int(d.name))
    return out


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads /proc to find the runs")
def test_sigterm_stops_the_grid_and_its_runs_and_a_new_call_finishes_it(tmp_path):
    import signal
    import time

    runs, out = tmp_path / "runs", tmp_path / "out"
    grid_proc = subprocess.Popen([sys.executable, "-m", "bench.quality", "--config", "tiny", "--runs", str(runs),
                                  "--out", str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not _train_processes(runs):
        assert grid_proc.poll() is None and time.monotonic() < deadline, "no run started"
        time.sleep(0.05)
    grid_proc.send_signal(signal.SIGTERM)
    assert grid_proc.wait(timeout=60) == 143
    assert _train_processes(runs) == []
    # the run in flight (still starting up) was stopped, not waited for, and no other run started
    assert [grid.status(r, runs / r.key) for r in configs.runs(TINY)] == ["start"] * 4
    assert not (out / "summary.json").exists()
    proc = _cli("--config", "tiny", "--runs", str(runs), "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 done or left for later, 4 to run" in proc.stdout
    assert all(c["n"] == 2 for c in json.loads((out / "summary.json").read_text())["studies"][0]["cells"])
