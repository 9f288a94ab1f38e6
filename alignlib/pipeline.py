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
from typing import Any

from alignlib.raydata import ensure_ray, log
from alignlib.spec import JobSpec, remote_code_models
from alignlib.stages import MODEL_STAGE, SHARED, RoundContext, StageInputError, enabled_stages, stage
from alignlib.store import StageStore, StorePath, fingerprint

__all__ = ["Pipeline", "StageInputError"]


class Pipeline:
    """One pass over a job's stages; in a multi-round job (`alignlib.rounds`), one round, or the shared stages.
    It is the `StageContext` the stages' run functions get.

    `round` is K for round K of a multi-round job (its stages live under `round-K/`), 0 for the stages
    such a job makes once per run (SHARED, at the top of output_dir), None for a single pass; `shared`
    is round 0's pipeline, and `earlier` the pipelines of the rounds before this one, whose outputs a
    round may read (accumulated training data). Stages see them as `self.round` (a `RoundContext`).
    """

    def __init__(
        self,
        spec: JobSpec,
        force: bool = False,
        flow: str = "train",
        *,
        round: int | None = None,
        shared: Pipeline | None = None,
        earlier: list[Pipeline] | None = None,
    ):
        self.spec = spec
        self.round = RoundContext(round, list(earlier or [])) if round is not None else None
        self.shared = shared
        self.store = StageStore(spec.output_dir, f"round-{round}" if round else None, SHARED if round else ())
        if round is None and spec.rounds.count > 1 and flow == "train":
            raise ValueError(
                f"job {spec.name!r} has {spec.rounds.count} rounds: run it with "
                "alignlib.rounds.Rounds(spec) (as `alignlib run` does), or set rounds.count=1"
            )
        self.force = force
        self.flow = flow  # `train` (alignlib run) or `bon` (alignlib bon): which declared stages this job has
        self._fingerprints: dict[str, str] = {}

    def stages(self) -> list[str]:
        """This job's stages in the order they run (a round's own, or only the shared ones)."""
        names = enabled_stages(self.spec, self.flow)
        if self.round is None:
            return names
        if self.round.number == 0:
            return [n for n in names if n in SHARED]
        return [n for n in names if n not in SHARED]

    def upstream(self, name: str) -> list[str]:
        return stage(name).inputs(self.spec)

    def fingerprint(self, name: str) -> str:
        if self.shared is not None and name in SHARED:
            return self.shared.fingerprint(name)
        if name not in self._fingerprints:
            inputs = {u: self.fingerprint(u) for u in self.upstream(name)}
            key = self._round_key()
            if key is not None:
                inputs["round"] = key
            self._fingerprints[name] = fingerprint(name, stage(name).sections(self.spec), inputs)
        return self._fingerprints[name]

    def _round_key(self) -> str | None:
        """What makes round K's outputs round K's: its number, its prompt slice, and the round before it
        (whose export fingerprint chains every earlier round: redo round 1 and every later round is redone).

        None for a single pass, and for round 1 on all the prompts: that round is a single pass, with the
        same fingerprints.
        """
        rounds, here = self.spec.rounds, self.round
        if here is None or not here.number or (here.number == 1 and rounds.prompts == "same"):
            return None
        prompts = f"fresh/{rounds.count}" if rounds.prompts == "fresh" else "same"
        before = here.earlier[-1].fingerprint(MODEL_STAGE) if here.earlier else None
        return f"{here.number}|{prompts}|{rounds.train_on if here.earlier else ''}|{before}"

    def _round_option(self) -> str:
        return f" --round {self.round.number}" if self.round is not None and self.round.number else ""

    def todo(self, names: list[str] | None = None) -> list[str]:
        """The stages (of `names`, by default all of this pipeline's) a run would do now."""
        return self._todo(names if names is not None else self.stages())

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

        from alignlib.store import fs_path

        for upstream in self.upstream(name):
            if not self.store.is_complete(upstream, self.fingerprint(upstream)):
                raise StageInputError(
                    f"stage {name!r} needs the output of {upstream!r} for this spec at "
                    f"{self.store.path(upstream)}, which is missing or was made from a different spec; "
                    f"run `alignlib {upstream} JOB.yaml{self._round_option()}` (or `alignlib run JOB.yaml`) first"
                )
        for where, columns in stage(name).reads(self.spec).items():
            source, table = where.split("/")
            path = self.store.path(source) / table
            filesystem, where = fs_path(path)
            present = pads.dataset(where, format="parquet", filesystem=filesystem).schema.names
            missing = [c for c in columns if c not in present]
            if missing:
                raise StageInputError(
                    f"stage {name!r} reads columns {missing} from {path}, which has only {sorted(present)}; "
                    f"rerun `alignlib {source} JOB.yaml{self._round_option()} --force`"
                )

    def _todo(self, names: list[str]) -> list[str]:
        """The stages among `names` this run will do: not complete for this spec, or all of them with force."""
        return [n for n in names if self.force or not self.store.is_complete(n, self.fingerprint(n))]

    def check_sources(self, names: list[str]) -> None:
        """The data file and models the stages about to run read exist and are what their fields say."""
        from alignlib.sources import problems
        from alignlib.spec import SpecError

        found = problems(self.spec, self._todo(names))
        if found:
            raise SpecError("job spec", found)

    def check_resources(self, names: list[str]) -> None:
        """What the stages about to run ask Ray for, against what Ray has, before any of them starts.

        On a Ray that alignlib starts itself (no RAY_ADDRESS), a request that one node can never satisfy is
        refused at once, naming the field: it would otherwise wait for ever (Ray Data's and Ray Train's
        schedulers keep waiting for an autoscaler that is not there). On a cluster nodes can still be added,
        so nothing is refused; one line per such request says what will wait for the autoscaler.
        """
        import os

        import ray

        from alignlib.spec import SpecError
        from alignlib.stages import Demand

        attached = ray.is_initialized() or bool(os.environ.get("RAY_ADDRESS"))
        wanted: list[Demand] = [d for n in self._todo(names) for d in stage(n).demands(self.spec)]
        cpus = os.cpu_count() or 1
        if not wanted or (
            not attached
            and all(set(d.per_actor) <= {"CPU"} and d.per_actor.get("CPU", 0) * d.count <= cpus for d in wanted)
        ):
            return  # nothing to ask for, or it fits this machine's CPUs: no need to start Ray just to ask it
        ensure_ray()
        have = ray.cluster_resources()
        found = {}
        for d in wanted:
            # Gang-started workers (Ray Train) must all fit at once; an actor pool needs at least one actor.
            need = {k: v * (d.count if d.gang else 1) for k, v in d.per_actor.items()}
            short = {k: v for k, v in need.items() if v > have.get(k, 0)}
            if not short or d.field in found:
                continue
            what = ", ".join(f"{v:g} {k}" for k, v in sorted(short.items()))
            has = ", ".join(f"{have.get(k, 0):g} {k}" for k in sorted(short))
            if attached:
                found[d.field] = (
                    f"{d.stage}: asks for {what} ({d.field}); the cluster has {has} now, so it will "
                    "wait for the autoscaler to add nodes (or lower the request)"
                )
                log(found[d.field])
                continue
            hint = _RESOURCE_HINTS.get(d.field, f"lower {d.field}")
            found[d.field] = (
                f"{d.field}: the {d.stage} stage asks for {what}; the local Ray alignlib started has {has} and "
                f"would wait for ever; {hint}, or run on a cluster (RAY_ADDRESS)"
            )
        if found and not attached:
            raise SpecError("job spec", list(found.values()))

    def check_given_inputs(self, names: list[str]) -> None:
        """Inputs this run does not make itself must be there before anything starts."""
        for name in names:
            for upstream in self.upstream(name):
                if upstream not in names and not self.store.is_complete(upstream, self.fingerprint(upstream)):
                    raise StageInputError(
                        f"stage {name!r} needs the output of {upstream!r} for this spec at "
                        f"{self.store.path(upstream)}, which is missing or was made from a different spec; "
                        f"run `alignlib {upstream} JOB.yaml{self._round_option()}` (or `alignlib run JOB.yaml`) first"
                    )

    def run(self, only: list[str] | None = None) -> dict[str, dict[str, Any]]:
        names = only or self.stages()
        self.check_remote_code()
        self.check_sources(names)
        self.check_given_inputs([n for n in names if stage(n).enabled(self.spec)])
        self.check_resources(names)
        manifests = {}
        for name in names:
            declared = stage(name)
            fp = self.fingerprint(name)
            if not self.force and self.store.is_complete(name, fp):
                log(f"{name}: complete, skipped ({self.store.path(name)})")
                manifests[name] = self.store.manifest(name) or {}
                continue
            if not declared.enabled(self.spec):
                raise StageInputError(
                    f"stage {name!r} is not part of this job: it runs only when {declared.enabled_when}"
                )
            self.check_inputs(name)
            previous = self.store.manifest(name)
            if previous is not None and previous.get("fingerprint") != fp:
                # Never replaced in silence: a user comparing two variants (ORPO vs DPO) in one output_dir would
                # otherwise lose the first one's model and eval without a word.
                log(
                    f"{name}: {self.store.path(name)} holds the output of a different spec or input "
                    f"(fingerprint {previous.get('fingerprint')}, now {fp}); replacing it. To keep both, give each "
                    "variant its own output_dir"
                )
            log(f"{name}: running")
            started = time.time()
            with self.store.writer(name) as writer:
                result = declared.run(self, writer)
                inputs = {u: self.fingerprint(u) for u in self.upstream(name)}
                manifests[name] = writer.commit(fp, inputs, result.stats())
            log(f"{name}: done in {time.time() - started:.1f}s -> {self.store.path(name)}  {_brief(manifests[name])}")
        return manifests

    def table_path(self, name: str, table: str) -> StorePath:
        return self.store.path(name) / table


_RESOURCE_HINTS = {
    "generate.resources": "set generate.resources={CPU: 1} for a machine without a GPU",
    "score.reward.resources": "set score.reward.resources={CPU: 1} for a machine without a GPU",
    "train.backend": "set train.backend.use_gpu=false (and train.backend.num_workers to at most the CPUs)",
}


def _brief(manifest: dict[str, Any]) -> str:
    return " ".join(f"{name}={rows}" for name, rows in manifest["tables"].items())
