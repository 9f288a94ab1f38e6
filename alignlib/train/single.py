"""One-worker training in one Ray actor, without Ray Train's worker group.

A job with one training worker (`train.backend.num_workers: 1` with ddp, and every qlora job) has nothing
to synchronise, yet Ray Train V2 starts a chain of actors before its one worker runs: a controller, a
synchronisation actor, a placement-group cleaner, the worker and a dataset manager, each a fresh
process, about 12 s on a 2-core machine. Here the driver starts one actor with the worker's resources
and it builds the model (imports, weights, LoRA, optimizer) while the driver tokenizes the data; the
same `Trainer` then runs the same epochs over the tokenized blocks, straight from the object store.

What Ray Train gave this path is kept:
- checkpoints after every epoch under `<output_dir>/train-ray/<run>/checkpoint_epoch-N` (local or object
  store), listed in `alignlib-checkpoints.json` once whole, the last two kept;
- a rerun of the same run resumes after the last listed checkpoint;
- `train.max_failures`: a failed or killed worker is replaced and resumes from the last checkpoint.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

INDEX = "alignlib-checkpoints.json"
KEEP_CHECKPOINTS = 2


def checkpoint_name(epoch: int) -> str:
    return f"checkpoint_epoch-{epoch + 1:04d}"


def read_index(run) -> list[dict[str, Any]]:
    """The run's whole checkpoints, oldest first: name, epoch (from 0) and that epoch's metrics."""
    index = run / INDEX
    return json.loads(index.read_text())["checkpoints"] if index.exists() else []


def _write_index(run, entries: list[dict[str, Any]]) -> None:
    text = json.dumps({"checkpoints": entries}, indent=1)
    if isinstance(run, Path):  # a rename, so a reader never sees half a file
        tmp = run / f".{INDEX}.tmp"
        tmp.write_text(text)
        tmp.replace(run / INDEX)
    else:  # an object is replaced whole
        (run / INDEX).write_text(text)


def skip_bitsandbytes() -> None:
    """Make `import bitsandbytes` fail in this process, for a job that quantizes nothing.

    peft imports bitsandbytes whenever it is installed, and bitsandbytes wraps its CPU kernels in
    `torch.compile` at import time, which imports torch's inductor: 1.2-1.5 s of a worker's start-up on 2
    cores. Only for the training actor, a process of its own (no later job in it needs 4-bit layers)."""
    import sys

    # Only before anything has looked: transformers and peft cache whether bitsandbytes is installed.
    if not {"bitsandbytes", "transformers", "peft"} & sys.modules.keys():
        sys.modules["bitsandbytes"] = None  # `import` raises ImportError; find_spec says not installed


class TrainWorker:
    """The Ray actor: builds the `Trainer` on creation, then `fit` trains, checkpoints and resumes."""

    def __init__(self, spec: dict, total_steps: int, metrics_path: str):
        if spec["train"]["backend"]["name"] != "qlora":
            skip_bitsandbytes()
        import torch

        from alignlib.spec import JobSpec
        from alignlib.train.loop import Trainer

        self.spec = JobSpec.model_validate(spec)
        device = _gpu() if self.spec.train.backend.use_gpu else torch.device("cpu")
        self.trainer = Trainer(self.spec, total_steps, device, distributed=False, metrics_path=metrics_path)
        self.trainer.say_reference()

    def fit(self, run_dir: str, blocks: list) -> dict[str, Any]:
        """Train every remaining epoch over `blocks` (object refs of tokenized Arrow tables, in order).

        Returns the last checkpoint's location and its epoch's metrics."""
        from alignlib.store import location

        run = location(run_dir)
        run.mkdir(parents=True, exist_ok=True)
        entries = read_index(run)
        start = 0
        if entries:
            latest = entries[-1]
            finished = latest["epoch"] == self.spec.train.epochs - 1 or latest["metrics"]["step"] >= self.trainer.total_steps
            if finished:  # the run had ended; only its stage was not committed
                return {"checkpoint": str(run / latest["name"]), "metrics": latest["metrics"]}
            start = self._resume(run / latest["name"])
        for epoch in range(start, self.spec.train.epochs):
            metrics = self.trainer.train_epoch(_rows(blocks), epoch)
            entries = self._checkpoint(run, entries, epoch, metrics)
            if self.trainer.done(epoch):
                break
        return {"checkpoint": str(run / entries[-1]["name"]), "metrics": entries[-1]["metrics"]}

    def _resume(self, where) -> int:
        from alignlib.store import copytree

        if isinstance(where, Path):
            return self.trainer.resume(where)
        with tempfile.TemporaryDirectory(prefix="alignlib-resume-") as tmp:
            copytree(where, Path(tmp) / "checkpoint")
            return self.trainer.resume(Path(tmp) / "checkpoint")

    def _checkpoint(self, run, entries: list[dict], epoch: int, metrics: dict) -> list[dict]:
        """Save, list once whole, then drop all but the last `KEEP_CHECKPOINTS` checkpoints."""
        from alignlib.store import copytree, rmtree

        name = checkpoint_name(epoch)
        if isinstance(run, Path):
            tmp = run / f".{name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            self.trainer.save(tmp, epoch)
            shutil.rmtree(run / name, ignore_errors=True)  # a copy left by a worker killed before listing it
            tmp.rename(run / name)
        else:
            with tempfile.TemporaryDirectory(prefix="alignlib-checkpoint-") as tmp:
                self.trainer.save(Path(tmp), epoch)
                rmtree(run / name)
                copytree(Path(tmp), run / name)
        entries = [e for e in entries if e["name"] != name] + [{"name": name, "epoch": epoch, "metrics": metrics}]
        _write_index(run, entries[-KEEP_CHECKPOINTS:])
        for old in entries[:-KEEP_CHECKPOINTS]:
            rmtree(run / old["name"])
        return entries[-KEEP_CHECKPOINTS:]


def _gpu():
    """The GPU Ray gave this actor: device 0 of those it made visible, unless Ray was told not to set them."""
    import os

    import ray
    import torch

    if os.environ.get("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"):
        return torch.device("cuda", int(ray.get_gpu_ids()[0]))
    return torch.device("cuda", 0)


def _rows(blocks: list):
    import ray

    for ref in blocks:
        yield from ray.get(ref).to_pylist()


def run_single(spec, dataset, total_steps: int, run_dir, metrics_file, log) -> dict[str, Any]:
    """Train on one actor; returns {checkpoint, metrics, error}. `dataset` is the untokenized Ray Dataset."""
    import ray

    from alignlib.losses import get_loss
    from alignlib.train.data import driver_table, tokenize_dataset, tokenize_table, tokenizes_in_driver

    backend = spec.train.backend
    options = {"num_cpus": 1, "num_gpus": 1 if backend.use_gpu else 0, "max_restarts": 0}
    actor = ray.remote(TrainWorker).options(**options)
    args = (spec.model_dump(mode="json"), total_steps, str(metrics_file))
    paired = get_loss(spec.train.loss.name).paired
    worker, failures = None, 0
    try:
        if tokenizes_in_driver(dataset):
            # The worker imports torch, transformers and peft and builds the model while this process tokenizes;
            # the rows are read out of Ray Data first, so nothing here waits on the CPU the worker holds.
            table = driver_table(dataset, spec, paired)
            worker = actor.remote(*args)
            blocks = [ray.put(tokenize_table(table, spec, paired))]
            del table
        else:  # a large set is tokenized by a Ray Data actor first: a worker holding its CPU could starve it
            blocks = tokenize_dataset(dataset, spec, paired).to_arrow_refs()
        while True:
            worker = worker or actor.remote(*args)
            try:
                out = ray.get(worker.fit.remote(str(run_dir), blocks))
                return {**out, "error": None}
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as error:
                if failures >= spec.train.max_failures:
                    return {"checkpoint": None, "metrics": {}, "error": error}
                failures += 1
                log(f"train: the training worker failed ({_last_line(error)}); restarting it from the last "
                    f"checkpoint ({failures} of train.max_failures {spec.train.max_failures})")  # fmt: skip
                ray.kill(worker)
                worker = None
                time.sleep(0.5)
    finally:
        if worker is not None:
            ray.kill(worker)


def _last_line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(error).__name__
