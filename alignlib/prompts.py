"""Stage `prompts`: a JSONL or Parquet file -> `prompts/train` and `prompts/eval` tables.

In: `data.path`, in any of these layouts (JSONL or Parquet):
- prompts: `data.prompt_field` is a string or a chat list of {role, content}; a chat ending with an
  assistant turn (an SFT `messages` column) is the prompt plus its answer, which becomes the
  reference. The gold answer may instead come from `data.reference_field`.
- preferences (TRL / alignment-handbook): prompt + chosen + rejected, each a string or a chat list;
  chosen/rejected may be the assistant turn alone or the whole conversation. Without a prompt
  field the prompt is the turns chosen and rejected share (TRL's implicit prompt). Optional
  `score_chosen`/`score_rejected` numbers become the pair's rewards.
Out: PROMPT_COLUMNS, one row per distinct prompt, with a stable `prompt_id` (a hash of the
chat, so the same prompt gets the same id in every run and file) and `source` naming the file
and line it came from. A stable hash of (seed, prompt_id) picks the held-out eval prompts. With
`data.kind: preferences` also `prompts/preferences` (PREFERENCE_COLUMNS), the pairs stage's input.

Bad rows are errors naming the file, line and field; nothing is dropped silently: exact duplicate
prompts are merged and counted in the manifest, a prompt given two different answers is an error.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from alignlib import schema as S
from alignlib.spec import DataSpec


class DataError(ValueError):
    pass


def prompt_id(messages: list[dict[str, str]]) -> str:
    canonical = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _iter_records(spec: DataSpec):
    """Yield (where, record) with `where` as "file:line" (JSONL) or "file#row" (Parquet)."""
    path = Path(spec.path)
    if not path.exists():
        raise DataError(f"data.path: {path} does not exist")
    fmt = spec.format
    if fmt == "auto":
        fmt = "parquet" if path.is_dir() or path.suffix == ".parquet" else "jsonl"
        if fmt == "jsonl" and path.suffix not in (".jsonl", ".json", ".ndjson"):
            raise DataError(f"data.path: cannot tell the format of {path}; set data.format to jsonl or parquet")
    if fmt == "parquet":
        table = pq.read_table(path)
        for i, record in enumerate(table.to_pylist()):
            yield f"{path}#{i}", record
        return
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: invalid JSON: {err.msg} (column {err.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield f"{path}:{lineno}", record


def _chat(value: list, where: str, field: str) -> list[dict[str, str]]:
    out = []
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataError(f"{where}: {field}[{i}] must be an object with string 'role' and 'content'")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _prompt_and_answer(value: Any, where: str, field: str) -> tuple[list[dict[str, str]], str | None]:
    """A prompt field -> (prompt messages, answer). A chat ending with an assistant turn (an SFT-style
    `messages` column) is the prompt plus its answer; otherwise the answer is None."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field {field!r} is an empty string")
        return [{"role": "user", "content": value}], None
    if isinstance(value, list) and value:
        chat = _chat(value, where, field)
        answer = None
        if chat[-1]["role"] == "assistant":
            answer, chat = chat[-1]["content"], chat[:-1]
            if not chat or chat[-1]["role"] == "assistant":
                raise DataError(f"{where}: {field} must hold prompt turns before its final assistant answer")
        return chat, answer
    raise DataError(f"{where}: field {field!r} must be a non-empty string or chat list, got {type(value).__name__}")


def _answer(value: Any, prompt: list[dict[str, str]] | None, where: str, field: str) -> str:
    """A chosen/rejected field -> the answer text: a string, one assistant turn, or the whole
    conversation starting with the prompt's turns."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field {field!r} must be a string or a chat list, got {type(value).__name__}")
    chat = _chat(value, where, field)
    if prompt is not None and chat[: len(prompt)] == prompt:
        chat = chat[len(prompt) :]
    if len(chat) != 1 or chat[0]["role"] != "assistant":
        roles = [m["role"] for m in chat]
        raise DataError(f"{where}: field {field!r} must be one assistant turn after the prompt, got roles {roles}")
    return chat[0]["content"]


def _implicit_prompt(record: dict, spec: DataSpec, where: str) -> list[dict[str, str]]:
    """No prompt field: the prompt is the turns chosen and rejected conversations share (TRL's implicit prompt)."""
    chosen, rejected = record.get(spec.chosen_field), record.get(spec.rejected_field)
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        hint = ""
        if spec.kind == "prompts" and spec.chosen_field in record and spec.rejected_field in record:
            hint = "; for a preference set without a prompt field, chosen and rejected must be chat lists"
        raise DataError(f"{where}: missing field {spec.prompt_field!r} (fields: {sorted(record)}){hint}")
    chosen, rejected = _chat(chosen, where, spec.chosen_field), _chat(rejected, where, spec.rejected_field)
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise DataError(
            f"{where}: no field {spec.prompt_field!r}, and {spec.chosen_field!r} and {spec.rejected_field!r} "
            "share no leading prompt turns"
        )
    return chosen[:n]


def _reference(record: dict, spec: DataSpec, answer: str | None, where: str) -> str | None:
    if spec.reference_field is None:
        return answer
    if answer is not None:
        raise DataError(
            f"{where}: {spec.prompt_field} ends with an assistant answer and data.reference_field is set too; "
            "which one is the gold answer? (unset data.reference_field to use the chat's answer)"
        )
    value = record.get(spec.reference_field)
    if value is None or isinstance(value, (dict, list)):
        raise DataError(f"{where}: field {spec.reference_field!r} must be a string or number, got {value!r}")
    return str(value)


def _prompt_text(messages: list[dict[str, str]]) -> str:
    users = [m["content"] for m in messages if m["role"] == "user"]
    return users[-1] if users else messages[-1]["content"]


def _score(record: dict, field: str, where: str) -> float | None:
    value = record.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{where}: field {field!r} must be a finite number, got {value!r}")
    return float(value)


def _parse(record: dict, spec: DataSpec, where: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """One record -> (prompt row, preference row or None)."""
    if spec.prompt_field in record:
        messages, answer = _prompt_and_answer(record[spec.prompt_field], where, spec.prompt_field)
    else:
        messages, answer = _implicit_prompt(record, spec, where), None
    pid = prompt_id(messages)
    prompt = {
        S.PROMPT_ID: pid, S.PROMPT: _prompt_text(messages), S.MESSAGES: messages,
        S.REFERENCE: _reference(record, spec, answer, where), S.SOURCE: where,
    }  # fmt: skip
    if spec.kind == "prompts":
        return prompt, None
    for field in (spec.chosen_field, spec.rejected_field):
        if field not in record:
            raise DataError(f"{where}: missing field {field!r} of a preference set (fields: {sorted(record)})")
    preference = {
        S.PROMPT_ID: pid, S.PROMPT: prompt[S.PROMPT], S.MESSAGES: messages,
        S.CHOSEN: _answer(record[spec.chosen_field], messages, where, spec.chosen_field),
        S.REJECTED: _answer(record[spec.rejected_field], messages, where, spec.rejected_field),
        S.CHOSEN_REWARD: _score(record, S.TRL_SCORE_CHOSEN, where),
        S.REJECTED_REWARD: _score(record, S.TRL_SCORE_REJECTED, where), S.SOURCE: where,
    }  # fmt: skip
    return prompt, preference


def read_prompts(spec: DataSpec) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """All distinct prompts in file order, plus counts of what was merged."""
    prompts, _, counts = read_data(spec)
    return prompts, counts


def read_data(spec: DataSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, int]]:
    """(distinct prompts in file order, preference rows (kind `preferences`, else []), counts)."""
    rows: dict[str, dict[str, Any]] = {}
    preferences = []
    duplicates = 0
    for where, record in _iter_records(spec):
        row, preference = _parse(record, spec, where)
        pid = row[S.PROMPT_ID]
        if pid in rows:
            if rows[pid][S.REFERENCE] != row[S.REFERENCE]:
                raise DataError(
                    f"{where}: same prompt as {rows[pid][S.SOURCE]} but a different reference "
                    f"({row[S.REFERENCE]!r} vs {rows[pid][S.REFERENCE]!r})"
                )
            if preference is not None:
                preferences.append(preference)  # a prompt often has several pairs
            duplicates += 1
            continue
        if spec.limit is not None and len(rows) >= spec.limit:
            break
        rows[pid] = row
        if preference is not None:
            preferences.append(preference)
    if not rows:
        raise DataError(f"data.path: {spec.path} holds no prompts")
    counts = {"duplicates_merged": duplicates}
    if spec.kind == "preferences":
        counts["preference_rows"] = len(preferences)
    return list(rows.values()), preferences, counts


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
