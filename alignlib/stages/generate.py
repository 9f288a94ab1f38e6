"""Stage `generate`: sample N answers per training prompt from the policy (and the weak model) in Ray Data engine
actors (`alignlib.generate`).

In: `prompts/train` (this round's slice with `rounds.prompts: fresh`). Out: `generate/completions/<generator>`
(COMPLETION_COLUMNS), one directory per generator (policy, weak, gold), every prompt x sample exactly once
(`verify.check_completions`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from alignlib import schema as S
from alignlib.progress import Progress, counted
from alignlib.raydata import ensure_ray, log, ordered_data
from alignlib.spec import JobSpec, ModelSpec, most
from alignlib.stages import ahead
from alignlib.stages.contract import Stage, StageContext, StageResult
from alignlib.stages.sections import (
    generate_demands,
    generated,
    model_section,
    round_dataset,
    round_prompts,
    sampling,
    seed_key,
)
from alignlib.store import ROWS_PER_FILE, StageWriter, StorePath, copytree, count_rows
from alignlib.verify import check_completions


@dataclass
class GenerateResult(StageResult):
    engine: str
    engine_starts: int
    policy: str  # the model sampled: the job's policy, or in rounds 2+ the previous round's export


def sections(spec: JobSpec) -> dict[str, Any]:
    g = spec.generate
    return {
        "policy": model_section(spec.policy),
        "seed": spec.seed,
        "generate": {
            **g.model_dump(mode="json"),
            "weak_model": model_section(g.weak_model) if g.weak_model else None,
        },
    }


def run(ctx: StageContext, out: StageWriter) -> GenerateResult:
    from alignlib.generate import generate, gold_rows

    ensure_ray()
    spec, g = ctx.spec, ctx.spec.generate
    jobs: list[tuple[str, ModelSpec, int]] = [(S.GENERATOR_POLICY, spec.policy, g.num_samples)]
    if g.weak_model is not None:
        jobs.append((S.GENERATOR_WEAK, g.weak_model, g.weak_model.num_samples))
    # vLLM schedules requests into its own batches as they come (continuous batching), so its numbers
    # are not batch-reproducible anyway; ordering its output would only hold finished rows back behind a
    # slow replica. The transformers engine is reproducible to the byte when its batches are.
    with ordered_data(enabled=g.engine == "transformers"):
        prompts = round_dataset(ctx)
        # One model at a time: each engine gets the whole cluster instead of competing for it.
        total = round_prompts(ctx).num_rows
        started = 0
        for generator, model, n in jobs:
            target = out.table("completions") / generator
            if generator == S.GENERATOR_WEAK and _reuse_weak(ctx, target):
                continue
            if generator == S.GENERATOR_POLICY and ahead.adopt(ctx, target):
                continue
            key = seed_key(ctx, generator)
            log(f"generate: {n} sample(s) per prompt from {generator} model {model.model} ({g.engine})")
            started += most(g.concurrency)
            with Progress(f"generate ({generator})", total * n) as progress:
                completions = generate(prompts, model, sampling(spec), g, generator, n, spec.seed, seed_key=key)
                counted(completions, progress).write_parquet(str(target), min_rows_per_file=ROWS_PER_FILE)
        if spec.data.gold_field is not None:
            prompts.map_batches(gold_rows, batch_format="pyarrow").write_parquet(
                str(out.table("completions") / S.GENERATOR_GOLD), min_rows_per_file=ROWS_PER_FILE
            )
    check_completions(out.table("completions"), _expected(ctx, jobs))
    ahead.clear(ctx)
    return GenerateResult(engine=g.engine, engine_starts=started, policy=spec.policy.model)


def _reuse_weak(ctx: StageContext, target: StorePath) -> bool:
    """Rounds 2+ sampling the same prompts copy round 1's weak-model answers: same model, prompts and seeds,
    so the same answers, without starting its engine again."""
    r = ctx.round
    if r is None or r.number <= 1 or ctx.spec.rounds.prompts != "same" or not r.earlier:
        return False
    first = r.earlier[0].table_path("generate", "completions") / S.GENERATOR_WEAK
    if not first.is_dir():
        return False
    copytree(first, target)
    log(f"generate: weak model's answers reused from round 1 ({count_rows(target)} rows, no engine started)")
    return True


def _expected(ctx: StageContext, jobs: list[tuple[str, ModelSpec, int]]) -> dict[str, tuple[Any, int]]:
    """generator -> (prompt ids as an Arrow array, samples per prompt) the stage must write, each row once."""
    import pyarrow.compute as pc

    prompts = round_prompts(ctx)
    expected = {generator: (prompts[S.PROMPT_ID], n) for generator, _, n in jobs}
    if ctx.spec.data.gold_field is not None:
        expected[S.GENERATOR_GOLD] = (prompts.filter(pc.is_valid(prompts[S.GOLD]))[S.PROMPT_ID], 1)
    return expected


STAGE = Stage(
    name="generate",
    help="sample N answers per prompt from the policy (and the weak model), in Ray Data engine actors",
    run=run,
    result=GenerateResult,
    sections=sections,
    inputs=lambda spec: ["prompts"],
    reads=lambda spec: {"prompts/train": S.PROMPT_COLUMNS},
    enabled=generated,
    enabled_when="data.kind is prompts",
    demands=generate_demands,
    flows=("train", "bon"),
)
