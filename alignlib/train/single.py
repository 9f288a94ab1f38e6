"""One-worker training in one Ray actor, without Ray Train's worker group.

A job with one training worker (`train.backend.num_workers: 1` with ddp, and every qlora job) has nothing
to synchronise, yet Ray Train V2 starts a chain of actors before its one worker runs: a controller, a
synchronisation actor, a placement-group cleaner, the worker and a dataset manager, each a fresh
process, about 12 s on a 2-core machine. Here the driver starts one actor with the worker's resources
and it builds the model (imports, weights, LoRA, optimizer) while the driver tokenizes the data; the
same `Trainer` then runs the same epochs over the tokenized blocks, straight from the object store.

What Ray Train gives its worker group is kept:
- checkpoints after every epoch, resumed after by a rerun of the same run: `Trainer.fit`, in the layout of
  `checkpoints.py`, the same as Ray Train's workers write;
- `train.max_failures`: a failed or killed worker is replaced and resumes from the last checkpoint.
"""

from __future__ import annotations

import time
from typing import Any


def skip_bitsandbytes() -> None:
    """Make `import bitsandbytes` fail in this process, for a job that quantizes nothing.

    peft imports bitsandbytes whenever it is installed, and bitsandbytes wraps its CPU kernels in
    `torch.compile` at import time, which imports torch's inductor: 1.2-1.5 s of a worker's start-up on 2
    cores. Only for the training actor, a process of its own (no later job in it needs 4-bit layers)."""
    import sys

    # Only before anything has looked: transformers and peft cache whether bitsandbytes is installed.
    if not {"bitsandbytes", "transformers", "peft"} & sys.modules.keys():
        sys.modules["bitsandbytes"] = None  # type: ignore[assignment]  # `import` raises ImportError; find_spec says not installed


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

    def fit(self, run_dir: str, blocks: list) -> None:
        """Train every remaining epoch of the run in `run_dir` over `blocks` (object refs of tokenized Arrow
        tables, in order), with a checkpoint after each."""
        from alignlib.store import location

        self.trainer.fit(location(run_dir), lambda: _rows(blocks))


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


def run_single(spec, dataset, total_steps: int, run_dir, metrics_file, log) -> BaseException | None:
    """Train on one actor; the error it gave up on, if any. `dataset` is the untokenized Ray Dataset."""
    import ray

    from alignlib.losses import get_loss
    from alignlib.train.data import driver_table, tokenize_dataset, tokenize_table, tokenizes_in_driver

    backend = spec.train.backend
    options = {"num_cpus": 1, "num_gpus": 1 if backend.use_gpu else 0, "max_restarts": 0}
    actor: Any = ray.remote(TrainWorker).options(**options)  # Ray's stubs type neither .remote nor the handle
    args = (spec.model_dump(mode="json"), total_steps, str(metrics_file))
    paired = get_loss(spec.train.loss.name).paired
    worker: Any = None
    failures = 0
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
                ray.get(worker.fit.remote(str(run_dir), blocks))
                return None
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as error:
                if failures >= spec.train.max_failures:
                    return error
                failures += 1
                log(
                    f"train: the training worker failed ({_last_line(error)}); restarting it from the last "
                    f"checkpoint ({failures} of train.max_failures {spec.train.max_failures})"
                )
                ray.kill(worker)
                worker = None
                time.sleep(0.5)
    finally:
        if worker is not None:
            ray.kill(worker)


def _last_line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(error).__name__
