"""``OUT/log.jsonl``: one JSON record per line, appended by rank 0, never deleted.

On resume the records of epochs after the checkpoint (written before a kill that came ahead of their
checkpoint) are dropped, since those epochs are trained again; ``rewind`` does it atomically.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from . import distributed

REDONE_KINDS = ("epoch", "step")  # the records that belong to one epoch and are written again on resume


class Logger:
    def __init__(self, d: distributed.Dist, out: Path):
        self.d, self.path = d, Path(out) / "log.jsonl"
        if d.main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists() and self.path.stat().st_size:
                with open(self.path, "rb+") as f:  # a line cut short by a kill stays on a line of its own
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        f.write(b"\n")

    def __call__(self, record: dict) -> None:
        if self.d.main:
            with open(self.path, "a") as f:
                f.write(json.dumps({"time": time.time(), **record}) + "\n")

    def print(self, *a) -> None:
        if self.d.main:
            print(*a, flush=True)


def rewind(path: str | os.PathLike, epoch: int) -> int:
    """Drops from the log at ``path`` the epoch and step records of epochs after ``epoch``, and lines
    that are not JSON (cut short by a kill); keeps everything else in order. Returns the number of lines
    dropped. The file is replaced atomically, and only if something is dropped."""
    path = Path(path)
    if not path.exists():
        return 0
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            dropped += line.strip() != ""
            continue
        if isinstance(rec, dict) and rec.get("kind") in REDONE_KINDS and rec.get("epoch", -1) > epoch:
            dropped += 1
            continue
        keep.append(line)
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)
    return dropped
