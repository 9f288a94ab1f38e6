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


# -- in an object store (a real S3 server: SeaweedFS) ---------------------------------------------


def attempts(store, stage="pairs"):
    return sorted(p.name for p in store.base(stage).glob("attempt-*"))


def test_an_object_store_stage_commits_by_its_manifest_naming_the_attempt(s3_prefix, s3_server):
    from alignlib.store import read_table

    store = StageStore(s3_prefix, "round-1")
    manifest = commit_stage(store, rows=5)
    fs = s3_server.filesystem()
    base = s3_prefix.removeprefix("s3://") + "/round-1/pairs"
    with fs.open_input_stream(f"{base}/manifest.json") as f:
        assert json.loads(f.read()) == manifest
    assert attempts(store) == [manifest["attempt"]]
    assert str(store.path("pairs")) == f"{s3_prefix}/round-1/pairs/{manifest['attempt']}"
    assert read_table(store.path("pairs") / "pairs")["x"].to_pylist() == [0, 1, 2, 3, 4]
    assert store.is_complete("pairs", "abc") and not store.is_complete("pairs", "other")


def test_a_half_written_attempt_is_never_trusted_and_the_next_attempt_clears_it(s3_prefix):
    store = StageStore(s3_prefix)
    # A run killed mid-stage: its tables are in the store, its manifest was never written.
    killed = store.writer("pairs").__enter__()
    write_table(pa.table({"x": [1, 2]}), killed.table("pairs"))
    assert attempts(store) == [killed.path.name]
    assert store.manifest("pairs") is None and not store.is_complete("pairs", "abc")
    assert not store.path("pairs").exists(), "readers are not pointed at an uncommitted attempt"
    manifest = commit_stage(store, rows=4)
    assert attempts(store) == [manifest["attempt"]], "the killed attempt's files are gone"
    assert store.is_complete("pairs", "abc")


def test_a_killed_rerun_keeps_the_committed_attempt_and_a_recommit_replaces_it(s3_prefix):
    store = StageStore(s3_prefix)
    first = commit_stage(store, rows=3)
    with pytest.raises(RuntimeError), store.writer("pairs") as out:
        write_table(pa.table({"x": [9]}), out.table("pairs"))
        raise RuntimeError("the stage failed")
    assert attempts(store) == [first["attempt"]] and store.is_complete("pairs", "abc")
    killed = store.writer("pairs").__enter__()
    write_table(pa.table({"x": [9]}), killed.table("pairs"))
    assert store.is_complete("pairs", "abc"), "the committed attempt is still the one readers see"
    second = commit_stage(store, rows=6, fp="def")
    assert attempts(store) == [second["attempt"]] and second["attempt"] != first["attempt"]
    assert store.is_complete("pairs", "def") and not store.is_complete("pairs", "abc")


def test_an_object_store_stage_with_a_missing_file_is_not_complete(s3_prefix):
    store = StageStore(s3_prefix)
    commit_stage(store)
    (store.path("pairs") / "pairs" / "part-00000.parquet").unlink()
    assert not store.is_complete("pairs", "abc")
