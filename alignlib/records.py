"""Input records: the lines of a JSONL file or the rows of a Parquet file, each with where it came from.

JSONL is read as bytes and decoded line by line, so bad UTF-8 or bad JSON is a problem of one line
(named with its byte offset), not of the whole file; a line that is not a JSON object comes as its
`DataError` in place of the record, for the prompts stage to stop on or set aside. A Parquet column
every row needs is checked once, against the file's schema. Problems with the file itself (missing,
unreadable, of unknown format) raise at once.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from alignlib.spec import DataSpec

# Reason codes of a bad row, as `rejected_rows.reason` and the manifest's `rejected` counts name them.
REASONS = (
    "not_utf8",
    "invalid_json",
    "not_an_object",
    "missing_field",
    "null_field",
    "empty_prompt",
    "wrong_type",
    "bad_chat",
    "not_finite",
    "ambiguous_gold",
    "conflicting_gold",
    "prompt_too_long",
    "no_chat_template",
)


class DataError(ValueError):
    """Bad input data. A bad row carries `where` ("file:line" or "file#row"), `field` (None: the whole
    line) and `reason` (one of REASONS); a problem with the file itself has no `where`."""

    def __init__(self, message: str, *, where: str | None = None, field: str | None = None, reason: str = ""):
        super().__init__(message if where is None else f"{where}: {message}")
        self.where, self.field, self.reason, self.detail = where, field, reason, message


def bad_row(where: str, field: str | None, reason: str, message: str) -> DataError:
    return DataError(message, where=where, field=field, reason=reason)


Record = tuple[str, Any, "dict | DataError"]  # (where, raw text or record, record or the line's error)


def iter_records(spec: DataSpec) -> Iterator[Record]:
    """Yield (where, raw, record) with `where` as "file:line" (JSONL) or "file#row" (Parquet); a line
    that is not a JSON object comes as its DataError in place of the record."""
    path = Path(spec.path)
    if not path.exists():
        raise DataError(f"data.path: {path} does not exist")
    fmt = spec.format
    if fmt == "auto":
        fmt = "parquet" if path.is_dir() or path.suffix == ".parquet" else "jsonl"
        if fmt == "jsonl" and path.suffix not in (".jsonl", ".json", ".ndjson"):
            raise DataError(f"data.path: cannot tell the format of {path}; set data.format to jsonl or parquet")
    yield from (_parquet_records(path, spec) if fmt == "parquet" else _jsonl_records(path))


def _jsonl_records(path: Path) -> Iterator[Record]:
    """Lines are read as bytes and decoded one by one, so bad UTF-8 names its line and byte offset."""
    offset = 0
    with path.open("rb") as f:
        for lineno, data in enumerate(f, start=1):
            where, start = f"{path}:{lineno}", offset
            offset += len(data)
            if lineno == 1 and data.startswith(codecs.BOM_UTF8):
                data, start = data[len(codecs.BOM_UTF8) :], start + len(codecs.BOM_UTF8)
            try:
                line = data.decode("utf-8")
            except UnicodeDecodeError as err:
                raw = data.decode("utf-8", errors="backslashreplace")
                message = f"not UTF-8: byte 0x{data[err.start]:02x} at column {err.start + 1} (byte {start + err.start} of the file)"
                yield where, raw, bad_row(where, None, "not_utf8", message)
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                yield where, line, bad_row(where, None, "invalid_json", f"invalid JSON: {err.msg} (column {err.colno})")
                continue
            if not isinstance(record, dict):
                message = f"expected a JSON object, got {type(record).__name__}"
                yield where, line, bad_row(where, None, "not_an_object", message)
                continue
            yield where, line, record


def _parquet_records(path: Path, spec: DataSpec) -> Iterator[Record]:
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"data.path: {path} is not a readable Parquet file: {err}") from None
    _require_columns(path, table.column_names, spec)
    for i, record in enumerate(table.to_pylist()):
        yield f"{path}#{i}", record, record


def _require_columns(path: Path, columns: list[str], spec: DataSpec) -> None:
    """A column every row needs is missing: one error naming the file and its columns, not one per row."""
    has = set(columns)
    needed = []
    if spec.prompt_field not in has and not {spec.chosen_field, spec.rejected_field} <= has:
        needed.append(("data.prompt_field", spec.prompt_field))
    if spec.gold_field is not None:
        needed.append(("data.gold_field", spec.gold_field))
    if spec.kind == "preferences":
        needed += [("data.chosen_field", spec.chosen_field), ("data.rejected_field", spec.rejected_field)]
    missing = [f"{name} {column!r}" for name, column in needed if column not in has]
    if missing:
        raise DataError(f"{path}: no column for {', '.join(missing)}; the file's columns are {columns}")
