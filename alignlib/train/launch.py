"""Run a job's training: one actor for a one-worker job (`single.py`), Ray Train's `TorchTrainer` otherwise.

Checkpoints are kept under `<output_dir>/train-ray/<name>` (outside the stage directory, which is
only swapped in once training finished), in one layout for both launchers (`checkpoints.py`); a rerun of
the same job after a crash resumes from the latest checkpoint there, and a run that had finished is only
read back. Both launchers give a `TrainResult`.
"""

from __future__ import annotations

import json
import math

from alignlib.locations import StorePath
from alignlib.spec import JobSpec
from alignlib.train.checkpoints import TrainResult, finished

__all__ = ["TrainResult", "metrics_path", "optimizer_steps", "read_metrics", "run_training", "storage_path"]


def global_batch(spec: JobSpec) -> int:
    """Examples per optimizer step, over all workers."""
    return spec.train.batch_size * spec.train.backend.num_workers * spec.train.grad_accum


def optimizer_steps(spec: JobSpec, num_examples: int) -> int:
    """Optimizer steps of the whole run: every epoch's, or `train.max_steps` if fewer."""
    per_epoch = math.ceil(num_examples / global_batch(spec))
    steps = max(1, per_epoch) * spec.train.epochs
    return min(steps, spec.train.max_steps or steps)


def storage_path(spec: JobSpec) -> StorePath:
    """Training runs' storage (checkpoints, metrics): a local directory, or a prefix in the object store."""
    from alignlib.store import location

    return location(spec.output_dir) / "train-ray"


def metrics_path(spec: JobSpec, run_name: str) -> StorePath:
    return storage_path(spec) / run_name / "alignlib-metrics.jsonl"


def read_metrics(path: StorePath) -> tuple[list[dict], list[dict]]:
    """(per-epoch rows, per-step rows) from the loop's metrics log; a resumed step keeps its last line."""
    entries = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    epochs = {e["epoch"]: e for e in entries if e.pop("kind") == "epoch"}
    steps = {e["step"]: e for e in entries if e["epoch"] and "lr" in e}
    return [epochs[k] for k in sorted(epochs)], [steps[k] for k in sorted(steps)]


def one_process(spec: JobSpec) -> bool:
    """One worker and nothing to shard across ranks: trained in one actor (`single.py`), not a Ray Train group.

    DeepSpeed keeps Ray Train even on one worker: its engine sets up a process group of its own."""
    backend = spec.train.backend
    return backend.num_workers == 1 and backend.name != "deepspeed"


def run_training(spec: JobSpec, dataset, num_examples: int, run_name: str, log=print) -> TrainResult:
    """Train on a Ray Dataset of pairs (or SFT rows); the result's checkpoint holds the final model.

    A failure (the training worker, or Ray Train's worker group, failed `train.max_failures` + 1 times) is the
    result's `error`, not raised."""
    total_steps = optimizer_steps(spec, num_examples)
    run = storage_path(spec) / run_name
    if finished(run, spec.train.epochs, total_steps):  # the run had ended; only its stage was not committed
        return TrainResult.read(run)
    if one_process(spec):
        from alignlib.train.single import run_single

        error = run_single(spec, dataset, total_steps, run, metrics_path(spec, run_name), log)
    else:
        error = _run_ray_train(spec, dataset, total_steps, run_name)
    return TrainResult.read(run, error)


def _run_ray_train(spec: JobSpec, dataset, total_steps: int, run_name: str) -> BaseException | None:
    """Ray Train's worker group runs `loop.train_loop`, which writes the run's checkpoints itself; the error it
    gave up on, if any."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    from alignlib.losses import get_loss
    from alignlib.train.data import tokenize_dataset
    from alignlib.train.loop import train_loop

    backend = spec.train.backend
    dataset = tokenize_dataset(dataset, spec, get_loss(spec.train.loss.name).paired)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "spec": spec.model_dump(mode="json"),
            "total_steps": total_steps,
            "metrics_path": str(metrics_path(spec, run_name)),
            "run_dir": str(storage_path(spec) / run_name),
        },
        scaling_config=ScalingConfig(
            num_workers=backend.num_workers,
            use_gpu=backend.use_gpu,
            resources_per_worker=None if backend.use_gpu else {"CPU": 1},
        ),
        torch_config=TorchConfig(backend="nccl" if backend.use_gpu else "gloo"),
        datasets={"train": dataset},
        run_config=RunConfig(
            name=run_name,
            storage_path=str(storage_path(spec)),
            failure_config=FailureConfig(max_failures=spec.train.max_failures),
        ),
    )
    try:
        trainer.fit()
    except TrainingFailedError as error:
        return error
    return None
