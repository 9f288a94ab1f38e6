"""Stages `eval` and `baseline`: sample a policy on the held-out prompts and score its answers.

`eval` samples the pass's trained model (and, in a single pass, the starting policy beside it, on the same per-row
seeds) and writes `eval/completions/<generator>` and `eval/summary.json` (mean rewards, win rate). In a multi-round
job the starting policy is sampled once per run instead, by `baseline` (`baseline/completions/base`), the yardstick
of every round. The last model sampled may also draw the next round's candidates (`alignlib.stages.ahead`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from alignlib import schema as S
from alignlib.progress import Progress, counted
from alignlib.raydata import ensure_ray, log, ordered_data
from alignlib.spec import JobSpec, ModelSpec, eval_temperature, most
from alignlib.stages import ahead
from alignlib.stages.contract import Stage, StageContext, StageResult
from alignlib.stages.sections import generate_demands, model_section, sampling, score_demands, score_section
from alignlib.store import StageWriter, StorePath, count_rows, read_table
from alignlib.verify import StageOutputError

if TYPE_CHECKING:
    import pyarrow as pa


@dataclass
class EvalResult(StageResult):
    prompts: int
    base_mean_reward: float
    trained_mean_reward: float
    win_rate: float  # of the trained model over the start, per prompt (a tie counts half)
    engine_starts: int = 0

    def summary(self, where: StorePath) -> list[str]:
        return [
            f"  eval on {self.prompts} held-out prompts: mean reward {self.base_mean_reward:.3f} (start) -> "
            f"{self.trained_mean_reward:.3f} (trained); win rate of trained over start {self.win_rate:.2f}"
        ]


@dataclass
class BaselineResult(StageResult):
    answers: int
    base_mean_reward: float
    engine_starts: int = 0


def _held_out_answers(ctx: StageContext, out: StageWriter, models: list[tuple[str, ModelSpec]]) -> int:
    """Sample each (generator, model) on the held-out prompts, score the answers, write completions/<generator>;
    returns the engines started.

    Every model gets the same per-row seeds (`seed_key="eval"`), so they are compared on identical draws.
    The last model's engine may also sample the next round's candidates (`ahead.part`).
    """
    import ray

    from alignlib.generate import Part, sample_parts
    from alignlib.score import score

    ensure_ray()
    spec = ctx.spec
    drawn = sampling(spec, eval_temperature(spec))
    with ordered_data():
        prompts = ray.data.read_parquet(str(ctx.table_path("prompts", "eval")))
        total = count_rows(ctx.table_path("prompts", "eval")) * spec.eval.num_samples
        for i, (generator, model) in enumerate(models):
            parts = [Part(prompts, generator, spec.eval.num_samples, drawn, spec.seed, "eval")]
            extra = ahead.part(ctx, model) if i == len(models) - 1 else None
            rows = total
            if extra is not None and ctx.round is not None and ctx.round.ahead is not None:
                parts.append(extra)
                rows += ahead.rows(ctx, extra)
                log(
                    f"{out.stage}: sampling the {generator} policy on held-out prompts, and with the same engine "
                    f"round {ctx.round.number + 1}'s {extra.num_samples} candidates per prompt"
                )
            else:
                log(f"{out.stage}: sampling the {generator} policy on held-out prompts")
            with Progress(f"{out.stage} ({generator})", rows) as progress:
                completions = counted(sample_parts(parts, model, spec.generate), progress).materialize()
            held_out = completions.filter(lambda r, g=generator: r[S.GENERATOR] == g) if extra else completions
            score(held_out, spec.score).write_parquet(str(out.table("completions") / generator))
            if extra is not None:
                ahead.write(ctx, completions)
    return len(models) * most(spec.generate.concurrency)


def run_eval(ctx: StageContext, out: StageWriter) -> EvalResult:
    import pyarrow as pa

    spec = ctx.spec
    # The export keeps the policy's own code (if any), so it is trusted exactly as far as the policy is.
    trained = ModelSpec(
        model=str(ctx.store.path("export") / "model"),
        chat_template=spec.policy.chat_template,
        dtype=spec.policy.dtype,
        trust_remote_code=spec.policy.trust_remote_code,
    )
    columns = [S.PROMPT_ID, S.GENERATOR, S.REWARD]
    if ctx.round is None:
        started = _held_out_answers(ctx, out, [(S.GENERATOR_BASE, spec.policy), (S.GENERATOR_TRAINED, trained)])
        rows = read_table(out.table("completions"), columns=columns)
    else:  # the starting policy's answers were sampled once for every round (stage `baseline`)
        started = _held_out_answers(ctx, out, [(S.GENERATOR_TRAINED, trained)])
        rows = pa.concat_tables(
            [
                read_table(out.table("completions"), columns=columns),
                read_table(ctx.table_path("baseline", "completions"), columns=columns),
            ]
        )
    summary = summarize(rows)
    (out.path / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return EvalResult(**summary, engine_starts=started)


def run_baseline(ctx: StageContext, out: StageWriter) -> BaselineResult:
    import pyarrow.compute as pc

    started = _held_out_answers(ctx, out, [(S.GENERATOR_BASE, ctx.spec.policy)])
    rewards = read_table(out.table("completions"), columns=[S.REWARD])[S.REWARD]
    mean = pc.mean(rewards).as_py() if len(rewards) else float("nan")
    return BaselineResult(answers=len(rewards), base_mean_reward=mean, engine_starts=started)


def mean_tokens(answers: pa.Table, generator: str | None = None) -> float | None:
    """Mean answer length in tokens (of `generator` only, if given) over the answers that have one."""
    import pyarrow.compute as pc

    if generator is not None:
        answers = answers.filter(pc.equal(answers[S.GENERATOR], generator))
    return pc.mean(answers[S.NUM_TOKENS]).as_py()  # nulls (answers with no token count) are skipped; None if none


def held_out(ctx: StageContext, stage: str) -> tuple[dict[str, float], float | None]:
    """The held-out answers a stage of this module wrote: (prompt id -> mean reward, mean tokens) of the model it
    judged (the trained one for `eval`, the starting one for `baseline`)."""
    from alignlib.stages.score import DATA_COLUMNS

    generator = S.GENERATOR_TRAINED if stage == "eval" else S.GENERATOR_BASE
    answers = read_table(ctx.table_path(stage, "completions"), columns=DATA_COLUMNS)
    return per_prompt_means(answers, generator), mean_tokens(answers, generator)


def per_prompt_means(table: pa.Table, generator: str | None = None) -> dict[str, float]:
    """prompt id -> mean reward over its samples (of `generator` only, if given), aggregated in Arrow: one Python
    value per prompt, not per row. In prompt-id order, so a mean over them is the same to the last bit however
    Arrow grouped the rows."""
    import pyarrow.compute as pc

    if generator is not None:
        table = table.filter(pc.equal(table[S.GENERATOR], generator))
    means = table.group_by(S.PROMPT_ID).aggregate([(S.REWARD, "mean")])
    return dict(sorted(zip(means[S.PROMPT_ID].to_pylist(), means[f"{S.REWARD}_mean"].to_pylist(), strict=True)))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def summarize(table: pa.Table) -> dict[str, Any]:
    """Mean reward of base and trained policy, and the trained policy's win rate over prompts, from an Arrow table
    with prompt_id, generator and reward.

    Per prompt, each policy's reward is its mean over samples; a win counts 1, a tie 0.5.
    """
    base, trained = (per_prompt_means(table, g) for g in (S.GENERATOR_BASE, S.GENERATOR_TRAINED))
    if base.keys() != trained.keys():
        only = sorted(base.keys() ^ trained.keys())
        raise StageOutputError(f"eval: base and trained policy answered different prompts (e.g. {only[0]})")
    wins = [1.0 if trained[k] > base[k] else 0.5 if trained[k] == base[k] else 0.0 for k in base]
    return {
        "prompts": len(base),
        "base_mean_reward": _mean(list(base.values())),
        "trained_mean_reward": _mean(list(trained.values())),
        "win_rate": _mean(wins),
    }


def sections(spec: JobSpec) -> dict[str, Any]:
    return {
        "policy": model_section(spec.policy),
        "eval": spec.eval.model_dump(mode="json"),
        "sampling": spec.generate.model_dump(mode="json", include={"engine", "max_new_tokens", "temperature", "top_p"}),
        "score": score_section(spec),
        "seed": spec.seed,
    }


def _rounds(spec: JobSpec) -> bool:
    return spec.rounds.count > 1


EVAL = Stage(
    name="eval",
    help="sample the trained policy (and, in a single pass, the starting one) on the held-out prompts and score them",
    run=run_eval,
    result=EvalResult,
    sections=sections,
    inputs=lambda spec: ["prompts", "export"] + (["baseline"] if _rounds(spec) else []),
    reads=lambda spec: {"prompts/eval": S.PROMPT_COLUMNS},
    enabled=lambda spec: spec.eval.enabled,
    enabled_when="eval.enabled is true",
    demands=lambda spec: generate_demands(spec, "eval") + score_demands(spec, "eval"),
    evaluates=True,
)


BASELINE = Stage(
    name="baseline",
    help="rounds: sample the starting policy on the held-out prompts once per run, the yardstick of every round",
    run=run_baseline,
    result=BaselineResult,
    sections=sections,
    inputs=lambda spec: ["prompts"],
    reads=lambda spec: {"prompts/eval": S.PROMPT_COLUMNS},
    enabled=lambda spec: spec.eval.enabled and _rounds(spec),
    enabled_when="eval.enabled is true and rounds.count > 1",
    demands=lambda spec: generate_demands(spec, "baseline") + score_demands(spec, "baseline"),
)
