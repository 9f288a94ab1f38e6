"""Stage `select` (the `bon` flow, `alignlib bon`): rank each prompt's scored samples and keep the best
(`alignlib.bon`).

In: `prompts/train` (every prompt: the bon flow holds none out) and `score/scored`. Out: `select/best` (one row per
prompt, in the data file's order) and `select/candidates` (every sample with its rank).
"""

from __future__ import annotations

from dataclasses import dataclass

from alignlib import schema as S
from alignlib.ranking import RULE
from alignlib.raydata import log
from alignlib.stages.contract import Stage, StageContext, StageResult
from alignlib.stages.sections import generated
from alignlib.store import StageWriter, StorePath, read_table, write_table


@dataclass
class SelectResult(StageResult):
    prompts: int
    all_truncated: int  # prompts whose every candidate was cut at generate.max_new_tokens
    no_candidates: int  # prompts with nothing generated
    tied: int  # prompts whose best answer was chosen among equal rewards

    def summary(self, where: StorePath) -> list[str]:
        from alignlib.uri import shown

        return [
            f"  best-of-N: {self.prompts} prompts, one best answer each -> {shown(where / 'best')}; "
            f"{self.tied} chosen among tied rewards; flagged: {self.all_truncated} all candidates cut at the "
            f"token limit, {self.no_candidates} without candidates"
        ]


def run(ctx: StageContext, out: StageWriter) -> SelectResult:
    from alignlib.bon import arrow_tables, select

    prompts = read_table(ctx.table_path("prompts", "train")).to_pylist()  # the data file's order
    scored = read_table(ctx.table_path("score", "scored")).to_pylist()
    best, candidates, counts = select(prompts, scored)
    best_table, candidate_table = arrow_tables(best, candidates)
    write_table(best_table, out.table("best"))
    write_table(candidate_table, out.table("candidates"))
    result = SelectResult.from_stats(counts)
    flagged = result.all_truncated + result.no_candidates
    if flagged:
        log(
            f"select: {flagged} prompt(s) flagged ({result.all_truncated} with every candidate cut at "
            f"generate.max_new_tokens, {result.no_candidates} with none); their rows say so in `flag`"
        )
    return result


STAGE = Stage(
    name="select",
    help="best-of-N: rank each prompt's scored samples and keep the best (alignlib bon)",
    run=run,
    result=SelectResult,
    sections=lambda spec: {"rule": RULE},
    inputs=lambda spec: ["prompts", "score"],
    reads=lambda spec: {"prompts/train": S.PROMPT_COLUMNS, "score/scored": S.SCORED_COLUMNS},
    enabled=generated,
    enabled_when="data.kind is prompts",
    flows=("bon",),
)
