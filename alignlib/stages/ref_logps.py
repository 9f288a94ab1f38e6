"""Stage `ref_logps` (DPO/IPO with `train.precompute_reference`): the starting policy's log-probs of every pair,
computed once (`alignlib.train.reference`), so training holds no reference model.

In: `pairs/pairs`. Out: `ref_logps/pairs`, the same rows plus REF_CHOSEN_LOGPS and REF_REJECTED_LOGPS.
"""

from __future__ import annotations

from dataclasses import dataclass

from alignlib import schema as S
from alignlib.raydata import ensure_ray, log, ordered_data
from alignlib.spec import JobSpec, reference_source
from alignlib.stages.contract import Demand, Stage, StageContext, StageResult
from alignlib.stages.sections import model_section, train_section
from alignlib.store import StageWriter, count_rows


@dataclass
class RefLogpsResult(StageResult):
    pairs: int


def run(ctx: StageContext, out: StageWriter) -> RefLogpsResult:
    import ray

    from alignlib.train.reference import reference_logps

    ensure_ray()
    with ordered_data():
        pairs = ray.data.read_parquet(str(ctx.table_path("pairs", "pairs"))).materialize()
        rows = pairs.count()
        log(f"ref_logps: reference log-probs of {rows} pairs under {ctx.spec.policy.model}")
        reference_logps(pairs, ctx.spec).write_parquet(str(out.table("pairs")))
    written = count_rows(out.table("pairs"))
    if written != rows:
        raise RuntimeError(f"ref_logps: {rows} pairs in, {written} rows out; refusing to trust the output")
    return RefLogpsResult(pairs=rows)


def _demands(spec: JobSpec) -> list[Demand]:
    from alignlib.train.reference import reference_pool, reference_resources

    return [Demand("ref_logps", "train.backend", reference_pool(spec)[1], reference_resources(spec))]


STAGE = Stage(
    name="ref_logps",
    help="DPO/IPO: the starting policy's log-probs of every pair, computed once (train.precompute_reference)",
    run=run,
    result=RefLogpsResult,
    sections=lambda spec: {"policy": model_section(spec.policy), "train": train_section(spec)},
    inputs=lambda spec: ["pairs"],
    reads=lambda spec: {"pairs/pairs": S.PAIR_COLUMNS},
    enabled=lambda spec: reference_source(spec) == "precomputed",
    enabled_when="train.precompute_reference is true",
    demands=_demands,
)
