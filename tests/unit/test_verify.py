"""Before generate or score commits, its table holds each expected key exactly once, or the stage fails."""

import pyarrow as pa
import pytest

from alignlib import schema as S
from alignlib.store import write_table
from alignlib.verify import StageOutputError, check_completions, check_scored

PROMPTS = ["p1", "p2", "p3"]
EXPECTED = {"policy": (PROMPTS, 2), "gold": (["p1", "p3"], 1)}


def keys_table(keys) -> pa.Table:
    return pa.table(
        {
            S.PROMPT_ID: [k[0] for k in keys],
            S.GENERATOR: [k[1] for k in keys],
            S.SAMPLE_INDEX: pa.array([k[2] for k in keys], pa.int32()),
            S.COMPLETION: ["x"] * len(keys),
        }
    )


def complete() -> list[tuple]:
    return [(p, "policy", i) for p in PROMPTS for i in range(2)] + [("p1", "gold", 0), ("p3", "gold", 0)]


def write(tmp_path, keys, name="completions"):
    """Keys spread over two files, as Ray Data writes a dataset."""
    path = tmp_path / name
    write_table(keys_table(keys[:3]), path)
    (path / "part-00000.parquet").rename(path / "a.parquet")
    write_table(keys_table(keys[3:]), path)
    return path


def test_complete_completions_pass(tmp_path):
    check_completions(write(tmp_path, complete()), EXPECTED)


def test_a_row_written_twice_is_named(tmp_path):
    keys = complete() + [("p2", "policy", 1)]
    with pytest.raises(
        StageOutputError,
        match=r"9 rows where 8 were expected: 1 written more than once "
        r"\(e.g. prompt_id p2 generator policy sample_index 1, 2 rows\); refusing to commit",
    ):
        check_completions(write(tmp_path, keys), EXPECTED)


def test_a_lost_row_is_named(tmp_path):
    keys = [k for k in complete() if k != ("p3", "policy", 0)]
    with pytest.raises(StageOutputError, match=r"1 missing \(e.g. prompt_id p3 generator policy sample_index 0\)"):
        check_completions(write(tmp_path, keys), EXPECTED)


def test_a_row_of_no_prompt_or_sample_is_named(tmp_path):
    keys = complete() + [("p1", "policy", 2)]
    with pytest.raises(StageOutputError, match=r"1 not expected \(e.g. prompt_id p1 generator policy sample_index 2\)"):
        check_completions(write(tmp_path, keys), EXPECTED)


def test_scored_must_hold_each_completion_once(tmp_path):
    completions = write(tmp_path, complete())
    check_scored(write(tmp_path, complete(), "scored"), completions)
    twice = write(tmp_path, complete()[1:] + complete()[1:2], "twice")  # one lost, one twice
    with pytest.raises(
        StageOutputError,
        match=r"score: .*twice: 8 rows where 8 were expected: 1 written more than "
        r"once .*; 1 missing \(e.g. prompt_id p1 generator policy sample_index 0\)",
    ):
        check_scored(twice, completions)


def test_expected_prompt_ids_may_be_an_arrow_column(tmp_path):
    ids = pa.chunked_array([["p1"], ["p2", "p3"]])  # as read from the prompts table, in chunks
    check_completions(write(tmp_path, complete()), {"policy": (ids, 2), "gold": (pa.array(["p1", "p3"]), 1)})
    with pytest.raises(StageOutputError, match=r"2 missing \(e.g. prompt_id p4 generator policy sample_index 0\)"):
        check_completions(
            write(tmp_path, complete(), "again"),
            {"policy": (pa.array(["p1", "p2", "p3", "p4"]), 2), "gold": (["p1", "p3"], 1)},
        )
