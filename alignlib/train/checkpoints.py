"""One checkpoint layout, and one result, for both launchers (Ray Train's worker group and the one-process actor).

A run's checkpoints live under `<output_dir>/train-ray/<run>/` (a local directory or an object-store prefix):

- `checkpoint_epoch-NNNN/` after each epoch (N from 1): what the backend saves (`model/`, a whole HF directory
  with the tokenizer; `state.pt`, or DeepSpeed's `deepspeed/` with every rank's shard) and `epoch`;
- `alignlib-checkpoints.json` lists them, oldest first, with their epoch (from 0) and that epoch's metrics. A
  checkpoint is listed only once whole, and only the last `KEEP` are kept;
- a rerun of the same run resumes after the last listed checkpoint, and a run whose last listed checkpoint ends
  training is finished: its result is read back from the index without training.

Every rank writes its part of a checkpoint; rank 0 lists it and prunes. Ray Train only runs the worker group
(and restarts it, `train.max_failures`); it is given no checkpoint of its own.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from alignlib.locations import StorePath, copytree, rmtree

INDEX = "alignlib-checkpoints.json"
KEEP = 2


class Worker(Protocol):
    """What a checkpoint needs of a training worker (`loop.Trainer`): its rank, and its part of a checkpoint."""

    rank: int

    def save(self, directory: Path, epoch: int) -> None: ...

    def resume(self, directory: Path) -> int: ...


@dataclass
class TrainResult:
    """A finished (or failed) training run: the last checkpoint's location (a path or URI) and its metrics."""

    checkpoint: str | None
    metrics: dict[str, Any] = field(default_factory=dict)
    error: BaseException | None = None

    @classmethod
    def read(cls, run: StorePath, error: BaseException | None = None) -> TrainResult:
        """The result of a run from its index (nothing but the error when it failed)."""
        last = None if error is not None else latest(run)
        if last is None:
            return cls(None, {}, error)
        return cls(str(run / last["name"]), last["metrics"])


def checkpoint_name(epoch: int) -> str:
    return f"checkpoint_epoch-{epoch + 1:04d}"


def read_index(run: StorePath) -> list[dict[str, Any]]:
    """The run's whole checkpoints, oldest first: name, epoch (from 0) and that epoch's metrics."""
    index = run / INDEX
    return json.loads(index.read_text())["checkpoints"] if index.exists() else []


def latest(run: StorePath) -> dict[str, Any] | None:
    entries = read_index(run)
    return entries[-1] if entries else None


def last_epoch(epoch: int, step: int, epochs: int, total_steps: int) -> bool:
    """Training ends with `epoch` (from 0): the last one, or `total_steps` reached by optimizer step `step`."""
    return epoch == epochs - 1 or step >= total_steps


def finished(run: StorePath, epochs: int, total_steps: int) -> bool:
    """Whether the run's last listed checkpoint ends training (its stage may not have been committed)."""
    last = latest(run)
    return last is not None and last_epoch(last["epoch"], last["metrics"]["step"], epochs, total_steps)


def save(
    run: StorePath, trainer: Worker, epoch: int, metrics: dict[str, Any], sync: Callable[[], None] | None = None
) -> None:
    """The checkpoint after `epoch`: every rank writes its part, then rank 0 lists it and drops the oldest.

    `sync` waits for every rank (Ray Train's barrier; None in one process). Locally the parts are written
    into `.checkpoint_epoch-N.tmp` and renamed into place; in an object store each rank uploads its part
    and the index, written last, is what makes it a checkpoint."""
    sync = sync or (lambda: None)
    name = checkpoint_name(epoch)
    lead = trainer.rank == 0
    if isinstance(run, Path):
        staging = run / f".{name}.tmp"
        if lead:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        sync()
        trainer.save(staging, epoch)
        sync()
        if lead:
            shutil.rmtree(run / name, ignore_errors=True)  # a copy left by a worker killed before listing it
            staging.rename(run / name)
    else:
        with tempfile.TemporaryDirectory(prefix="alignlib-checkpoint-") as tmp:
            trainer.save(Path(tmp), epoch)
            if lead:
                rmtree(run / name)
            sync()
            if any(Path(tmp).iterdir()):  # under DDP only rank 0 has files
                copytree(Path(tmp), run / name)
        sync()
    if lead:
        _list(run, {"name": name, "epoch": epoch, "metrics": metrics})


def _list(run: StorePath, entry: dict[str, Any]) -> None:
    """Add a whole checkpoint to the index, then delete all but the last `KEEP`."""
    entries = [e for e in read_index(run) if e["name"] != entry["name"]] + [entry]
    text = json.dumps({"checkpoints": entries[-KEEP:]}, indent=1)
    if isinstance(run, Path):  # a rename, so a reader never sees half a file
        tmp = run / f".{INDEX}.tmp"
        tmp.write_text(text)
        tmp.replace(run / INDEX)
    else:  # an object is replaced whole
        (run / INDEX).write_text(text)
    for old in entries[:-KEEP]:
        rmtree(run / old["name"])


def resume(run: StorePath, trainer: Worker) -> int:
    """Restore `trainer` from the run's last listed checkpoint; the epoch to start from (0 when none is listed)."""
    last = latest(run)
    if last is None:
        return 0
    where = run / last["name"]
    if isinstance(where, Path):
        return trainer.resume(where)
    with tempfile.TemporaryDirectory(prefix="alignlib-resume-") as tmp:
        copytree(where, Path(tmp) / "checkpoint")
        return trainer.resume(Path(tmp) / "checkpoint")
