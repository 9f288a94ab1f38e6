"""Sampling ahead: one vLLM engine draws a model's held-out answers and the next round's candidates.

Round K's trained model is round K+1's policy, so the engine that samples its held-out answers (stage `eval`; for
round 1, the starting policy's `baseline`) can also draw round K+1's candidates, saving one engine start per round.
`alignlib.rounds` sets `RoundContext.ahead` on the pass whose held-out sampling may do this; the candidates wait in
`<round K+1>/.ahead/<generate fingerprint>/policy/` until round K+1's generate stage adopts them. Everything about
that folder lives in this module:

- `part(ctx, model)`: the extra part of the held-out sampling, or None when the next round cannot use it;
- `write(ctx, completions)`: keep the next round's rows, marked whole once written (`DONE`);
- `adopt(ctx, target)`: generate takes them instead of starting an engine.

Only with vLLM: the transformers engine stays byte-reproducible by sampling each stage on its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from alignlib import schema as S
from alignlib.raydata import log
from alignlib.stages.contract import StageContext
from alignlib.stages.sections import round_dataset, round_prompts, sampling, seed_key
from alignlib.store import ROWS_PER_FILE, StorePath, count_rows, move, rmtree

if TYPE_CHECKING:
    import ray.data

    from alignlib.generate import Part
    from alignlib.spec import GenerateSpec, ModelSpec

DONE = "_complete"  # written last: the candidates in the folder are whole


def folder(ctx: StageContext) -> StorePath:
    """Where candidates sampled ahead for this pass's generate stage wait, keyed by its fingerprint."""
    return ctx.store.parent("generate") / ".ahead" / ctx.fingerprint("generate")


def _same_engine(a: GenerateSpec, b: GenerateSpec) -> bool:
    keys = {
        "engine",
        "engine_kwargs",
        "resources",
        "concurrency",
        "batch_size",
        "vllm_runner",
        "accelerator_type",
        "max_pending_requests",
    }
    return a.model_dump(include=keys) == b.model_dump(include=keys)


def part(ctx: StageContext, model: ModelSpec) -> Part | None:
    """The next round's candidates as one more part of this pass's held-out sampling of `model`, when the same
    engine can draw them: the next round samples the same model with the same vLLM settings, and its generate
    stage is still to do."""
    from alignlib.generate import Part

    nxt = ctx.round.ahead if ctx.round is not None else None
    if nxt is None or ctx.spec.generate.engine != "vllm" or nxt.spec.policy != model:
        return None
    if not _same_engine(ctx.spec.generate, nxt.spec.generate) or not nxt.todo(["generate"]):
        return None
    g = nxt.spec.generate
    return Part(
        round_dataset(nxt),
        S.GENERATOR_POLICY,
        g.num_samples,
        sampling(nxt.spec),
        nxt.spec.seed,
        seed_key(nxt, S.GENERATOR_POLICY),
    )


def rows(ctx: StageContext, extra: Part) -> int:
    """How many rows `extra` (from `part`) adds to this pass's sampling."""
    assert ctx.round is not None and ctx.round.ahead is not None
    return round_prompts(ctx.round.ahead).num_rows * extra.num_samples


def write(ctx: StageContext, completions: ray.data.Dataset) -> None:
    """Keep the policy rows of `completions` (this pass's sampling with `part`'s rows in it) for the next round."""
    assert ctx.round is not None and ctx.round.ahead is not None
    nxt = ctx.round.ahead
    target = folder(nxt) / S.GENERATOR_POLICY
    rmtree(target)
    completions.filter(lambda r: r[S.GENERATOR] == S.GENERATOR_POLICY).write_parquet(
        str(target), min_rows_per_file=ROWS_PER_FILE
    )
    (target / DONE).write_text("")
    if nxt.round is not None:
        nxt.round.sampled_ahead = True  # made by this run: adopted even under --force


def adopt(ctx: StageContext, target: StorePath) -> bool:
    """Move candidates sampled ahead for this pass's generate stage to `target`, if whole ones wait; under
    --force only those this run wrote (`RoundContext.sampled_ahead`)."""
    ahead = folder(ctx) / S.GENERATOR_POLICY
    written_now = ctx.round is not None and ctx.round.sampled_ahead
    if (ctx.force and not written_now) or not (ahead / DONE).exists():
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    (ahead / DONE).unlink()
    move(ahead, target)
    log(
        f"generate: the policy's {count_rows(target)} candidates were sampled ahead by the engine that "
        "answered the held-out prompts (no engine started)"
    )
    return True


def clear(ctx: StageContext) -> None:
    """Remove what waited for this pass's generate stage (once it has written its own candidates)."""
    rmtree(folder(ctx).parent)
