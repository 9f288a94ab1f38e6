"""Stage `score`: score every completion with the reward model(s) or function(s) (`alignlib.score`).

In: `generate/completions` (COMPLETION_COLUMNS). Out: `score/scored` (SCORED_COLUMNS, plus one column per named
reward of `score.rewards`), every completion exactly once (`verify.check_scored`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from alignlib import schema as S
from alignlib.progress import Progress, counted
from alignlib.raydata import ensure_ray, ordered_data
from alignlib.stages.contract import FlatResult, Stage, StageContext
from alignlib.stages.sections import generated, score_demands, score_section
from alignlib.store import ROWS_PER_FILE, StageWriter, count_rows, read_table
from alignlib.verify import KEY, check_scored


@dataclass
class ScoreResult(FlatResult):
    """`<column>_mean` for the combined reward and each named reward column."""

    def mean(self, column: str = S.REWARD) -> float | None:
        value = self.values.get(f"{column}_mean")
        return None if value is None else float(value)


def run(ctx: StageContext, out: StageWriter) -> ScoreResult:
    import ray

    from alignlib.score import score

    ensure_ray()
    components = ctx.spec.score.components()
    with ordered_data():
        # Sorted by key and cut into batches by position, so each reward batch holds the same rows
        # whatever order generate wrote them in: Ray Data can put a batch it retried, or held back, later
        # in the file, and a row's reward moves in the last bits with its batch neighbours.
        source = ctx.table_path("generate", "completions")
        completions = ray.data.read_parquet(str(source))
        if any(reward.type == "model" for _, reward, _ in components):
            completions = completions.sort(list(KEY))  # a function's reward of a row has no neighbours
        rows = count_rows(source)
        with Progress("score", rows) as progress:
            counted(score(completions, ctx.spec.score, num_rows=rows), progress).write_parquet(
                str(out.table("scored")), min_rows_per_file=ROWS_PER_FILE
            )
    check_scored(out.table("scored"), source)
    columns = [S.REWARD] + [c for c, _, _ in components if c != S.REWARD]
    return ScoreResult({f"{c}_mean": column_mean(read_table(out.table("scored"), columns=[c])[c]) for c in columns})


def column_mean(values: Any) -> float:
    """The mean of a column's values (Arrow, never Python objects: a scored table can hold millions of rows)."""
    import pyarrow.compute as pc

    mean = pc.mean(values).as_py()
    return float("nan") if mean is None else mean


# What the round figures read of scored and held-out answers.
DATA_COLUMNS = [S.PROMPT_ID, S.GENERATOR, S.REWARD, S.NUM_TOKENS]


def data_figures(scored: Any) -> dict[str, Any]:
    """From a round's own policy samples (an Arrow table with DATA_COLUMNS; Arrow compute, no Python object per
    row, so millions of rows stay cheap): reward mean and max, best-worst gap, tie share, length."""
    import pyarrow.compute as pc

    policy = scored.filter(pc.equal(scored[S.GENERATOR], S.GENERATOR_POLICY))
    spread = policy.group_by(S.PROMPT_ID).aggregate([(S.REWARD, "max"), (S.REWARD, "min")])
    gaps = pc.subtract(spread[f"{S.REWARD}_max"], spread[f"{S.REWARD}_min"])
    return {
        "sample_mean_reward": pc.mean(policy[S.REWARD]).as_py(),
        "sample_max_reward": pc.max(policy[S.REWARD]).as_py(),
        "best_worst_gap": pc.mean(gaps).as_py(),
        "tied_share": pc.mean(pc.cast(pc.equal(gaps, 0), "float64")).as_py(),
        "sample_mean_tokens": pc.mean(policy[S.NUM_TOKENS]).as_py(),
    }


def figures(ctx: StageContext, result: ScoreResult) -> dict[str, Any]:
    return data_figures(read_table(ctx.table_path("score", "scored"), columns=DATA_COLUMNS))


STAGE = Stage(
    name="score",
    help="score every completion with the reward model(s) or function(s)",
    run=run,
    result=ScoreResult,
    sections=lambda spec: {"score": score_section(spec)},
    inputs=lambda spec: ["generate"],
    reads=lambda spec: {"generate/completions": S.COMPLETION_COLUMNS},
    enabled=generated,
    enabled_when="data.kind is prompts",
    demands=score_demands,
    flows=("train", "bon"),
    figures=figures,
)
