"""Reading prompt data: a JSONL or Parquet file -> checked prompt rows and their train / held-out split (run by the
stage `alignlib.stages.prompts`).

In: `data.path`, in any of these layouts (JSONL or Parquet):
- prompts: `data.prompt_field` is a string or a chat list of {role, content}; a chat ending with an
  assistant turn (an SFT `messages` column) is the prompt plus its answer, which becomes the
  gold answer. The gold answer may instead come from `data.gold_field`.
- preferences (TRL / alignment-handbook): prompt + chosen + rejected, each a string or a chat list;
  chosen/rejected may be the assistant turn alone or the whole conversation. Without a prompt
  field the prompt is the turns chosen and rejected share (TRL's implicit prompt). Optional
  `score_chosen`/`score_rejected` numbers become the pair's rewards.
Out: PROMPT_COLUMNS, one row per distinct prompt, with a stable `prompt_id` (a hash of the
chat, so the same prompt gets the same id in every run and file) and `source` naming the file
and line it came from. A stable hash of (seed, prompt_id) picks the held-out eval prompts. With
`data.kind: preferences` also `prompts/preferences` (PREFERENCE_COLUMNS), the pairs stage's input.

Bad rows are errors naming the file, line and field (`data.on_bad_rows: error`), or are set aside with
a reason code into `prompts/rejected_rows` (`reject`) while the valid rows go on; nothing is dropped
silently: exact duplicate prompts are merged and counted in the manifest, a prompt given two different
answers is a bad row. Problems with the file itself (missing, empty, unreadable) always stop the job.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from alignlib import schema as S
from alignlib.records import DataError, bad_row, iter_records
from alignlib.spec import DataSpec
from alignlib.store import StorePath

RAW_CHARS = 2000  # of a rejected row's text kept in `rejected_rows.raw`
BATCH = 1024  # rows whose prompts are tokenized together for the context check


def _kind_of(value: Any) -> str:
    """null_field for a null, wrong_type for anything else that is not what a field needs."""
    return "null_field" if value is None else "wrong_type"


def prompt_id(messages: list[dict[str, str]]) -> str:
    canonical = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _chat(value: list, where: str, field: str) -> list[dict[str, str]]:
    out = []
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise bad_row(where, field, "bad_chat", f"{field}[{i}] must be an object with string 'role' and 'content'")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _prompt_and_answer(value: Any, where: str, field: str) -> tuple[list[dict[str, str]], str | None]:
    """A prompt field -> (prompt messages, answer). A chat ending with an assistant turn (an SFT-style
    `messages` column) is the prompt plus its answer; otherwise the answer is None."""
    if isinstance(value, str):
        if not value.strip():
            raise bad_row(where, field, "empty_prompt", f"field {field!r} is an empty string")
        return [{"role": "user", "content": value}], None
    if isinstance(value, list) and value:
        chat = _chat(value, where, field)
        answer = None
        if chat[-1]["role"] == "assistant":
            answer, chat = chat[-1]["content"], chat[:-1]
            if not chat or chat[-1]["role"] == "assistant":
                raise bad_row(
                    where, field, "bad_chat", f"{field} must hold prompt turns before its final assistant answer"
                )
        return chat, answer
    reason = "empty_prompt" if value == [] else _kind_of(value)
    raise bad_row(
        where, field, reason, f"field {field!r} must be a non-empty string or chat list, got {type(value).__name__}"
    )


def _answer(value: Any, prompt: list[dict[str, str]] | None, where: str, field: str) -> str:
    """A chosen/rejected field -> the answer text: a string, one assistant turn, or the whole
    conversation starting with the prompt's turns."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list) or not value:
        message = f"field {field!r} must be a string or a chat list, got {type(value).__name__}"
        raise bad_row(where, field, _kind_of(value), message)
    chat = _chat(value, where, field)
    if prompt is not None and chat[: len(prompt)] == prompt:
        chat = chat[len(prompt) :]
    if len(chat) != 1 or chat[0]["role"] != "assistant":
        roles = [m["role"] for m in chat]
        raise bad_row(
            where, field, "bad_chat", f"field {field!r} must be one assistant turn after the prompt, got roles {roles}"
        )
    return chat[0]["content"]


def _implicit_prompt(record: dict, spec: DataSpec, where: str) -> list[dict[str, str]]:
    """No prompt field: the prompt is the turns chosen and rejected conversations share (TRL's implicit prompt)."""
    chosen, rejected = record.get(spec.chosen_field), record.get(spec.rejected_field)
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        hint = ""
        if spec.kind == "prompts" and spec.chosen_field in record and spec.rejected_field in record:
            hint = "; for a preference set without a prompt field, chosen and rejected must be chat lists"
        raise bad_row(
            where,
            spec.prompt_field,
            "missing_field",
            f"missing field {spec.prompt_field!r} (fields: {sorted(record)}){hint}",
        )
    chosen, rejected = _chat(chosen, where, spec.chosen_field), _chat(rejected, where, spec.rejected_field)
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise bad_row(
            where,
            spec.prompt_field,
            "missing_field",
            f"no field {spec.prompt_field!r}, and {spec.chosen_field!r} "
            f"and {spec.rejected_field!r} share no leading prompt turns",
        )
    return chosen[:n]


def _gold(record: dict, spec: DataSpec, answer: str | None, where: str) -> str | None:
    if spec.gold_field is None:
        return answer
    if answer is not None:
        raise bad_row(
            where,
            spec.gold_field,
            "ambiguous_gold",
            f"{spec.prompt_field} ends with an assistant answer "
            "and data.gold_field is set too; which one is the gold answer? (unset data.gold_field to use "
            "the chat's answer)",
        )
    value = record.get(spec.gold_field)
    if value is None or isinstance(value, (dict, list)):
        reason = "missing_field" if spec.gold_field not in record else _kind_of(value)
        raise bad_row(
            where, spec.gold_field, reason, f"field {spec.gold_field!r} must be a string or number, got {value!r}"
        )
    return str(value)


def _prompt_text(messages: list[dict[str, str]]) -> str:
    users = [m["content"] for m in messages if m["role"] == "user"]
    return users[-1] if users else messages[-1]["content"]


def _score(record: dict, field: str, where: str) -> float | None:
    value = record.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        reason = "not_finite" if isinstance(value, float) else "wrong_type"
        raise bad_row(where, field, reason, f"field {field!r} must be a finite number, got {value!r}")
    return float(value)


def _parse(record: dict, spec: DataSpec, where: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """One record -> (prompt row, preference row or None)."""
    if spec.prompt_field in record:
        messages, answer = _prompt_and_answer(record[spec.prompt_field], where, spec.prompt_field)
    else:
        messages, answer = _implicit_prompt(record, spec, where), None
    pid = prompt_id(messages)
    prompt = {
        S.PROMPT_ID: pid,
        S.PROMPT: _prompt_text(messages),
        S.MESSAGES: messages,
        S.GOLD: _gold(record, spec, answer, where),
        S.SOURCE: where,
    }
    if spec.kind == "prompts":
        return prompt, None
    for field in (spec.chosen_field, spec.rejected_field):
        if field not in record:
            raise bad_row(
                where, field, "missing_field", f"missing field {field!r} of a preference set (fields: {sorted(record)})"
            )
    preference = {
        S.PROMPT_ID: pid,
        S.PROMPT: prompt[S.PROMPT],
        S.MESSAGES: messages,
        S.CHOSEN: _answer(record[spec.chosen_field], messages, where, spec.chosen_field),
        S.REJECTED: _answer(record[spec.rejected_field], messages, where, spec.rejected_field),
        S.CHOSEN_REWARD: _score(record, S.TRL_SCORE_CHOSEN, where),
        S.REJECTED_REWARD: _score(record, S.TRL_SCORE_REJECTED, where),
        S.SOURCE: where,
    }
    return prompt, preference


@dataclass
class Loaded:
    """What a data file gave: distinct prompts in file order, preference rows (kind `preferences`), the
    rows set aside (REJECTED_ROW_COLUMNS, `data.on_bad_rows: reject`) and the counts for the manifest."""

    prompts: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    preferences: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    rejected: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    duplicates: int = 0

    def counts(self, spec: DataSpec) -> dict[str, Any]:
        out: dict[str, Any] = {"duplicates_merged": self.duplicates}
        if spec.kind == "preferences":
            out["pgold_rows"] = len(self.preferences)
        if spec.on_bad_rows == "reject":
            out["rejected_rows"] = len(self.rejected)
            out["rejected"] = dict(sorted(Counter(r[S.REASON] for r in self.rejected).items()))
        return out


def read_prompts(spec: DataSpec) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """All distinct prompts in file order, plus counts of what was merged."""
    prompts, _, counts = read_data(spec)
    return prompts, counts


def read_data(spec: DataSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """(distinct prompts in file order, preference rows (kind `preferences`, else []), counts)."""
    loaded = load_data(spec)
    if not loaded.prompts:
        raise all_rejected(spec, loaded, None)
    return loaded.prompts, loaded.preferences, loaded.counts(spec)


Fit = Callable[[list[list[dict[str, str]]]], list[tuple[str, str] | None]]


def load_data(spec: DataSpec, fits: Fit | None = None) -> Loaded:
    """Read, parse, merge duplicates and set bad rows aside (or stop at the first, `on_bad_rows: error`).

    `fits` (a `context.ContextCheck`) maps chats to None or (reason, message) for prompts no generating
    model can take; it sees each distinct prompt once, BATCH at a time. Rows are handled in file order,
    so in `error` mode the first bad row in the file is the one reported.
    """
    reader = _Reader(spec, fits)
    batch: list[tuple[str, Any, Any]] = []
    for where, raw, record in iter_records(spec):
        parsed = record if isinstance(record, DataError) else _try_parse(record, spec, where)
        batch.append((where, raw, parsed))
        if len(batch) == BATCH:
            if reader.take(batch):
                return reader.loaded
            batch = []
    reader.take(batch)
    if not reader.loaded.prompts and not reader.loaded.rejected:
        raise DataError(f"data.path: {spec.path} holds no prompts")
    return reader.loaded


def _try_parse(record: dict, spec: DataSpec, where: str):
    try:
        return _parse(record, spec, where)
    except DataError as err:
        return err


class _Reader:
    """Merges parsed rows into a `Loaded`, in file order."""

    def __init__(self, spec: DataSpec, fits: Fit | None):
        self.spec, self.fits = spec, fits
        self.loaded = Loaded()
        self.rows: dict[str, dict[str, Any]] = {}
        self.unfit: dict[str, tuple[str, str]] = {}  # prompt_id -> (reason, message)

    def take(self, batch: list[tuple[str, Any, Any]]) -> bool:
        """Add a batch of (where, raw, (prompt row, preference) or DataError); True once data.limit is reached."""
        self._check_fit([p for _, _, p in batch if not isinstance(p, DataError)])
        for where, raw, parsed in batch:
            try:
                if isinstance(parsed, DataError):
                    raise parsed
                if self._add(where, *parsed):
                    return True
            except DataError as err:
                self._set_aside(err, raw)
        return False

    def _check_fit(self, parsed: list[tuple[dict, Any]]) -> None:
        if self.fits is None:
            return
        new = {row[S.PROMPT_ID]: row[S.MESSAGES] for row, _ in parsed if row[S.PROMPT_ID] not in self.rows}
        new = {pid: chat for pid, chat in new.items() if pid not in self.unfit}
        for pid, problem in zip(new, self.fits(list(new.values())), strict=True):
            if problem is not None:
                self.unfit[pid] = problem

    def _add(self, where: str, row: dict[str, Any], preference: dict[str, Any] | None) -> bool:
        pid = row[S.PROMPT_ID]
        if pid in self.unfit:
            reason, message = self.unfit[pid]
            raise bad_row(where, self.spec.prompt_field, reason, f"field {self.spec.prompt_field!r}: {message}")
        if pid in self.rows:
            first = self.rows[pid]
            if first[S.GOLD] != row[S.GOLD]:
                field = self.spec.gold_field or self.spec.prompt_field
                raise bad_row(
                    where,
                    field,
                    "conflicting_gold",
                    f"same prompt as {first[S.SOURCE]} but a different "
                    f"gold answer (field {field!r}: {row[S.GOLD]!r} vs {first[S.GOLD]!r})",
                )
            if preference is not None:
                self.loaded.preferences.append(preference)  # a prompt often has several pairs
            self.loaded.duplicates += 1
            return False
        if self.spec.limit is not None and len(self.rows) >= self.spec.limit:
            return True
        self.rows[pid] = row
        self.loaded.prompts.append(row)
        if preference is not None:
            self.loaded.preferences.append(preference)
        return False

    def _set_aside(self, err: DataError, raw: Any) -> None:
        if self.spec.on_bad_rows == "error":
            raise DataError(
                f"{err.detail} (data.on_bad_rows: reject would set such rows aside)",
                where=err.where,
                field=err.field,
                reason=err.reason,
            )
        text = raw if isinstance(raw, str) else json.dumps(raw, ensure_ascii=False, default=str)
        text = text.rstrip("\r\n")
        if len(text) > RAW_CHARS:
            text = f"{text[:RAW_CHARS]}... ({len(text) - RAW_CHARS} more characters)"
        self.loaded.rejected.append(
            {S.SOURCE: err.where, S.FIELD: err.field, S.REASON: err.reason, S.MESSAGE: str(err), S.RAW: text}
        )


def all_rejected(spec: DataSpec, loaded: Loaded, table: StorePath | None) -> DataError:
    """The error when no row was valid: every row was set aside (where to see them), or the file held none."""
    if not loaded.rejected:
        return DataError(f"data.path: {spec.path} holds no prompts")
    reasons = dict(Counter(r[S.REASON] for r in loaded.rejected))
    where = f"; see {table}" if table is not None else ""
    return DataError(
        f"data.path: every row of {spec.path} was rejected ({len(loaded.rejected)} rows: {reasons}){where}"
    )


def split(rows: list[dict[str, Any]], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, eval): the eval share is the rows whose hash of (seed, prompt_id) sorts first."""
    if eval_fraction == 0:
        return rows, []
    n_eval = min(max(1, round(len(rows) * eval_fraction)), len(rows) - 1)
    if n_eval < 1:
        raise DataError(f"data.eval_fraction: {len(rows)} prompt(s) is too few to hold any out")

    def rank(row):
        return hashlib.sha256(f"{seed}:{row[S.PROMPT_ID]}".encode()).hexdigest()

    eval_ids = {r[S.PROMPT_ID] for r in sorted(rows, key=rank)[:n_eval]}
    return [r for r in rows if r[S.PROMPT_ID] not in eval_ids], [r for r in rows if r[S.PROMPT_ID] in eval_ids]


def to_table(rows: list[dict[str, Any]], columns: list[str] = S.PROMPT_COLUMNS) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=S.arrow_schema(columns))


def round_of(prompt_id: str, seed: int, count: int) -> int:
    """The round (1..count) whose fresh slice holds this prompt (`rounds.prompts: fresh`): a seeded hash, so
    the slices are disjoint, about equal, and the same on every rerun whatever order the rows come in."""
    digest = hashlib.sha256(f"{seed}:round-slice:{prompt_id}".encode()).hexdigest()
    return int(digest[:8], 16) % count + 1


def in_round(batch: pa.Table, seed: int, round: int, count: int) -> pa.Table:
    """Ray Data task: the rows of `batch` in round `round`'s fresh slice."""
    keep = [round_of(pid, seed, count) == round for pid in batch[S.PROMPT_ID].to_pylist()]
    return batch.filter(pa.array(keep, pa.bool_()))
