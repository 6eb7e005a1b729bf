"""python -m crosshead.train: trains, checkpoints, resumes bit-exactly, evaluates; 2-process gloo DDP agrees."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crosshead.train import cli

pytest.importorskip("sklearn", reason="the digits data set needs scikit-learn")

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--model", "ivit_tiny", "--model-kwargs",
        json.dumps({"dims": [16, 32, 64, 128], "depths": [1, 1, 1, 1], "num_heads": [2, 4]}),
        "--dataset", "digits", "--batch-size", "16", "--max-steps-per-epoch", "3", "--limit-test", "64",
        "--no-progress", "--warmup-epochs", "1", "--device", "cpu", "--drop-path", "0.1"]


def _log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def _same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_train_checkpoint_resume_exact_and_eval(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    final = cli.main(TINY + ["--epochs", "3", "--out", str(straight)])
    cli.main(TINY + ["--epochs", "1", "--out", str(split)])
    resumed = cli.main(TINY + ["--epochs", "3", "--resume", str(split / "last.pt"), "--out", str(split)])
    # same weights, optimizer moments, schedule and RNG as the uninterrupted run
    assert resumed["state_hash"] == final["state_hash"]
    a, b = torch.load(straight / "last.pt", weights_only=False), torch.load(split / "last.pt", weights_only=False)
    _same_state(a["model"], b["model"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        _same_state(sa, sb)
    assert a["scheduler"] == b["scheduler"] and a["epoch"] == b["epoch"] == 2
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])
    # training changed the weights (the comparison above is not between two untouched models)
    assert final["state_hash"] != cli.main(TINY + ["--epochs", "1", "--out", str(tmp_path / "one")])["state_hash"]

    log_a, log_b = _log(straight), _log(split)
    epochs_a = [r for r in log_a if r["kind"] == "epoch"]
    epochs_b = [r for r in log_b if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs_a] == [0, 1, 2] and [r["epoch"] for r in epochs_b] == [0, 1, 2]
    for ra, rb in zip(epochs_a, epochs_b):
        for k in ("train_loss", "train_acc", "test_loss", "test_acc", "lr"):
            assert ra[k] == rb[k], k
    cfg = log_a[0]
    assert cfg["kind"] == "config" and cfg["world_size"] == 1 and cfg["test_samples"] == 64
    assert {"train_img_per_s", "test_acc", "best_acc"} <= epochs_a[-1].keys()

    ev = cli.main(["--eval-only", "--checkpoint", str(straight / "last.pt"), "--out", str(straight),
                   "--no-progress", "--device", "cpu", "--batch-size", "7"])
    assert ev["state_hash"] == final["state_hash"]
    assert ev["test_images"] == 64
    assert ev["test_acc"] == pytest.approx(epochs_a[-1]["test_acc"])
    assert ev["test_loss"] == pytest.approx(epochs_a[-1]["test_loss"], rel=1e-5)
    assert _log(straight)[-1]["kind"] == "eval"


def test_train_pathfinder_cached_amp_bf16(tmp_path):
    cache = tmp_path / "cache"
    res = cli.main(["--model", "deit_imhsa_tiny", "--model-kwargs", json.dumps({"depth": 2, "patch_size": 8}),
                    "--dataset", "pathfinder32", "--train-size", "32", "--test-size", "16", "--cache-dir", str(cache),
                    "--batch-size", "8", "--epochs", "1", "--no-progress", "--device", "cpu", "--amp", "bf16",
                    "--clip-grad", "1.0", "--out", str(tmp_path / "pf")])
    assert res["test_acc"] is not None
    assert sorted(p.name for p in cache.iterdir()) == ["pathfinder32_seed0_test_16.npz", "pathfinder32_seed0_train_32.npz"]


def test_attn_and_unknown_model_flags(tmp_path):
    res = cli.main(TINY + ["--attn", "imhsa_pre", "--epochs", "1", "--max-steps-per-epoch", "1", "--out", str(tmp_path)])
    assert _log(tmp_path)[0]["args"]["attn"] == "imhsa_pre" and res["epochs"] == 1
    with pytest.raises(ValueError, match="unknown"):
        cli.main(TINY + ["--attn", "nope", "--epochs", "1", "--out", str(tmp_path / "x")])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_process_gloo_ranks_agree(tmp_path):
    dump, out = tmp_path / "weights", tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "crosshead.train", *TINY, "--epochs", "2", "--limit-test", "65",
           "--out", str(out), "--dump-weights", str(dump)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = torch.load(dump / "rank0.pt"), torch.load(dump / "rank1.pt")
    s0, s1 = torch.load(dump / "rank0_start.pt"), torch.load(dump / "rank1_start.pt")
    _same_state(s0, s1)
    _same_state(r0, r1)  # DDP kept the replicas identical although each rank saw different batches
    assert any(not torch.equal(r0[k], s0[k]) for k in r0), "training did not change the weights"
    log = _log(out)  # rank 0 alone writes the log
    assert log[0]["world_size"] == 2 and log[0]["test_samples"] == 65  # uneven shards, no padding
    assert all(r["test_images"] == 65 for r in log if r["kind"] == "epoch")
    assert [r["epoch"] for r in log if r["kind"] == "epoch"] == [0, 1]
    assert proc.stdout.count('"kind": "final"') == 1
