"""python -m crosshead.train: trains, checkpoints, resumes bit-exactly, evaluates; 2-process gloo DDP agrees;
refuses, before any work, what would lose or silently change work (issue #14)."""

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from crosshead.train import checkpoint, cli, loop

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


# --- issue #14: never lose or silently change work ------------------------------------------------
# Each fault found by injection (kills at chosen moments, damaged files, odd flags) is either correct
# behaviour or a refusal before any work; the refusals exit through SystemExit naming the flag or file.

BAD_FLAGS = [  # the message must name the first word
    ["--clip-grad", "-1"], ["--clip-grad", "0"], ["--clip-grad", "nan"], ["--image-size", "0"], ["--limit-test", "0"],
    ["--epochs", "0"], ["--epochs", "-2"], ["--batch-size", "0"], ["--lr", "0"], ["--lr", "inf"],
    ["--weight-decay", "-0.1"], ["--workers", "-1"], ["--max-steps-per-epoch", "0"], ["--smoothing", "1.5"],
    ["--min-lr-ratio", "2"], ["--warmup-epochs", "-1"], ["--drop-path", "1"], ["--log-every", "-1"],
    ["--train-size", "0"], ["--landmarks", "0", "4"], ["--model-kwargs", "[1]"], ["--checkpoint", "x.pt"],
    ["--eval-only"], ["--device", "nonsense"],
]


@pytest.mark.parametrize("bad", BAD_FLAGS, ids=" ".join)
def test_meaningless_flag_values_refused_before_work(tmp_path, capsys, bad):
    with pytest.raises(SystemExit) as e:
        cli.main(TINY + bad + ["--out", str(tmp_path / "run")])
    assert e.value.code == 2  # argparse's usage error
    assert bad[0] in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where CUDA is unavailable")
def test_device_cuda_without_cuda_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(TINY + ["--device", "cuda", "--out", str(tmp_path / "run")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--device cuda" in err and ("CPU-only build" in err or "no cuda device" in err)


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    """A finished 1-epoch run (step records every step); tests copy it before touching it. With a 1-epoch
    warm-up, epoch 0 is the same whatever the --epochs total."""
    out = tmp_path_factory.mktemp("one_epoch") / "run"
    cli.main(TINY + ["--epochs", "1", "--log-every", "1", "--out", str(out)])
    return out


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_epochs") / "run"
    final = cli.main(TINY + ["--epochs", "2", "--log-every", "1", "--out", str(out)])
    return out, final


def _copy(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def _resume(run, *extra):
    return cli.main(TINY + ["--epochs", "2", "--log-every", "1", "--resume", str(run / "last.pt"),
                            "--out", str(run), *extra])


def _files(run):
    return {p.name: p.read_bytes() for p in sorted(Path(run).iterdir())}


def _assert_no_duplicates(log):
    assert sum(r["kind"] == "config" for r in log) == 1
    assert [r["epoch"] for r in log if r["kind"] == "epoch"] == [0, 1]
    steps = [(r["epoch"], r["step"]) for r in log if r["kind"] == "step"]
    assert steps == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)]


def test_existing_out_refused_and_left_unchanged(tmp_path, one_epoch):
    run = _copy(one_epoch, tmp_path)
    before = _files(run)
    with pytest.raises(SystemExit, match=r"already holds log.jsonl and last.pt .*--resume"):
        cli.main(TINY + ["--epochs", "1", "--out", str(run)])
    # resuming another run's checkpoint into it would overwrite its last.pt and mix the logs
    other = _copy(one_epoch, tmp_path / "other")
    with pytest.raises(SystemExit, match="would overwrite or mix into"):
        cli.main(TINY + ["--epochs", "2", "--resume", str(other / "last.pt"), "--out", str(run)])
    (run / "last.pt").unlink()  # a run killed before its first checkpoint: its log is kept too
    with pytest.raises(SystemExit, match="already holds log.jsonl of an earlier run"):
        cli.main(TINY + ["--epochs", "1", "--out", str(run)])
    assert _files(run) == {k: v for k, v in before.items() if k != "last.pt"}


def test_resume_refuses_changed_model_flags_and_nothing_to_do(tmp_path, one_epoch):
    run = _copy(one_epoch, tmp_path)
    before = _files(run)
    with pytest.raises(SystemExit, match=r"--image-size 64 differs from checkpoint .*last.pt's None"):
        _resume(run, "--image-size", "64")
    with pytest.raises(SystemExit, match=r"--seed 1 differs"):
        _resume(run, "--seed", "1")
    with pytest.raises(SystemExit, match=r"has finished 1 epoch\(s\) .*--epochs 1 leaves nothing to train"):
        _resume(run, "--epochs", "1")
    with pytest.raises(SystemExit, match=r"checkpoint .*nope.pt does not exist"):
        cli.main(TINY + ["--resume", str(run / "nope.pt"), "--out", str(tmp_path / "new")])
    assert _files(run) == before


def _flip_tensor_bytes(path):
    """Flips bytes in the middle of the largest tensor's data: torch's zip reader does not notice."""
    with zipfile.ZipFile(path) as z:
        rec = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(rec.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        f.seek(rec.header_offset + 30 + name_len + extra_len + rec.file_size // 2)
        b = f.read(4)
        f.seek(-4, 1)
        f.write(bytes(x ^ 0x5A for x in b))


def _tensors(ckpt):
    return [*ckpt["model"].values(), *(t for st in ckpt["optimizer"]["state"].values() for t in st.values())]


def test_damaged_checkpoint_refused(tmp_path, one_epoch):
    run = _copy(one_epoch, tmp_path)
    good = torch.load(run / "last.pt", weights_only=False)
    _flip_tensor_bytes(run / "last.pt")
    flipped = torch.load(run / "last.pt", weights_only=False)  # loads without complaint...
    assert any(not torch.equal(a, b) for a, b in zip(_tensors(good), _tensors(flipped)))
    before = _files(run)
    pattern = f"checkpoint {run / 'last.pt'} is corrupted"
    with pytest.raises(SystemExit, match=pattern):  # ...but not past the checksum
        _resume(run)
    with pytest.raises(SystemExit, match=pattern):
        cli.main(["--eval-only", "--checkpoint", str(run / "last.pt"), "--out", str(run), "--device", "cpu"])
    assert _files(run) == before

    data = (one_epoch / "last.pt").read_bytes()
    (run / "last.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(SystemExit, match="is unreadable"):
        _resume(run)

    good["model"][next(k for k in good["model"] if k.endswith("weight"))].view(-1)[0] = float("nan")
    good["sha256"] = checkpoint.digest(good)  # intact file, broken content
    torch.save(good, run / "last.pt")
    with pytest.raises(SystemExit, match="holds non-finite values in"):
        _resume(run)


def test_nan_keeps_last_good_checkpoint_and_resume_applies_new_lr(tmp_path, monkeypatch, one_epoch, two_epochs):
    run = _copy(one_epoch, tmp_path)
    ckpt0 = (run / "last.pt").read_bytes()
    real, calls = torch.nn.functional.cross_entropy, []

    def nan_at_epoch1_step1(logits, y, **kw):
        loss = real(logits, y, **kw)
        if kw.get("reduction", "mean") == "mean":  # training, not evaluation
            calls.append(1)
            if len(calls) == 2:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(loop.F, "cross_entropy", nan_at_epoch1_step1)
    with pytest.raises(FloatingPointError, match=r"epoch 1 step 1.*last good checkpoint.*\(epoch 0\), is kept"):
        _resume(run)
    monkeypatch.undo()
    assert (run / "last.pt").read_bytes() == ckpt0

    # the usual recovery: resume with a lower lr (and another weight decay); both take effect
    _resume(run, "--lr", "5e-4", "--weight-decay", "0.01")
    log = _log(run)
    _assert_no_duplicates(log)
    resumes = [r for r in log if r["kind"] == "resume"]
    assert len(resumes) == 2 and resumes[-1]["dropped_records"] == 1  # the step record before the NaN
    changed = resumes[-1]["changed"]
    assert changed["lr"] == {"from": 1e-3, "to": 5e-4} and changed["weight_decay"] == {"from": 0.05, "to": 0.01}
    assert set(changed) == {"lr", "weight_decay", "epochs", "out"}  # out: this test copied the run
    ck = torch.load(run / "last.pt", weights_only=False)
    assert [g["weight_decay"] for g in ck["optimizer"]["param_groups"]] == [0.01, 0.0]
    assert [g["initial_lr"] for g in ck["optimizer"]["param_groups"]] == [5e-4, 5e-4]
    assert ck["scheduler"]["base_lrs"] == [5e-4, 5e-4]
    # the schedule continued from the restored step with the new peak: half the uninterrupted run's lr
    lr_resumed = [r["lr"] for r in log if r["kind"] in ("epoch", "step") and r["epoch"] == 1]
    lr_straight = [r["lr"] for r in _log(two_epochs[0]) if r["kind"] in ("epoch", "step") and r["epoch"] == 1]
    assert lr_resumed == pytest.approx([lr / 2 for lr in lr_straight], rel=1e-12)


def test_nan_weights_after_an_epoch_not_checkpointed(tmp_path, monkeypatch, one_epoch):
    run = _copy(one_epoch, tmp_path)
    ckpt0 = (run / "last.pt").read_bytes()
    real = loop.train_one_epoch

    def breaks_weights_on_last_step(model, *a, **kw):
        res = real(model, *a, **kw)
        next(model.parameters()).data.view(-1)[0] = float("inf")
        return res

    monkeypatch.setattr(loop, "train_one_epoch", breaks_weights_on_last_step)
    with pytest.raises(FloatingPointError, match=r"non-finite .* after epoch 1, not saved; the last good checkpoint"):
        _resume(run)
    assert (run / "last.pt").read_bytes() == ckpt0


class _Killed(BaseException):
    pass


def test_kill_between_log_line_and_checkpoint_leaves_no_duplicates(tmp_path, monkeypatch, one_epoch, two_epochs):
    run = _copy(one_epoch, tmp_path)

    def killed(*a, **kw):
        raise _Killed  # the epoch-1 record is in the log, its checkpoint never written

    monkeypatch.setattr(checkpoint, "save", killed)
    with pytest.raises(_Killed):
        _resume(run)
    monkeypatch.undo()
    assert [r["epoch"] for r in _log(run) if r["kind"] == "epoch"] == [0, 1]
    with open(run / "log.jsonl", "a") as f:
        f.write('{"time": 1, "kind": "ste')  # and a record cut short by the kill
    final = _resume(run)
    log = _log(run)
    _assert_no_duplicates(log)
    assert [r["dropped_records"] for r in log if r["kind"] == "resume"] == [0, 5]  # 3 steps, epoch, cut line
    assert final["state_hash"] == two_epochs[1]["state_hash"]
    straight = [r for r in _log(two_epochs[0]) if r["kind"] == "epoch"]
    for ra, rb in zip(straight, [r for r in log if r["kind"] == "epoch"]):
        assert (ra["train_loss"], ra["test_acc"], ra["lr"]) == (rb["train_loss"], rb["test_acc"], rb["lr"])


def test_resume_exact_with_workers(tmp_path):
    args = TINY + ["--workers", "2", "--limit-test", "16"]
    straight = cli.main(args + ["--epochs", "2", "--out", str(tmp_path / "straight")])
    cli.main(args + ["--epochs", "1", "--out", str(tmp_path / "split")])
    resumed = cli.main(args + ["--epochs", "2", "--resume", str(tmp_path / "split" / "last.pt"),
                               "--out", str(tmp_path / "split")])
    assert resumed["state_hash"] == straight["state_hash"]


def _image_folders(root, train, val):
    from PIL import Image

    for split, classes in (("train", train), ("val", val)):
        for i, c in enumerate(classes):
            (root / split / c).mkdir(parents=True)
            for j in range(2):
                Image.new("RGB", (8, 8), (40 * i, 10 * j, 0)).save(root / split / c / f"{j}.png")


IMAGEFOLDER = ["--dataset", "imagefolder", "--image-size", "32", "--epochs", "1", "--batch-size", "2",
               "--no-progress", "--device", "cpu", "--model-kwargs", json.dumps({"dims": [16, 32, 64, 128],
                                                                                "depths": [1, 1, 1, 1]})]


def test_imagefolder_class_sets_compared_before_work(tmp_path):
    renamed, extra = tmp_path / "renamed", tmp_path / "extra"
    _image_folders(renamed, ["cat", "dog"], ["cat", "dgo"])
    _image_folders(extra, ["cat", "dog"], ["cat", "dog", "eel"])
    with pytest.raises(SystemExit, match=r"only in train: \['dog'\], only in val: \['dgo'\]"):
        cli.main(IMAGEFOLDER + ["--data-dir", str(renamed), "--out", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match=r"only in train: \[\], only in val: \['eel'\]"):
        cli.main(IMAGEFOLDER + ["--data-dir", str(extra), "--out", str(tmp_path / "b")])
    with pytest.raises(SystemExit, match="--data-dir is not read by --dataset digits"):
        cli.main(TINY + ["--data-dir", str(extra), "--out", str(tmp_path / "c")])
    assert not any((tmp_path / x).exists() for x in "abc")


def test_imagefolder_same_classes_trains(tmp_path):
    pytest.importorskip("torchvision", reason="the imagefolder data set needs torchvision")
    _image_folders(tmp_path / "data", ["cat", "dog"], ["cat", "dog"])
    res = cli.main(IMAGEFOLDER + ["--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "run")])
    assert res["test_acc"] is not None and _log(tmp_path / "run")[0]["test_samples"] == 4


def test_state_hash_covers_zero_dim_buffers_of_any_dtype():
    """BatchNorm's num_batches_tracked is a 0-d int64 buffer: the hash reads it (and so changes with it)
    instead of failing at the end of a run, as it did for DeiT's conv stem."""
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    before = cli.state_hash(model)
    model[1].num_batches_tracked += 1
    assert cli.state_hash(model) != before
    model[1].num_batches_tracked -= 1
    assert cli.state_hash(model) == before


def test_a_run_of_a_model_with_batchnorm_ends_with_its_final_record(tmp_path):
    kwargs = {"embed_dim": 16, "depth": 1, "num_heads": 2, "patch_size": 4, "img_size": 16, "stem": "conv",
              "cpe": True}
    final = cli.main(["--model", "deit_imhsa_tiny", "--model-kwargs", json.dumps(kwargs), "--image-size", "16",
                      *TINY[2 + 2:], "--epochs", "1", "--out", str(tmp_path / "bn")])
    assert final["kind"] == "final" and len(final["state_hash"]) == 64
