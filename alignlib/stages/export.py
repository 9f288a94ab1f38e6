"""Stage `export`: the trained model as a Hugging Face directory (LoRA merged, or kept as an adapter).

In: the train stage's checkpoint. Out: `export/model`, the pass's model: the next round's policy (`makes_model`),
or with loss reward a one-label sequence-classification reward model that `score.reward` loads.
"""

from __future__ import annotations

from dataclasses import dataclass

from alignlib.raydata import ensure_ray
from alignlib.stages.contract import Demand, Stage, StageContext, StageInputError, StageResult
from alignlib.store import StageWriter, StorePath, location


@dataclass
class ExportResult(StageResult):
    kind: str  # full, merged-lora or lora-adapter; reward-model-full or reward-model-merged-lora for a reward model
    source: str  # the checkpoint's model directory
    model: str  # where the exported model is

    def summary(self, where: StorePath) -> list[str]:
        from alignlib.uri import shown

        what = "reward model" if self.kind.startswith("reward-model-") else "model"
        return [f"  trained {what} ({self.kind}): {shown(self.model)}"]


def run(ctx: StageContext, out: StageWriter) -> ExportResult:
    import ray

    from alignlib.export import export_model
    from alignlib.stages.train import TrainStageResult

    ensure_ray()
    trained = TrainStageResult.from_stats((ctx.store.manifest("train") or {}).get("stats", {}))
    checkpoint = location(str(trained.checkpoint))
    if not (checkpoint / "model").exists():
        raise StageInputError(f"export: the training checkpoint {checkpoint} is gone; rerun `alignlib train`")
    target = out.path / "model"
    task = ray.remote(num_cpus=1)(export_model)
    policy = ctx.spec.policy
    kind: str = ray.get(
        task.remote(  # type: ignore[call-arg]  # Ray's stub knows remote functions of at most 3 arguments
            str(checkpoint / "model"), str(target), policy.model, ctx.spec.export.merge_lora, policy.trust_remote_code
        )
    )
    return ExportResult(kind=kind, source=str(checkpoint / "model"), model=str(out.location / "model"))


STAGE = Stage(
    name="export",
    help="write the trained model as a Hugging Face directory (LoRA merged, or kept as an adapter)",
    run=run,
    result=ExportResult,
    sections=lambda spec: {"export": spec.export.model_dump(mode="json")},
    inputs=lambda spec: ["train"],
    demands=lambda spec: [Demand("export", "export", 1, {"CPU": 1.0})],
    makes_model=True,
)
