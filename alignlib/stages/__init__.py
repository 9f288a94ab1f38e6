"""Every stage of a job, one module each, listed here in run order. The pipeline, fingerprints, CLI and Kubernetes
sizing read `STAGES`; adding a stage is one module declaring a `Stage` and one line below.

    prompts -> generate -> score -> pairs -> [ref_logps] -> train -> export -> eval      (alignlib run)
    prompts -> generate -> score -> select                                               (alignlib bon)

A stage module holds the declaration (`STAGE`), its run function, its typed result and that result's summary lines;
what a stage is and gets is in `contract.py`. Heavy imports (Ray, torch, vLLM) happen inside run functions, so
reading this list (the CLI, `alignlib k8s`) stays light.
"""

from __future__ import annotations

from alignlib.spec import JobSpec
from alignlib.stages import eval as eval_stage
from alignlib.stages import export, generate, pairs, prompts, ref_logps, score, select, train
from alignlib.stages.contract import (
    Demand,
    RoundContext,
    Stage,
    StageContext,
    StageInputError,
    StageResult,
)

STAGES: list[Stage] = [
    prompts.STAGE,
    generate.STAGE,
    score.STAGE,
    pairs.STAGE,
    ref_logps.STAGE,
    train.STAGE,
    export.STAGE,
    eval_stage.EVAL,
    eval_stage.BASELINE,
    select.STAGE,
]

# Made once per run and shared by every round of a multi-round job (at the top of output_dir).
SHARED = ("prompts", "baseline")

BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
NAMES: list[str] = [s.name for s in STAGES]
(MODEL_STAGE,) = [s.name for s in STAGES if s.makes_model]  # the stage whose output is a pass's trained model

__all__ = [
    "BY_NAME",
    "MODEL_STAGE",
    "NAMES",
    "SHARED",
    "STAGES",
    "Demand",
    "RoundContext",
    "Stage",
    "StageContext",
    "StageInputError",
    "StageResult",
    "demands",
    "enabled_stages",
    "stage",
]


def stage(name: str) -> Stage:
    return BY_NAME[name]


def enabled_stages(spec: JobSpec, flow: str = "train") -> list[str]:
    """This job's stages in `flow`, in the order they run."""
    return [s.name for s in STAGES if flow in s.flows and s.enabled(spec)]


def demands(spec: JobSpec, flow: str = "train") -> list[Demand]:
    """Every enabled stage's peak request to Ray, read from the same spec fields the stages pass to Ray
    (and, for a multi-round job, those of rounds 2+ where `rounds.later` changes them)."""
    found = [d for s in STAGES if flow in s.flows and s.enabled(spec) for d in s.demands(spec)]
    if flow == "train" and spec.rounds.count > 1 and spec.rounds.later:
        from alignlib.spec import later_spec

        found += [d for d in demands(later_spec(spec)) if d not in found]
    return found
