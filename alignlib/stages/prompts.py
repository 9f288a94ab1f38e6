"""Stage `prompts`: read the data file, check every row, split training and held-out prompts.

In: the data file (`data.path`). Out: `prompts/train` and `prompts/eval` (PROMPT_COLUMNS), `prompts/preferences`
for an imported preference set, and `prompts/rejected_rows` with `data.on_bad_rows: reject`. Made once per run in a
multi-round job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from alignlib import schema as S
from alignlib.raydata import log
from alignlib.sources import data_digest, model_digest
from alignlib.spec import JobSpec
from alignlib.stages.contract import Stage, StageContext, StageResult
from alignlib.store import StageWriter, StorePath, rmtree, write_table


@dataclass
class PromptsResult(StageResult):
    prompts: int
    duplicates_merged: int = 0
    pgold_rows: int | None = None  # preference rows read (data.kind preferences)
    rejected_rows: int | None = None  # bad rows set aside (data.on_bad_rows reject)
    rejected: dict[str, int] | None = None  # by reason

    def stats(self) -> dict[str, Any]:
        return {k: v for k, v in super().stats().items() if v is not None}

    def summary(self, where: StorePath) -> list[str]:
        from alignlib.uri import shown

        line = f"  prompts: {self.prompts} distinct, {self.duplicates_merged} duplicate(s) merged"
        if self.rejected_rows is not None:
            line += (
                f"; {self.rejected_rows} bad row(s) rejected {self.rejected}" if self.rejected_rows else "; no bad rows"
            )
            if self.rejected_rows:
                line += f" -> {shown(where / 'rejected_rows')}"
        return [line]


def _context_settings(spec: JobSpec) -> dict[str, Any] | None:
    """What the context-length check reads (see `alignlib.context`): changing it reruns the stage."""
    if spec.data.kind != "prompts":
        return None
    g = spec.generate
    models = [spec.policy] + ([g.weak_model] if g.weak_model is not None else [])
    return {
        "models": [[model_digest(m.model), m.chat_template] for m in models],
        "max_new_tokens": g.max_new_tokens,
        "max_model_len": g.engine_kwargs.get("max_model_len") if g.engine == "vllm" else None,
    }


def sections(spec: JobSpec) -> dict[str, Any]:
    # The data file by content, not by path: an edited file reruns everything, a moved one nothing.
    return {
        "data": spec.data.model_dump(mode="json", exclude={"path"}),
        "content": data_digest(spec.data.path),
        "seed": spec.seed,
        "context": _context_settings(spec),
    }


def run(ctx: StageContext, out: StageWriter) -> PromptsResult:
    from alignlib.prompts import all_rejected, load_data, split, to_table

    data = ctx.spec.data
    fits = None
    if data.kind == "prompts":  # these prompts go to generation: each must fit the models' context
        from alignlib.context import ContextCheck

        fits = ContextCheck(ctx.spec)
    # Where the rejected rows of a run that kept none go: the stage itself is not committed then.
    failed = ctx.store.root / "prompts.failed"
    rmtree(failed)
    loaded = load_data(data, fits)
    rejected = to_table(loaded.rejected, S.REJECTED_ROW_COLUMNS)
    if not loaded.prompts:
        write_table(rejected, failed / "rejected_rows")
        raise all_rejected(data, loaded, failed / "rejected_rows")
    train, held_out = split(loaded.prompts, data.eval_fraction, ctx.spec.seed)
    write_table(to_table(train), out.table("train"))
    write_table(to_table(held_out), out.table("eval"))
    if data.kind == "preferences":
        write_table(to_table(loaded.preferences, S.PREFERENCE_COLUMNS), out.table("preferences"))
    counts = loaded.counts(data)
    if data.on_bad_rows == "reject":
        write_table(rejected, out.table("rejected_rows"))
        if loaded.rejected:
            log(
                f"prompts: {len(loaded.rejected)} bad row(s) set aside {counts['rejected']} -> "
                f"{ctx.store.path('prompts') / 'rejected_rows'}"
            )
    return PromptsResult.from_stats({"prompts": len(loaded.prompts), **counts})


STAGE = Stage(
    name="prompts",
    help="read the data file, check every row, split train and held-out prompts",
    run=run,
    result=PromptsResult,
    sections=sections,
    flows=("train", "bon"),
)
