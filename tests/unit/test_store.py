"""Stage outputs: complete or absent, never trusted when partial or made from another spec."""

import json

import pyarrow as pa
import pytest

from alignlib.store import StageStore, fingerprint, write_table


def commit_stage(store, rows=3, fp="abc"):
    with store.writer("pairs") as out:
        write_table(pa.table({"x": list(range(rows))}), out.table("pairs"))
        return out.commit(fp, inputs={"score": "s1"}, stats={"kept": rows})


def test_commit_writes_manifest_and_counts_rows(tmp_path):
    store = StageStore(tmp_path)
    manifest = commit_stage(store)
    on_disk = json.loads((tmp_path / "pairs" / "manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["tables"] == {"pairs": 3} and manifest["inputs"] == {"score": "s1"}
    assert store.is_complete("pairs", "abc")
    assert not list(tmp_path.glob(".pairs.tmp-*"))


def test_other_fingerprint_is_not_complete(tmp_path):
    store = StageStore(tmp_path)
    commit_stage(store)
    assert not store.is_complete("pairs", "different")


def test_missing_rows_make_a_stage_incomplete(tmp_path):
    store = StageStore(tmp_path)
    commit_stage(store)
    (tmp_path / "pairs" / "pairs" / "part-00000.parquet").unlink()
    assert not store.is_complete("pairs", "abc")


def test_a_failed_stage_leaves_nothing_behind_and_keeps_the_old_output(tmp_path):
    store = StageStore(tmp_path)
    commit_stage(store, rows=3)
    with pytest.raises(RuntimeError), store.writer("pairs") as out:
        write_table(pa.table({"x": [1]}), out.table("pairs"))
        raise RuntimeError("killed mid-stage")
    assert not list(tmp_path.glob(".pairs.tmp-*"))
    assert store.manifest("pairs")["tables"] == {"pairs": 3}


def test_recommit_replaces_the_old_output(tmp_path):
    store = StageStore(tmp_path)
    commit_stage(store, rows=3, fp="old")
    commit_stage(store, rows=5, fp="new")
    assert store.is_complete("pairs", "new") and store.manifest("pairs")["tables"] == {"pairs": 5}


def test_fingerprint_depends_on_spec_and_inputs():
    base = fingerprint("score", {"reward": "a"}, {"generate": "g1"})
    assert base == fingerprint("score", {"reward": "a"}, {"generate": "g1"})
    assert base != fingerprint("score", {"reward": "b"}, {"generate": "g1"})
    assert base != fingerprint("score", {"reward": "a"}, {"generate": "g2"})
