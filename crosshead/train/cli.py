"""``python -m crosshead.train``: train or evaluate an image classifier, on one process or under torchrun.

Examples::

    python -m crosshead.train --model ivit_tiny --dataset digits --epochs 30 --out runs/digits
    python -m crosshead.train --resume runs/digits/last.pt --epochs 40 --out runs/digits
    python -m crosshead.train --eval-only --checkpoint runs/digits/last.pt
    torchrun --nproc_per_node=2 -m crosshead.train --model ivit_tiny --dataset digits --device cpu

Writes ``OUT/log.jsonl`` (one JSON record per line: config, resume, step, epoch, eval, final) and
``OUT/last.pt`` (exact-resume checkpoint) from rank 0. ``--batch-size`` is per process. Refuses, before
any work, flag values that mean nothing, an ``--out`` holding another run, and a damaged checkpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

from . import checkpoint, checks, data, distributed, loop, optim, runlog

MODEL_KEYS = ("model", "attn", "dataset", "image_size", "drop_path", "train_size", "test_size", "seed", "landmarks",
              "model_kwargs", "limit_test", "no_augment")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m crosshead.train", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = ap.add_argument_group("model")
    g.add_argument("--model", default="ivit_tiny", help="crosshead model (ivit_*, deit_imhsa_*) or any timm name")
    g.add_argument("--attn", default=None, help="attention of the iMHSA blocks: imhsa_post, imhsa_pre, "
                   "imhsa_nointeraction, softmax, or a crosshead.baselines name (crosshead models only)")
    g.add_argument("--landmarks", type=int, nargs=2, default=None, metavar=("LH", "LW"), help="landmark grid")
    g.add_argument("--drop-path", type=float, default=None, help="stochastic depth rate (model default if unset)")
    g.add_argument("--model-kwargs", type=json.loads, default=None,
                   help='JSON of extra model arguments, e.g. \'{"dims": [16, 32, 64, 128], "depths": [1, 1, 1, 1]}\'')
    g = ap.add_argument_group("data")
    g.add_argument("--dataset", default="digits", choices=data.NAMES)
    g.add_argument("--data-dir", default=None, help="root of cifar10/100 (torchvision layout) or an ImageFolder")
    g.add_argument("--image-size", type=int, default=None, help="input side, positive (default: per data set)")
    g.add_argument("--train-size", type=int, default=20000, help="pathfinder: training samples")
    g.add_argument("--test-size", type=int, default=2000, help="pathfinder: test samples")
    g.add_argument("--cache-dir", default=None, help="pathfinder: cache generated samples as .npz here")
    g.add_argument("--limit-test", type=int, default=None,
                   help="evaluate on the first N >= 1 test samples only (default: all)")
    g.add_argument("--no-augment", action="store_true")
    g.add_argument("--workers", type=int, default=0, help="data loader processes per rank, started each epoch "
                   "and seeded from (seed, epoch, rank), so resume stays exact")
    g = ap.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=30, help="total epochs (also with --resume), positive")
    g.add_argument("--batch-size", type=int, default=64, help="per process")
    g.add_argument("--opt", default="adamw", choices=["adamw"])
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--min-lr-ratio", type=float, default=0.01, help="final lr / peak lr of the cosine")
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--warmup-epochs", type=float, default=2.0)
    g.add_argument("--clip-grad", type=float, default=None,
                   help="max global gradient norm, > 0 (default: no clipping)")
    g.add_argument("--smoothing", type=float, default=0.0, help="label smoothing")
    g.add_argument("--amp", default="none", choices=sorted(loop.AMP_DTYPES))
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-steps-per-epoch", type=int, default=None, help="cut epochs short (smoke runs)")
    g = ap.add_argument_group("run")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (refused where unavailable)")
    g.add_argument("--out", default="runs/last", help="output directory (log.jsonl, last.pt); one "
                   "holding another run is refused: to continue it use --resume OUT/last.pt")
    g.add_argument("--resume", default=None, help="checkpoint to resume from (exact: model, optimizer, "
                   "scheduler, scaler, RNG, epoch); --epochs is the total; --lr, --weight-decay and the schedule "
                   "flags apply from the next step, model and data flags may not change")
    g.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint (or --resume) and exit")
    g.add_argument("--checkpoint", default=None, help="checkpoint for --eval-only")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--log-every", type=int, default=0, help="also log a step record every N steps")
    g.add_argument("--dump-weights", default=None, help="every rank saves its state dict to DIR/rank{R}_start.pt "
                   "before training (after any resume) and DIR/rank{R}.pt at the end (to compare ranks)")
    return ap


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def state_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        # reshape(-1): a 0-d tensor (BatchNorm's num_batches_tracked) cannot be viewed as bytes
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def build_model(args, info: data.DataInfo) -> torch.nn.Module:
    from .. import models

    kw = dict(num_classes=info.num_classes, in_chans=info.channels, **(args.model_kwargs or {}))
    if args.drop_path is not None:
        kw["drop_path_rate"] = args.drop_path
    if args.model in models.list_models():
        if args.attn:
            kw["attn"] = args.attn
        if args.landmarks:
            kw["landmarks"] = tuple(args.landmarks)
    elif args.attn or args.landmarks:
        raise SystemExit(f"--attn/--landmarks apply to crosshead models only, not {args.model!r}")
    return models.create_model(args.model, **kw)


def loaders(args, d: distributed.Dist, train: bool = True):
    common = dict(image_size=args.image_size, data_dir=args.data_dir, seed=args.seed, train_size=args.train_size,
                  test_size=args.test_size, cache_dir=args.cache_dir)
    if args.cache_dir and args.dataset.startswith("pathfinder"):  # rank 0 fills the cache first
        if d.main:
            if train:
                data.build(args.dataset, "train", **common)
            data.build(args.dataset, "test", **common)
        distributed.barrier(d)
    test_ds, info = data.build(args.dataset, "test", augment=False, **common)
    pin = d.device.type == "cuda"
    n_test = len(test_ds) if args.limit_test is None else min(args.limit_test, len(test_ds))
    shard = Subset(test_ds, range(d.rank, n_test, d.world_size))
    test = DataLoader(shard, batch_size=args.batch_size, shuffle=False, num_workers=args.workers, pin_memory=pin)
    if not train:
        return None, test, None, info
    train_ds, info = data.build(args.dataset, "train", augment=not args.no_augment, **common)
    sampler = DistributedSampler(train_ds, num_replicas=d.world_size, rank=d.rank, shuffle=True, seed=args.seed,
                                 drop_last=True)
    # Workers (not persistent) are started each epoch with seeds drawn from this generator, which
    # set_epoch() seeds from (seed, epoch, rank): their augmentation depends on nothing else, so a
    # resumed run matches an uninterrupted one. With 0 workers the global RNG (checkpointed) serves.
    gen = torch.Generator() if args.workers > 0 else None
    train_dl = DataLoader(train_ds, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                          num_workers=args.workers, pin_memory=pin, generator=gen)
    return train_dl, test, sampler, info


def set_epoch(args, d: distributed.Dist, train_dl: DataLoader, sampler, epoch: int) -> None:
    sampler.set_epoch(epoch)
    if train_dl.generator is not None:
        key = hashlib.sha256(f"crosshead.train workers {args.seed} {epoch} {d.rank}".encode()).digest()
        train_dl.generator.manual_seed(int.from_bytes(key[:8], "little") >> 1)


def evaluate_only(args, d: distributed.Dist, given: frozenset = frozenset()) -> dict:
    path = args.checkpoint or args.resume

    def preflight():
        ckpt = checks.load(path)
        checks.adopt(args, ckpt["args"], MODEL_KEYS, given, path)  # the run flags stay this command's
        checks.data(args)
        return ckpt

    ckpt = checks.gather(d, preflight)
    seed_all(args.seed)
    _, test, _, info = loaders(args, d, train=False)
    model = build_model(args, info).to(d.device)
    checks.restore(ckpt, path, d, model=model, rng=False)
    res = loop.evaluate(model, test, d, amp=args.amp, progress=not args.no_progress)
    rec = {"kind": "eval", "checkpoint": str(path), "epoch": ckpt["epoch"], **res, "state_hash": state_hash(model)}
    runlog.Logger(d, Path(args.out))(rec)
    if d.main:
        print(json.dumps(rec), flush=True)
    return rec


def changes(old: dict, new: dict) -> dict:
    """Flags whose value differs between a checkpoint's run and this one (the --resume path aside)."""
    return {k: {"from": old.get(k), "to": new.get(k)} for k in sorted(old.keys() | new.keys())
            if k != "resume" and old.get(k) != new.get(k)}


def train(args, d: distributed.Dist, given: frozenset = frozenset()) -> dict:
    out = Path(args.out)

    def preflight():
        ckpt = None
        if args.resume:  # the model and data come from the checkpoint; schedule/run flags from the command
            ckpt = checks.load(args.resume)
            checks.adopt(args, ckpt["args"], MODEL_KEYS, given, args.resume)
            checks.epochs_left(args, int(ckpt["epoch"]) + 1, args.resume)
        checks.data(args)
        checks.out_dir(out, args.resume)
        return ckpt

    ckpt = checks.gather(d, preflight)
    seed_all(args.seed)  # same on every rank: identical initial weights
    train_dl, test_dl, sampler, info = loaders(args, d)
    model = build_model(args, info).to(d.device)
    n_params = sum(p.numel() for p in model.parameters())
    steps_per_epoch = len(train_dl) if args.max_steps_per_epoch is None else min(len(train_dl), args.max_steps_per_epoch)
    if steps_per_epoch == 0:
        raise checks.Refusal(f"no full batch of {args.batch_size} per process in {len(train_dl.dataset)} training "
                             "samples: lower --batch-size")
    opt, sched = optim.build(model, lr=args.lr, weight_decay=args.weight_decay, total_steps=args.epochs * steps_per_epoch,
                             warmup_steps=max(int(args.warmup_epochs * steps_per_epoch), 1), min_lr_ratio=args.min_lr_ratio)
    scaler = torch.amp.GradScaler(d.device.type, enabled=args.amp == "fp16")
    start, last_good = 0, None
    if ckpt is not None:
        start = checks.restore(ckpt, args.resume, d, model=model, optimizer=opt, scheduler=sched, scaler=scaler) + 1
        # this command's --lr and --weight-decay, and its schedule continued from the checkpoint's step
        optim.restart_at(opt, sched, lr=args.lr, weight_decay=args.weight_decay, step=start * steps_per_epoch)
        last_good = (args.resume, start - 1)
    else:
        seed_all(args.seed + d.rank)  # per-rank streams for augmentation and stochastic depth
    if args.dump_weights:
        Path(args.dump_weights).mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), Path(args.dump_weights) / f"rank{d.rank}_start.pt")
    net = model
    if d.enabled:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    eval_net = model  # not through DDP: ranks may hold different numbers of test batches
    if args.compile:
        net, eval_net = torch.compile(net), torch.compile(model)
    log = runlog.Logger(d, out)
    run = {"args": vars(args), "params": n_params, "world_size": d.world_size, "device": str(d.device),
           "torch": torch.__version__, "train_samples": len(train_dl.dataset),
           "test_samples": int(distributed.all_reduce_sum(d, [len(test_dl.dataset)])[0]),
           "steps_per_epoch": steps_per_epoch, "start_epoch": start}
    if ckpt is None:
        log({"kind": "config", **run})
    else:  # one config record per log: a resume record says what changed
        dropped = runlog.rewind(log.path, start - 1) if d.main else 0
        changed = changes(ckpt["args"], vars(args))
        if ckpt["world_size"] != d.world_size:
            changed["world_size"] = {"from": ckpt["world_size"], "to": d.world_size}
        log({"kind": "resume", "checkpoint": str(args.resume), "epoch": start - 1, "changed": changed,
             "dropped_records": dropped, **run})
        log.print(f"resumed from {args.resume} after epoch {start - 1}"
                  + "".join(f"; {k} {v['from']} -> {v['to']}" for k, v in changed.items()))
    log.print(f"{args.model} ({args.attn or 'default attn'}) {n_params / 1e6:.2f}M params on {args.dataset} "
              f"{info.image_size}px, {d.world_size} process(es) on {d.device}, epochs {start}..{args.epochs - 1}")
    t_run = time.perf_counter()
    best = ckpt["extra"].get("best_acc", 0.0) if ckpt else 0.0
    rec = {}
    for epoch in range(start, args.epochs):
        set_epoch(args, d, train_dl, sampler, epoch)
        kept = (f"the last good checkpoint, {last_good[0]} (epoch {last_good[1]}), is kept: resume from it, e.g. "
                "with a lower --lr" if last_good else "no checkpoint had been written")
        try:
            tr = loop.train_one_epoch(net, train_dl, opt, sched, scaler, d, epoch=epoch, amp=args.amp,
                                      clip_grad=args.clip_grad, smoothing=args.smoothing, progress=not args.no_progress,
                                      log_every=args.log_every, log_fn=log, max_steps=args.max_steps_per_epoch)
        except FloatingPointError as e:
            raise FloatingPointError(f"{e}; {kept}") from e
        bad = checkpoint.nonfinite(model, opt)  # the last step of an epoch can break the weights unseen
        if bad:
            raise FloatingPointError(f"non-finite {', '.join(bad[:3])} after epoch {epoch}, not saved; {kept}")
        ev = loop.evaluate(eval_net, test_dl, d, amp=args.amp, progress=not args.no_progress)
        best = max(best, ev["test_acc"])
        rec = {"kind": "epoch", "epoch": epoch, **tr, **ev, "best_acc": best,
               "elapsed_s": time.perf_counter() - t_run}
        log(rec)
        log.print(f"epoch {epoch:3d} | loss {tr['train_loss']:.4f} acc {tr['train_acc']:.4f} | test loss "
                  f"{ev['test_loss']:.4f} acc {ev['test_acc']:.4f} | {tr['train_img_per_s']:.0f} img/s/proc | "
                  f"lr {tr['lr']:.2e} | {rec['elapsed_s']:.0f}s")
        checkpoint.save(out / "last.pt", d, model=model, optimizer=opt, scheduler=sched, scaler=scaler,
                        epoch=epoch, args=vars(args), extra={"best_acc": best})
        last_good = (out / "last.pt", epoch)
    final = {"kind": "final", "epochs": args.epochs, "test_acc": rec.get("test_acc"), "best_acc": best,
             "wall_s": time.perf_counter() - t_run, "state_hash": state_hash(model)}
    log(final)
    log.print(json.dumps(final))
    if args.dump_weights:
        Path(args.dump_weights).mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), Path(args.dump_weights) / f"rank{d.rank}.pt")
    return final


def main(argv=None) -> dict:
    ap = parser()
    args = ap.parse_args(argv)
    checks.validate(ap, args)  # exit 2 naming the flag, before anything starts
    given = frozenset(checks.given(parser, argv))
    d = distributed.init(args.device)
    try:
        if args.eval_only:
            return evaluate_only(args, d, given)
        return train(args, d, given)
    finally:
        distributed.shutdown(d)


if __name__ == "__main__":
    main()
