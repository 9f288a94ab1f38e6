"""The job spec: its schema (`job.py`), how a file becomes one (`loading.py`), reward-function references
(`functions.py`). Everything a caller needs is importable from here:

    from alignlib.spec import load_spec
    spec = load_spec("jobs/demo.yaml", overrides=["train.epochs=2"])
"""

from alignlib.spec.functions import resolve_function, resolve_reward
from alignlib.spec.job import (
    DEFAULT_REWARD,
    LOSSES_NEEDING_PAIRS,
    LOSSES_NEEDING_REFERENCE,
    POLICY_STRATEGIES,
    DataSpec,
    EvalSpec,
    ExportSpec,
    FunctionRewardSpec,
    GenerateSpec,
    JobSpec,
    ModelRewardSpec,
    ModelSpec,
    PairsSpec,
    RoundsSpec,
    ScoreSpec,
    ServeSpec,
    TrainSpec,
    WeakModelSpec,
    cross_check,
    eval_temperature,
    most,
    reference_model,
    reference_source,
    remote_code_models,
    reward_name,
)
from alignlib.spec.loading import (
    SpecError,
    apply_overrides,
    expanded_size,
    json_schema,
    later_spec,
    load_raw,
    load_spec,
    parse_spec,
)

__all__ = [
    "DEFAULT_REWARD", "LOSSES_NEEDING_PAIRS", "LOSSES_NEEDING_REFERENCE", "POLICY_STRATEGIES", "DataSpec", "EvalSpec", "ExportSpec",
    "FunctionRewardSpec", "GenerateSpec", "JobSpec", "ModelRewardSpec", "ModelSpec", "PairsSpec", "ScoreSpec",
    "ServeSpec", "SpecError", "TrainSpec", "WeakModelSpec", "apply_overrides", "cross_check", "eval_temperature",
    "expanded_size", "json_schema", "later_spec", "load_raw", "load_spec", "most", "parse_spec", "reference_model", "reference_source",
    "remote_code_models", "resolve_function", "resolve_reward", "reward_name", "RoundsSpec",
]  # fmt: skip
