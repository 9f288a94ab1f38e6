"""Stage `prompts`: a JSONL or Parquet file -> `prompts/train` and `prompts/eval` tables.

In: `data.path`, with the prompt in `data.prompt_field` (a string, or a chat list of
{role, content}) and optionally the gold answer in `data.reference_field`.
Out: PROMPT_COLUMNS, one row per distinct prompt, with a stable `prompt_id` (a hash of the
chat, so the same prompt gets the same id in every run and file) and `source` naming the file
and line it came from. A stable hash of (seed, prompt_id) picks the held-out eval prompts.

Bad rows are errors naming the file and line; nothing is dropped silently: exact duplicate
rows are merged and counted in the manifest, a prompt given two different answers is an error.
"""

from __future__ import annotations

import hashlib
import json
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


def _messages(value: Any, where: str, field: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field {field!r} is an empty string")
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value:
        out = []
        for i, m in enumerate(value):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise DataError(f"{where}: {field}[{i}] must be an object with string 'role' and 'content'")
            out.append({"role": m["role"], "content": m["content"]})
        if out[-1]["role"] == "assistant":
            raise DataError(f"{where}: {field} ends with an assistant turn; a prompt ends before the answer")
        return out
    raise DataError(f"{where}: field {field!r} must be a non-empty string or chat list, got {type(value).__name__}")


def _prompt_text(messages: list[dict[str, str]]) -> str:
    users = [m["content"] for m in messages if m["role"] == "user"]
    return users[-1] if users else messages[-1]["content"]


def read_prompts(spec: DataSpec) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """All distinct prompts in file order, plus counts of what was merged."""
    rows: dict[str, dict[str, Any]] = {}
    duplicates = 0
    for where, record in _iter_records(spec):
        if spec.prompt_field not in record:
            raise DataError(f"{where}: missing field {spec.prompt_field!r} (fields: {sorted(record)})")
        messages = _messages(record[spec.prompt_field], where, spec.prompt_field)
        reference = None
        if spec.reference_field is not None:
            value = record.get(spec.reference_field)
            if value is None or isinstance(value, (dict, list)):
                raise DataError(f"{where}: field {spec.reference_field!r} must be a string or number, got {value!r}")
            reference = str(value)
        pid = prompt_id(messages)
        if pid in rows:
            if rows[pid][S.REFERENCE] != reference:
                raise DataError(
                    f"{where}: same prompt as {rows[pid][S.SOURCE]} but a different reference "
                    f"({reference!r} vs {rows[pid][S.REFERENCE]!r})"
                )
            duplicates += 1
            continue
        rows[pid] = {
            S.PROMPT_ID: pid, S.PROMPT: _prompt_text(messages), S.MESSAGES: messages,
            S.REFERENCE: reference, S.SOURCE: where,
        }  # fmt: skip
        if spec.limit is not None and len(rows) >= spec.limit:
            break
    if not rows:
        raise DataError(f"data.path: {spec.path} holds no prompts")
    return list(rows.values()), {"duplicates_merged": duplicates}


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


def to_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=S.arrow_schema(S.PROMPT_COLUMNS))
