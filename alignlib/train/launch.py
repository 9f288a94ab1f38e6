"""Build and run the Ray Train `TorchTrainer` for a job: workers, backend, data and storage.

Checkpoints are kept under `<output_dir>/train-ray/<name>` (outside the stage directory, which is
only swapped in once training finished); Ray Train V2 resumes from the latest checkpoint there
when the same job is run again after a crash.
"""

from __future__ import annotations

import json
import math

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
    """Ray Train's storage: a local directory, or a prefix in the object store output_dir names."""
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


def run_training(spec: JobSpec, dataset, num_examples: int, run_name: str):
    """Train on a Ray Dataset; returns the Ray Train `Result` (its checkpoint is the final model)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from alignlib.losses import get_loss
    from alignlib.train.data import tokenize_dataset
    from alignlib.train.loop import train_loop

    backend = spec.train.backend
    total_steps = optimizer_steps(spec, num_examples)
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
