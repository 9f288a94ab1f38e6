"""What a stage is and what it gets: the `Stage` declaration, the `StageContext` a stage's `run` is handed, the
`RoundContext` of a multi-round job, and the `StageResult` every stage returns.

A stage module (`alignlib/stages/<name>.py`) declares one `Stage` and owns its run function, its typed result and
that result's summary lines; `alignlib.stages` lists the declarations in run order. The pipeline that runs them
(`alignlib.pipeline.Pipeline`) implements `StageContext`; stages never import it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from alignlib.spec import JobSpec
from alignlib.store import StageStore, StageWriter, StorePath


class StageInputError(RuntimeError):
    """A stage cannot run on what it was given (missing or mismatched inputs, nothing left to train on)."""


class StageContext(Protocol):
    """What a stage's `run` gets from whatever runs it: the job, where outputs live, and its place among rounds."""

    @property
    def spec(self) -> JobSpec: ...

    @property
    def store(self) -> StageStore: ...

    @property
    def force(self) -> bool:
        """Redo the work even where a finished (or half-finished) result exists."""
        ...

    @property
    def round(self) -> RoundContext | None:
        """Where this pass sits in a multi-round job; None for a single pass."""
        ...

    def fingerprint(self, name: str) -> str: ...

    def table_path(self, name: str, table: str) -> StorePath: ...

    def todo(self, names: list[str] | None = None) -> list[str]:
        """The stages (of `names`, by default all of this pass's) a run would do now."""
        ...


@dataclass
class RoundContext:
    """A pass's place in a multi-round job (`alignlib.rounds`), handed to the stages that read it.

    - `number`: K for round K, 0 for the stages made once per run (`SHARED`);
    - `earlier`: the rounds before this one, oldest first (their training sets, for `rounds.train_on:
      accumulated`; round 1's weak-model answers);
    - `ahead`: the next round, set while this pass's held-out sampling may also draw its candidates
      (`alignlib.stages.ahead`);
    - `sampled_ahead`: this run's held-out sampling of the round before drew this round's candidates: its
      generate stage adopts them even under --force.
    """

    number: int
    earlier: list[StageContext] = field(default_factory=list)
    ahead: StageContext | None = None
    sampled_ahead: bool = False


R = TypeVar("R", bound="StageResult")


@dataclass
class StageResult:
    """A stage's figures, stored as its manifest's `stats` (a JSON object) and read back with `from_stats`.

    Subclasses are dataclasses; `summary` gives the lines `alignlib run` prints for the stage at the end.
    """

    def stats(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_stats(cls: type[R], stats: dict[str, Any]) -> R:
        """The result a manifest holds. A field an older manifest lacks reads as its default, or None: a finished
        run stays readable when a result gains a field."""
        values = {}
        for f in dataclasses.fields(cls):
            if f.name in stats:
                values[f.name] = stats[f.name]
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                values[f.name] = None
        return cls(**values)

    def summary(self, where: StorePath) -> list[str]:
        """Lines for the end-of-run summary; `where` is the stage's output directory."""
        return []


@dataclass
class FlatResult(StageResult):
    """A result whose figures are named by the data (one per reward column, per pair strategy, per drop reason):
    kept as one mapping, stored flat."""

    values: dict[str, Any] = field(default_factory=dict)

    def stats(self) -> dict[str, Any]:
        return dict(self.values)

    @classmethod
    def from_stats(cls: type[R], stats: dict[str, Any]) -> R:
        return cls(values=dict(stats))  # type: ignore[call-arg]


@dataclass(frozen=True)
class Demand:
    """What one stage asks Ray for at its peak: `count` actors (or Train workers), each needing `per_actor`.

    `field` is the spec field that sets it, for error messages (`alignlib k8s` refusing an actor no pod fits).
    `gang`: all `count` must be placed at once (Ray Train's workers start together); otherwise one is enough to
    start (an actor pool).
    """

    stage: str
    field: str
    count: int
    per_actor: dict[str, float]
    gang: bool = False


def _no_inputs(spec: JobSpec) -> list[str]:
    return []


def _no_reads(spec: JobSpec) -> dict[str, list[str]]:
    return {}


def _always(spec: JobSpec) -> bool:
    return True


def _no_demands(spec: JobSpec) -> list[Demand]:
    return []


@dataclass(frozen=True)
class Stage:
    """One stage, declared once. Read by the pipeline (order, fingerprints, input checks), the CLI (one command per
    stage), `alignlib k8s` (sizing from `demands`) and the report (`result` and its summary lines).

    - `sections`: the spec sections the output depends on, hashed into the stage's fingerprint;
    - `inputs`: the stages it reads; `reads`: "stage/table" -> the columns it reads of them;
    - `enabled`: whether a job has it (`enabled_when` says the condition in words);
    - `flows`: `train` (alignlib run) and/or `bon` (alignlib bon);
    - `makes_model`: its output is the pass's trained model, the next round's policy (the round chain hashes its
      fingerprint);
    - `evaluates`: it only judges the pass's model: a round whose only stages to redo are these makes no new model
      for the next round, and these run once the next round is known (they may sample its candidates ahead);
    - `figures`: the stage's entries in a round's row of `rounds.json`, from its committed output and result.
    """

    name: str
    help: str
    run: Callable[[StageContext, StageWriter], StageResult]
    result: type[StageResult]
    sections: Callable[[JobSpec], dict[str, Any]]
    inputs: Callable[[JobSpec], list[str]] = _no_inputs
    reads: Callable[[JobSpec], dict[str, list[str]]] = _no_reads
    enabled: Callable[[JobSpec], bool] = _always
    enabled_when: str = ""
    demands: Callable[[JobSpec], list[Demand]] = _no_demands
    flows: tuple[str, ...] = ("train",)
    makes_model: bool = False
    evaluates: bool = False
    figures: Callable[[StageContext, Any], dict[str, Any]] | None = None
