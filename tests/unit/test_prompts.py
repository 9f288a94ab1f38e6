"""The prompts stage: reading, stable ids, errors naming file and line, duplicates, the split."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignlib import schema as S
from alignlib.prompts import DataError, prompt_id, read_prompts, split
from alignlib.spec import DataSpec


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def spec(path, **kw):
    return DataSpec(path=str(path), prompt_field="q", gold_field="a", **kw)


def test_reads_strings_and_chats_with_stable_ids(tmp_path):
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]
    path = write_jsonl(tmp_path / "d.jsonl", [{"q": "1+1?", "a": 2}, {"q": chat, "a": "4"}])
    rows, counts = read_prompts(spec(path))
    assert [r[S.PROMPT] for r in rows] == ["1+1?", "2+2?"]
    assert rows[0][S.MESSAGES] == [{"role": "user", "content": "1+1?"}]
    assert rows[1][S.MESSAGES] == chat
    assert rows[0][S.GOLD] == "2"  # numbers become strings
    assert rows[0][S.SOURCE] == f"{path}:1" and rows[1][S.SOURCE] == f"{path}:2"
    assert rows[0][S.PROMPT_ID] == prompt_id([{"role": "user", "content": "1+1?"}])
    assert len(rows[0][S.PROMPT_ID]) == 16 and counts == {"duplicates_merged": 0}


def test_same_prompt_same_id_in_parquet_and_jsonl(tmp_path):
    jsonl = write_jsonl(tmp_path / "d.jsonl", [{"q": "hello", "a": "x"}])
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.table({"q": ["hello"], "a": ["x"]}), parquet)
    (a,), _ = read_prompts(spec(jsonl))
    (b,), _ = read_prompts(spec(parquet))
    assert a[S.PROMPT_ID] == b[S.PROMPT_ID]
    assert b[S.SOURCE] == f"{parquet}#0"


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"q": "ok", "a": "1"}', "{not json"], ":2: invalid JSON"),
        (['{"q": "ok", "a": "1"}', '{"question": "x", "a": "1"}'], ":2: missing field 'q'"),
        (['{"q": "", "a": "1"}'], ":1: field 'q' is an empty string"),
        (['{"q": 5, "a": "1"}'], ":1: field 'q' must be a non-empty string or chat list"),
        (['{"q": [{"role": "user"}], "a": "1"}'], ":1: q[0] must be an object with string 'role' and 'content'"),
        (['{"q": "ok"}'], ":1: field 'a' must be a string or number, got None"),
        (['{"q": "ok", "a": "1"}', '{"q": "ok", "a": "2"}'], ":2: same prompt as"),
        (["[1, 2]"], ":1: expected a JSON object"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, lines, message):
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError) as info:
        read_prompts(spec(path))
    assert str(path) in str(info.value) and message in str(info.value)


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_prompts(spec(tmp_path / "nope.jsonl"))
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match="set data.format"):
        read_prompts(spec(tmp_path / "d.txt"))


def test_exact_duplicates_are_merged_and_counted(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"q": "a", "a": "1"}, {"q": "b", "a": "2"}, {"q": "a", "a": "1"}])
    rows, counts = read_prompts(spec(path))
    assert [r[S.PROMPT] for r in rows] == ["a", "b"] and counts == {"duplicates_merged": 1}


def test_split_is_stable_and_sized(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"q": f"p{i}", "a": str(i)} for i in range(50)])
    rows, _ = read_prompts(spec(path))
    train, held = split(rows, 0.1, seed=0)
    assert len(held) == 5 and len(train) == 45
    assert {r[S.PROMPT_ID] for r in train}.isdisjoint(r[S.PROMPT_ID] for r in held)
    again, held_again = split(list(reversed(rows)), 0.1, seed=0)
    assert {r[S.PROMPT_ID] for r in held_again} == {r[S.PROMPT_ID] for r in held}
    _, other = split(rows, 0.1, seed=1)
    assert {r[S.PROMPT_ID] for r in other} != {r[S.PROMPT_ID] for r in held}


def test_limit_keeps_the_first_prompts(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"q": f"p{i}", "a": str(i)} for i in range(10)])
    rows, _ = read_prompts(spec(path, limit=3))
    assert [r[S.PROMPT] for r in rows] == ["p0", "p1", "p2"]
