"""Run a job's training: one actor for a one-worker job (`single.py`), Ray Train's `TorchTrainer` otherwise.

Checkpoints are kept under `<output_dir>/train-ray/<name>` (outside the stage directory, which is
only swapped in once training finished); a rerun of the same job after a crash resumes from the
latest checkpoint there (Ray Train V2's own, or `single.py`'s).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from alignlib.spec import JobSpec


def global_batch(spec: JobSpec) -> int:
    """Examples per optimizer step, over all workers."""
    return spec.train.batch_size * spec.train.backend.num_workers * spec.train.grad_accum


def optimizer_steps(spec: JobSpec, num_examples: int) -> int:
    """Optimizer steps of the whole run: every epoch's, or `train.max_steps` if fewer."""
    per_epoch = math.ceil(num_examples / global_batch(spec))
    steps = max(1, per_epoch) * spec.train.epochs
    return min(steps, spec.train.max_steps or steps)


def storage_path(spec: JobSpec):
    """Training runs' storage (checkpoints, metrics): a local directory, or a prefix in the object store."""
    from alignlib.store import location

    return location(spec.output_dir) / "train-ray"


def metrics_path(spec: JobSpec, run_name: str):
    return storage_path(spec) / run_name / "alignlib-metrics.jsonl"


def read_metrics(path) -> tuple[list[dict], list[dict]]:
    """(per-epoch rows, per-step rows) from the loop's metrics log; a resumed step keeps its last line."""
    entries = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    epochs = {e["epoch"]: e for e in entries if e.pop("kind") == "epoch"}
    steps = {e["step"]: e for e in entries if e["epoch"] and "lr" in e}
    return [epochs[k] for k in sorted(epochs)], [steps[k] for k in sorted(steps)]


@dataclass
class TrainResult:
    """A finished (or failed) training run: the last checkpoint's location (a path or URI) and its metrics."""

    checkpoint: str | None
    metrics: dict[str, Any] = field(default_factory=dict)
    error: BaseException | None = None


def one_process(spec: JobSpec) -> bool:
    """One worker and nothing to shard across ranks: trained in one actor (`single.py`), not a Ray Train group.

    DeepSpeed keeps Ray Train even on one worker: its engine sets up a process group of its own."""
    backend = spec.train.backend
    return backend.num_workers == 1 and backend.name != "deepspeed"


def run_training(spec: JobSpec, dataset, num_examples: int, run_name: str, log=print) -> TrainResult:
    """Train on a Ray Dataset of pairs (or SFT rows); the result's checkpoint holds the final model."""
    total_steps = optimizer_steps(spec, num_examples)
    if one_process(spec):
        from alignlib.train.single import run_single

        out = run_single(spec, dataset, total_steps, storage_path(spec) / run_name, metrics_path(spec, run_name), log)
        return TrainResult(**out)
    result = _run_ray_train(spec, dataset, total_steps, run_name)
    checkpoint = checkpoint_location(result.checkpoint) if result.checkpoint is not None else None
    return TrainResult(checkpoint, result.metrics or {}, result.error)


def checkpoint_location(checkpoint) -> str:
    """A Ray Train checkpoint's directory as a path or URI (in an object store, Ray gives a bucket path)."""
    import pyarrow.fs as pafs

    fs = checkpoint.filesystem
    if fs is None or isinstance(fs, pafs.LocalFileSystem):
        return checkpoint.path
    scheme = "gs" if fs.type_name == "gcs" else fs.type_name
    return f"{scheme}://{checkpoint.path}"


def _run_ray_train(spec: JobSpec, dataset, total_steps: int, run_name: str):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
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
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=spec.train.max_failures),
        ),
    )
    return trainer.fit()
