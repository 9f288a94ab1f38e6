"""Runs a job's stages in order (`alignlib.stages.STAGES`), skipping those whose output is complete and current.

A stage's fingerprint hashes the spec sections it declares and its inputs' fingerprints, so a changed
setting reruns that stage and everything downstream of it, and a killed job resumes where it stopped.
Before a stage runs, the pipeline checks that its inputs are complete for this spec and hold the
columns the stage reads, and names the file and the command to run otherwise.

    Pipeline(load_spec("jobs/demo.yaml")).run()            # everything
    Pipeline(spec).run(["score"])                           # one stage, inputs must exist
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from alignlib.raydata import ensure_ray, init_ray, log, ordered_data
from alignlib.spec import JobSpec, remote_code_models
from alignlib.stages import StageInputError, enabled_stages, stage, summarize
from alignlib.store import StageStore, fingerprint

__all__ = ["Pipeline", "StageInputError", "ensure_ray", "init_ray", "log", "ordered_data", "summarize"]


class Pipeline:
    def __init__(self, spec: JobSpec, force: bool = False):
        self.spec = spec
        self.store = StageStore(spec.output_dir)
        self.force = force
        self._fingerprints: dict[str, str] = {}

    def stages(self) -> list[str]:
        """This job's stages in the order they run."""
        return enabled_stages(self.spec)

    def upstream(self, name: str) -> list[str]:
        return stage(name).inputs(self.spec)

    def fingerprint(self, name: str) -> str:
        if name not in self._fingerprints:
            inputs = {u: self.fingerprint(u) for u in self.upstream(name)}
            self._fingerprints[name] = fingerprint(name, stage(name).sections(self.spec), inputs)
        return self._fingerprints[name]

    def check_remote_code(self) -> None:
        """Say which models may run their own code; refuse a local model that ships code the spec did not allow."""
        from alignlib.models import check_remote_code

        for field, model, trusted in remote_code_models(self.spec):
            if trusted:
                log(f"{field} is true: model {model} may run Python code shipped with it when loaded")
            else:
                check_remote_code(model, trusted, field)

    def check_inputs(self, name: str) -> None:
        """The stage's inputs are complete for this spec and hold every column it reads."""
        import pyarrow.dataset as pads

        for upstream in self.upstream(name):
            if not self.store.is_complete(upstream, self.fingerprint(upstream)):
                raise StageInputError(
                    f"stage {name!r} needs the output of {upstream!r} for this spec at "
                    f"{self.store.path(upstream)}, which is missing or was made from a different spec; "
                    f"run `alignlib {upstream} JOB.yaml` (or `alignlib run JOB.yaml`) first"
                )
        for where, columns in stage(name).reads(self.spec).items():
            source, table = where.split("/")
            path = self.store.path(source) / table
            present = pads.dataset(str(path), format="parquet").schema.names
            missing = [c for c in columns if c not in present]
            if missing:
                raise StageInputError(
                    f"stage {name!r} reads columns {missing} from {path}, which has only {sorted(present)}; "
                    f"rerun `alignlib {source} JOB.yaml --force`"
                )

    def run(self, only: list[str] | None = None) -> dict[str, dict[str, Any]]:
        self.check_remote_code()
        manifests = {}
        for name in only or self.stages():
            declared = stage(name)
            fp = self.fingerprint(name)
            if not self.force and self.store.is_complete(name, fp):
                log(f"{name}: complete, skipped ({self.store.path(name)})")
                manifests[name] = self.store.manifest(name)
                continue
            if not declared.enabled(self.spec):
                raise StageInputError(f"stage {name!r} is not part of this job: it runs only when "
                                      f"{declared.enabled_when}")  # fmt: skip
            self.check_inputs(name)
            log(f"{name}: running")
            started = time.time()
            with self.store.writer(name) as writer:
                stats = declared.run(self, writer)
                inputs = {u: self.fingerprint(u) for u in self.upstream(name)}
                manifests[name] = writer.commit(fp, inputs, stats)
            log(f"{name}: done in {time.time() - started:.1f}s -> {self.store.path(name)}  {_brief(manifests[name])}")
        return manifests

    def table_path(self, name: str, table: str) -> Path:
        return self.store.path(name) / table


def _brief(manifest: dict[str, Any]) -> str:
    return " ".join(f"{name}={rows}" for name, rows in manifest["tables"].items())

