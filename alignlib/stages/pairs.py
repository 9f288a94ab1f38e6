"""Stage `pairs`: scored completions -> preference pairs and a best-of-N SFT set (the rules: `alignlib.pairs`),
or an imported preference file's pairs; and the data-quality report.

In: `score/scored` (SCORED_COLUMNS), or `prompts/preferences` for an imported set. Out: `pairs/pairs`
(PAIR_COLUMNS), `pairs/sft` (SFT_COLUMNS), `pairs/report.html`. Small tables are paired in the driver; larger ones
on Ray Data (`alignlib.pairs_data`), the driver holding only sums and a sample.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from alignlib import schema as S
from alignlib.raydata import ensure_ray, log
from alignlib.spec import JobSpec
from alignlib.stages.contract import Stage, StageContext, StageInputError, StageResult
from alignlib.stages.sections import fresh, generated, round_prompts, training_table
from alignlib.store import StageWriter, StorePath, count_rows, read_table, write_table
from alignlib.verify import KEY

# Scored tables up to this many rows are paired in the driver (one process, no Ray Data start-up: the fastest
# for small jobs); larger ones on Ray Data, across the cluster, the driver holding only sums and a sample.
# The environment variable ALIGNLIB_PAIRS_DRIVER_MAX_ROWS moves the line (0: always Ray Data).
DRIVER_PAIRS_MAX_ROWS = 200_000


@dataclass
class PairsResult(StageResult):
    """`counts`: pairs kept per strategy (`pairs_<strategy>`), drops by reason (`dropped_<reason>`) and the other
    counts of `alignlib.pairs`; stored flat beside `quality` (the data-quality figures) and `warnings`."""

    counts: dict[str, Any] = field(default_factory=dict)
    quality: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def stats(self) -> dict[str, Any]:
        return {**self.counts, "quality": self.quality, "warnings": self.warnings}

    @classmethod
    def from_stats(cls, stats: dict[str, Any]) -> PairsResult:
        counts = {k: v for k, v in stats.items() if k not in ("quality", "warnings")}
        return cls(counts, stats.get("quality", {}), stats.get("warnings", []))

    @property
    def kept(self) -> dict[str, int]:
        """Pairs kept, by strategy."""
        return {k.removeprefix("pairs_"): v for k, v in self.counts.items() if k.startswith("pairs_")}

    def summary(self, where: StorePath) -> list[str]:
        from alignlib.uri import shown

        kept = {k: v for k, v in self.counts.items() if k.startswith("pairs_")}
        dropped = {k: v for k, v in self.counts.items() if k.startswith("dropped_") and v}
        lines = [f"  pairs kept {kept}; dropped {dropped or 'none'}"]
        lines += [f"  warning: {line}" for line in self.warnings]
        report = where / "report.html"
        if report.exists():
            lines.append(
                f"  data-quality report (reward and margin distributions, reward-length correlation): {shown(report)}"
            )
        return lines


def _driver_max_rows() -> int:
    return int(os.environ.get("ALIGNLIB_PAIRS_DRIVER_MAX_ROWS", DRIVER_PAIRS_MAX_ROWS))


def run(ctx: StageContext, out: StageWriter) -> PairsResult:
    import pyarrow as pa

    from alignlib.pairs import build, import_pairs
    from alignlib.quality import data_quality, imported_completions, render_html

    spec = ctx.spec.pairs
    scored_rows = (ctx.store.manifest("score") or {}).get("tables", {}).get("scored", 0) if generated(ctx.spec) else 0
    if scored_rows > _driver_max_rows():
        return _on_ray(ctx, out, scored_rows)
    if ctx.spec.data.kind == "preferences":
        preferences = read_table(ctx.table_path("prompts", "preferences")).to_pylist()
        train_ids = set(read_table(ctx.table_path("prompts", "train"))[S.PROMPT_ID].to_pylist())
        pairs, sft, counts = import_pairs(preferences, train_ids, spec)
        completions = imported_completions(pairs)
    else:
        # In key order: the pairs file is then the same bytes whatever order Ray Data wrote the rows in.
        scored = read_table(ctx.table_path("score", "scored")).sort_by([(c, "ascending") for c in KEY]).to_pylist()
        pairs, sft, counts = build(scored, spec, ctx.spec.seed)
        completions = scored
    quality = data_quality(completions, pairs, counts)
    (out.path / "report.html").write_text(render_html(quality, f"alignlib {ctx.spec.name}: preference data"))
    _require_examples(ctx, len(pairs) if training_table(ctx.spec) == "pairs" else len(sft), counts)
    write_table(pa.Table.from_pylist(pairs, schema=S.arrow_schema(S.PAIR_COLUMNS)), out.table("pairs"))
    write_table(pa.Table.from_pylist(sft, schema=S.arrow_schema(S.SFT_COLUMNS)), out.table("sft"))
    floor = min((r[S.REWARD] for r in completions if r.get(S.REWARD) is not None), default=None)
    rewards = [r[S.REWARD] for r in sft if r[S.REWARD] is not None]  # an imported pair may have none
    at_floor = sum(r <= floor for r in rewards) if floor is not None else 0
    sft_mean = sum(rewards) / len(rewards) if rewards else None
    return _finish(ctx, counts, quality, len(pairs), len(sft), at_floor, sft_mean, floor)


def _require_examples(ctx: StageContext, needed: int, counts: dict[str, Any]) -> None:
    if not needed:
        hint = (
            "check the preference file (every pair identical, repeated or held out?)"
            if ctx.spec.data.kind == "preferences"
            else "lower pairs.min_margin, raise generate.num_samples, or add a weak model and gold_vs_weak"
        )
        raise StageInputError(
            f"pairs: no training examples survived for loss {ctx.spec.train.loss.name!r} (counts: {counts}); {hint}"
        )


def _finish(
    ctx: StageContext,
    counts: dict[str, Any],
    quality: dict[str, Any],
    pairs: int,
    sft: int,
    at_floor: int,
    sft_mean: float | None,
    floor: float | None,
) -> PairsResult:
    prompts = round_prompts(ctx).num_rows if fresh(ctx) else count_rows(ctx.table_path("prompts", "train"))
    warnings = degenerate(ctx.spec, pairs, sft, at_floor, sft_mean, prompts, floor)
    for line in warnings:
        log(f"pairs: warning: {line}")
    return PairsResult(counts, quality, warnings)


def _on_ray(ctx: StageContext, out: StageWriter, scored_rows: int) -> PairsResult:
    """The pairs stage of a large scored table: on Ray Data (`alignlib.pairs_data`), never in the driver."""
    from alignlib.pairs_data import build_on_ray
    from alignlib.quality import render_html

    ensure_ray()
    log(f"pairs: {scored_rows:,} scored rows, paired on Ray Data (over {_driver_max_rows():,})")
    scored = str(ctx.table_path("score", "scored"))
    counts, quality = build_on_ray(
        scored, ctx.spec.pairs, ctx.spec.seed, scored_rows, str(out.table("pairs")), str(out.table("sft"))
    )
    (out.path / "report.html").write_text(render_html(quality, f"alignlib {ctx.spec.name}: preference data"))
    n_pairs = sum(v for k, v in counts.items() if k.startswith("pairs_"))
    _require_examples(ctx, n_pairs if training_table(ctx.spec) == "pairs" else counts["sft_rows"], counts)
    floors = [s["min"] for s in quality["reward_by_generator"].values() if s.get("count")]
    floor = min(floors, default=None)
    at_floor = 0
    if floor is not None and counts["sft_rows"]:  # one float column of one row per prompt, as Arrow
        import pyarrow.compute as pc

        rewards = read_table(out.table("sft"), columns=[S.REWARD])[S.REWARD]
        at_floor = pc.sum(pc.less_equal(rewards, floor)).as_py() or 0
    sft_mean = quality.pop("sft_mean_reward")
    return _finish(ctx, counts, quality, n_pairs, counts["sft_rows"], at_floor, sft_mean, floor)


def degenerate(
    spec: JobSpec,
    pairs: int,
    sft: int,
    at_floor: int,
    sft_mean: float | None,
    prompts: int,
    floor: float | None,
) -> list[str]:
    """What makes the training set the loss reads nearly useless, in words (empty when nothing does).

    SFT: most best-of-N rows are no better than the worst reward any completion got (every sample of
    the prompt failed alike; training on them teaches the failure). Pairs: fewer than one per 10 prompts.
    Takes counts (pairs, SFT rows, SFT rows at the floor) and the SFT set's mean reward, not the rows.
    """
    out = []
    if training_table(spec) == "sft" and sft and floor is not None and at_floor >= 0.9 * sft:
        out.append(
            f"{at_floor} of {sft} best-of-N rows (the SFT set, mean reward {sft_mean:.3f}) have the lowest "
            f"reward any completion got ({floor:g}): best-of-N found nothing better to learn from; raise "
            "generate.num_samples or temperature, start from a stronger policy, or use gold_vs_weak pairs "
            "with a paired loss"
        )
    if training_table(spec) == "pairs" and pairs < 0.1 * prompts:
        out.append(
            f"only {pairs} pairs from {prompts} prompts: most prompts' samples tied or fell below "
            "pairs.min_margin; lower pairs.min_margin, raise generate.num_samples, or add gold_vs_weak pairs"
        )
    return out


def figures(ctx: StageContext, result: PairsResult) -> dict[str, Any]:
    """Pairs kept per strategy, and the best-of-N (SFT) set's mean reward."""
    import pyarrow.compute as pc

    rewards = read_table(ctx.table_path("pairs", "sft"), columns=[S.REWARD])[S.REWARD]
    return {"pairs": result.kept, "best_of_n_mean_reward": pc.mean(rewards).as_py()}


def sections(spec: JobSpec) -> dict[str, Any]:
    # The loss is in too: it decides which of the two sets must not come out empty.
    out = {"pairs": spec.pairs.model_dump(mode="json"), "seed": spec.seed, "training_table": training_table(spec)}
    if spec.pairs.include_truncated:
        # Only where cut answers take part does the ranking rule's stop-before-cut step change a pick.
        from alignlib.ranking import RULE

        out["rule"] = RULE
    return out


def _reads(spec: JobSpec) -> dict[str, list[str]]:
    if generated(spec):
        return {"score/scored": S.SCORED_COLUMNS}
    return {"prompts/preferences": S.PREFERENCE_COLUMNS, "prompts/train": [S.PROMPT_ID]}


STAGE = Stage(
    name="pairs",
    help="turn scores into preference pairs and a best-of-N set (or import a preference file's pairs)",
    run=run,
    result=PairsResult,
    sections=sections,
    # An imported preference set skips generate and score.
    inputs=lambda spec: ["score"] if generated(spec) else ["prompts"],
    reads=_reads,
    figures=figures,
)
