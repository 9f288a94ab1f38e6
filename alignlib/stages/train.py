"""Stage `train`: train the policy on the pairs (ORPO, DPO, IPO, SimPO) or the best-of-N set (SFT), or a reward
model on the pairs (loss reward): one worker in one Ray actor, several with Ray Train (`alignlib.train.launch`).

In: `pairs/pairs` or `pairs/sft` (`ref_logps/pairs` with precomputed reference log-probs); with `rounds.train_on:
accumulated`, every earlier round's too. Out: `train/metrics` (per epoch), `train/steps` (per logged step); the
checkpoint under `<output_dir>/train-ray/<run>`, named in the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from alignlib import schema as S
from alignlib.raydata import ensure_ray, log
from alignlib.spec import JobSpec, pair_margins, reference_source
from alignlib.stages.contract import Demand, Stage, StageContext, StageResult
from alignlib.stages.sections import model_section, train_section, training_source, training_table
from alignlib.store import StageWriter, rmtree, write_table


@dataclass
class TrainStageResult(StageResult):
    """The stage's figures (the launcher's own result is `alignlib.train.launch.TrainResult`)."""

    checkpoint: str | None  # the final checkpoint's directory (its `model/` is what export reads)
    examples: int
    final_metrics: dict[str, Any] = field(default_factory=dict)


def _jsonable(metrics: dict[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float, str, bool))}


def run(ctx: StageContext, out: StageWriter) -> TrainStageResult:
    import pyarrow as pa
    import ray

    from alignlib.train.launch import metrics_path, read_metrics, run_training, storage_path

    ensure_ray()
    spec = ctx.spec
    table, source = training_table(spec), training_source(spec)
    paths = [str(ctx.table_path(source, table))]
    if ctx.round is not None and spec.rounds.train_on == "accumulated":
        paths = [str(e.table_path(training_source(e.spec), table)) for e in ctx.round.earlier] + paths
    # Read before the workers start: once they hold their CPUs, a read task could wait forever.
    dataset = ray.data.read_parquet(paths).materialize()
    n = dataset.count()
    backend = spec.train.backend
    rounds = f" (rounds 1-{ctx.round.number})" if ctx.round is not None and len(paths) > 1 else ""
    log(f"train: {spec.train.loss.name} on {n} {table} rows{rounds}, backend {backend.name} x{backend.num_workers}")
    run_name = f"{spec.name}-{ctx.fingerprint('train')}"
    if ctx.force:  # resuming is for the same run after a crash; --force trains from the start
        rmtree(storage_path(spec) / run_name)
    result = run_training(spec, dataset, n, run_name=run_name, log=log)
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}") from result.error
    epochs, steps = read_metrics(metrics_path(spec, run_name))
    write_table(pa.Table.from_pylist(epochs), out.table("metrics"))
    if steps:
        write_table(pa.Table.from_pylist(steps), out.table("steps"))
    return TrainStageResult(checkpoint=result.checkpoint, examples=n, final_metrics=_jsonable(result.metrics))


def figures(ctx: StageContext, result: TrainStageResult) -> dict[str, Any]:
    from alignlib.store import read_table

    metrics = read_table(ctx.table_path("train", "metrics")).to_pylist()
    return {"final_train_loss": metrics[-1].get("train/loss") if metrics else None}


def logged_steps(ctx: StageContext) -> list[dict[str, Any]] | None:
    """The per-step training figures the stage wrote (`train/steps`), or None where it has none."""
    from alignlib.store import read_table

    path = ctx.table_path("train", "steps")
    return read_table(path).to_pylist() if path.exists() else None


def _reads(spec: JobSpec) -> dict[str, list[str]]:
    table = training_table(spec)
    needed = [S.PROMPT_ID, S.MESSAGES] + ([S.CHOSEN, S.REJECTED] if table == "pairs" else [S.COMPLETION])
    if reference_source(spec) == "precomputed":
        needed += [S.REF_CHOSEN_LOGPS, S.REF_REJECTED_LOGPS]
    if pair_margins(spec):
        needed.append(S.MARGIN)
    return {f"{training_source(spec)}/{table}": needed}


def _demands(spec: JobSpec) -> list[Demand]:
    worker = {"CPU": 1.0, "GPU": 1.0} if spec.train.backend.use_gpu else {"CPU": 1.0}
    # Ray Train's workers start together: all of them must fit at once.
    return [Demand("train", "train.backend", spec.train.backend.num_workers, worker, gang=True)]


STAGE = Stage(
    name="train",
    help="train the policy on the pairs (ORPO, DPO, IPO, SimPO) or the best-of-N set (SFT), or a reward model on "
    "the pairs (loss reward): one worker in one Ray actor, several with Ray Train",
    run=run,
    result=TrainStageResult,
    sections=lambda spec: {"policy": model_section(spec.policy), "train": train_section(spec), "seed": spec.seed},
    inputs=lambda spec: [training_source(spec)],
    reads=_reads,
    demands=_demands,
    figures=figures,
)
