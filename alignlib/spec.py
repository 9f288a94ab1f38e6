"""The job spec: one typed, validated YAML document drives every stage.

This module is the only home of defaults and field descriptions. Unknown keys are errors
(`extra="forbid"`); loss and backend are discriminated unions so each variant carries only its
own knobs; cross-field problems are collected and reported together with their field paths.

    spec = load_spec("jobs/demo.yaml", overrides=["train.epochs=2"])
"""

from __future__ import annotations

import copy
import importlib
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class SpecError(ValueError):
    """A job spec failed to load or validate; `problems` holds one "path: message" per problem."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s) in the job spec:\n{lines}")


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


TRUST_REMOTE_CODE = (
    "Let transformers and vLLM import Python code shipped with the model (its config.json `auto_map`). "
    "Off by default: such code runs with the job's rights. When on, the job logs it once per model."
)


class DataSpec(_Spec):
    path: str = Field(description="Prompt file: .jsonl or .parquet (or a directory of .parquet files).")
    format: Literal["auto", "jsonl", "parquet"] = Field(
        "auto", description="File format; `auto` decides from the file extension."
    )
    kind: Literal["prompts", "preferences"] = Field(
        "prompts",
        description="`prompts`: prompts to sample answers for. `preferences`: an existing preference set "
        "(prompt/chosen/rejected, the TRL layout) that goes straight to the pairs stage; generate and score are "
        "skipped.",
    )
    prompt_field: str = Field(
        "prompt",
        description="Field holding the prompt: a string, or a chat list of {role, content} messages "
        "(the conversational layout TRL and the alignment-handbook use). A chat that ends with an assistant "
        "turn (a `messages` column) is the prompt plus its answer, which becomes the reference. Without this "
        "field, chosen and rejected chats give the prompt as their shared leading turns (TRL's implicit prompt).",
    )
    chosen_field: str = Field(
        "chosen", description="Preference sets: the preferred answer, a string or a chat (prompt turns + answer)."
    )
    rejected_field: str = Field("rejected", description="Preference sets: the other answer, same forms as chosen.")
    reference_field: str | None = Field(
        None, description="Field holding the gold answer (needed by `gold_vs_weak` pairs and most function rewards)."
    )
    eval_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="Share of prompts held out for the eval stage (chosen by a stable hash)."
    )
    limit: int | None = Field(None, ge=1, description="Use only the first N prompts of the file (for smoke runs).")
    on_bad_rows: Literal["error", "reject"] = Field(
        "error",
        description="What a bad row does: invalid JSON or UTF-8, a missing, null, empty or wrongly typed field, a "
        "second, different answer to a prompt, or (data.kind prompts) a prompt that with generate.max_new_tokens "
        "does not fit the context of a model that generates from it. `error`: the first one stops the job, naming "
        "its file, line or row, and field. `reject`: bad rows are set aside into `prompts/rejected_rows` (source, "
        "field, reason, message, raw), counted by reason in the manifest and the summary, and the valid rows go "
        "on. A problem with the file itself (missing, empty, unreadable, a missing Parquet column) always stops.",
    )


class ModelSpec(_Spec):
    model: str = Field(
        description="`builtin:tiny-policy` | `builtin:tiny-weak` | `builtin:tiny-reward`, a local directory, "
        "or a Hugging Face model id; all go through `from_pretrained`."
    )
    chat_template: str | None = Field(
        None,
        description="Jinja chat template to use instead of the tokenizer's own. Prompts are rendered with the "
        "chat template when there is one, and used as raw text when there is none.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype; `auto` is bfloat16 on GPU and float32 on CPU."
    )
    trust_remote_code: bool = Field(False, description=TRUST_REMOTE_CODE)


class WeakModelSpec(ModelSpec):
    num_samples: int = Field(1, ge=1, description="Completions per prompt from the weak model.")


def _refuse_remote_code_kwarg(kwargs: dict[str, Any], field: str) -> dict[str, Any]:
    """Remote code is switched on per model, where it is logged, never through raw engine arguments."""
    if "trust_remote_code" in kwargs:
        raise ValueError(f"trust_remote_code is not an engine argument here; set {field}: true instead")
    return kwargs


PARALLEL_KWARGS = ("tensor_parallel_size", "pipeline_parallel_size")


class GenerateSpec(_Spec):
    engine: Literal["vllm", "transformers"] = Field(
        "vllm", description="`vllm` (Ray Data LLM processor) or `transformers` (HF generate in an actor pool)."
    )
    num_samples: int = Field(4, ge=1, description="Candidates per prompt from the policy (the N of best-of-N).")
    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(1.0, ge=0.0, description="0 means greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    batch_size: int = Field(64, ge=1, description="Rows per batch sent to one engine actor.")
    concurrency: int | tuple[int, int] = Field(
        1, description="Engine actors: a fixed count, or [min, max] for an autoscaling pool."
    )
    resources: dict[str, float] = Field(
        {"GPU": 1.0},
        description="Resources of one engine actor, e.g. {GPU: 1} or {CPU: 1}. vllm: of one tensor/pipeline-"
        "parallel worker; a replica reserves tensor_parallel_size * pipeline_parallel_size of these bundles.",
    )
    engine_kwargs: dict[str, Any] = Field(
        {}, description="Extra vLLM engine arguments (e.g. max_model_len, tensor_parallel_size)."
    )
    accelerator_type: str | None = Field(
        None, description="vllm: schedule engine replicas only on nodes with this accelerator (e.g. H100, A100)."
    )
    max_pending_requests: int | None = Field(
        None,
        ge=1,
        description="vllm: requests one replica keeps queued in its engine at most; null: vLLM's max_num_seqs "
        "plus 10%.",
    )
    vllm_runner: Literal["processor", "llm"] = Field(
        "processor",
        description="vllm: `processor` runs ray.data.llm's processor (vLLM's async engine; tensor/pipeline-"
        "parallel placement, max_pending_requests). `llm` runs `vllm.LLM.generate` on each batch in a Ray Data "
        "actor pool: one engine per actor on its own resources, no second engine process, final outputs only.",
    )
    weak_model: WeakModelSpec | None = Field(
        None, description="A weaker model whose answers serve as `rejected` in `gold_vs_weak` pairs."
    )

    @field_validator("engine_kwargs")
    @classmethod
    def _no_remote_code(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _refuse_remote_code_kwarg(value, "policy.trust_remote_code (or generate.weak_model.trust_remote_code)")

    @model_validator(mode="after")
    def _llm_runner_is_one_engine_per_actor(self) -> GenerateSpec:
        if self.vllm_runner == "llm":
            parallel = {k: self.engine_kwargs[k] for k in PARALLEL_KWARGS if self.engine_kwargs.get(k, 1) != 1}
            if parallel:
                raise ValueError(
                    f"vllm_runner llm runs one engine per actor; {parallel} needs vllm_runner: processor, which "
                    "places each tensor/pipeline-parallel worker"
                )
        return self

    @field_validator("concurrency")
    @classmethod
    def _concurrency_range(cls, value: int | tuple[int, int]) -> int | tuple[int, int]:
        low, high = (value, value) if isinstance(value, int) else value
        if low < 1 or high < low:
            raise ValueError("must be a count >= 1 or [min, max] with 1 <= min <= max")
        return value

    @field_validator("resources")
    @classmethod
    def _resources_positive(cls, value: dict[str, float]) -> dict[str, float]:
        bad = [k for k, v in value.items() if v < 0]
        if bad:
            raise ValueError(f"resource amounts must be >= 0 (got negative {bad})")
        return value


class ModelRewardSpec(_Spec):
    type: Literal["model"]
    model: str = Field(description="A sequence-classification reward model (num_labels=1), e.g. builtin:tiny-reward.")
    engine: Literal["transformers", "vllm"] = Field(
        "transformers",
        description="`transformers`: an HF sequence classifier in a Ray Data actor pool, batches grouped by length. "
        "`vllm`: vLLM's classify task through ray.data.llm (the same score, from vLLM's batching).",
    )
    batch_size: int = Field(32, ge=1)
    concurrency: int | tuple[int, int] = 1
    resources: dict[str, float] = Field({"GPU": 1.0})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_length: int = Field(1024, ge=8, description="Prompt + completion tokens scored (prompt truncated on the left).")
    engine_kwargs: dict[str, Any] = Field(
        {}, description="engine vllm: extra vLLM engine arguments (e.g. enforce_eager, max_model_len)."
    )
    trust_remote_code: bool = Field(False, description=TRUST_REMOTE_CODE)

    @field_validator("engine_kwargs")
    @classmethod
    def _no_remote_code(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _refuse_remote_code_kwarg(value, "trust_remote_code on this reward")

    @model_validator(mode="after")
    def _kwargs_need_vllm(self) -> ModelRewardSpec:
        if self.engine_kwargs and self.engine != "vllm":
            raise ValueError("engine_kwargs are vLLM engine arguments; they need engine: vllm")
        return self


class FunctionRewardSpec(_Spec):
    type: Literal["function"]
    function: str = Field(
        description="`module:function` called as fn(prompt=str, completion=str, reference=str|None) -> float. "
        "The module is imported by name (dotted, on the Python path); file paths and private names are refused."
    )

    @field_validator("function")
    @classmethod
    def _importable(cls, value: str) -> str:
        resolve_function(value)
        return value


RewardSpec = Annotated[Union[ModelRewardSpec, FunctionRewardSpec], Field(discriminator="type")]

DEFAULT_REWARD = "alignlib.rewards:exact_match"


class _Weighted(_Spec):
    weight: float = Field(1.0, allow_inf_nan=False, description="Factor of this reward in the weighted sum.")
    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_]+$",
        description="Names the column `reward_<name>`; defaults to the function's name or the model's last path part.",
    )


class WeightedModelReward(ModelRewardSpec, _Weighted):
    pass


class WeightedFunctionReward(FunctionRewardSpec, _Weighted):
    pass


WeightedRewardSpec = Annotated[Union[WeightedModelReward, WeightedFunctionReward], Field(discriminator="type")]


def reward_name(reward: ModelRewardSpec | FunctionRewardSpec) -> str:
    """`name` if given, else `numeric_closeness` for a function, `tiny_reward` for builtin:tiny-reward."""
    if getattr(reward, "name", None):
        return reward.name
    ref = reward.function.partition(":")[2] if reward.type == "function" else reward.model
    return re.sub(r"[^A-Za-z0-9_]", "_", re.split(r"[/:]", ref.rstrip("/"))[-1])


class ScoreSpec(_Spec):
    reward: RewardSpec | None = Field(
        None, description=f"One reward, stored as `reward`. When neither reward nor rewards is set: {DEFAULT_REWARD}."
    )
    rewards: list[WeightedRewardSpec] = Field(
        [],
        description="Several rewards: `reward` is their weighted sum and each one's own value is kept in "
        "`reward_<name>`.",
    )

    @model_validator(mode="after")
    def _one_way(self) -> ScoreSpec:
        if self.reward is not None and self.rewards:
            raise ValueError("set `reward` (one reward) or `rewards` (a weighted sum), not both")
        names = [reward_name(r) for r in self.rewards]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"rewards named {twice} more than once; give each a distinct `name`")
        return self

    def components(self) -> list[tuple[str, ModelRewardSpec | FunctionRewardSpec, float | None]]:
        """(column, reward, weight) per reward; one unweighted reward writes `reward` itself."""
        if self.rewards:
            return [(f"reward_{reward_name(r)}", r, r.weight) for r in self.rewards]
        reward = self.reward or FunctionRewardSpec(type="function", function=DEFAULT_REWARD)
        return [("reward", reward, None)]


PairStrategy = Literal[
    "best_vs_worst", "best_vs_rest", "best_vs_second", "best_vs_random", "rejected_at_mean_minus_2std", "gold_vs_weak"
]
POLICY_STRATEGIES = ("best_vs_worst", "best_vs_rest", "best_vs_second", "best_vs_random", "rejected_at_mean_minus_2std")


class PairsSpec(_Spec):
    strategy: PairStrategy | list[PairStrategy] = Field(
        "best_vs_worst",
        description="How policy samples of a prompt are paired (chosen = the highest reward): best_vs_worst "
        "(the i-th best vs the i-th worst), best_vs_rest, best_vs_second, best_vs_random (seeded by seed and "
        "prompt), rejected_at_mean_minus_2std (rejected nearest mean - 2 std of the rewards); gold_vs_weak: the "
        "reference answer vs the weak model's. A list applies several.",
    )
    min_margin: float = Field(
        0.1, ge=0.0, description="Pairs whose reward gap is below this are dropped (and counted)."
    )
    max_pairs_per_prompt: int = Field(
        1, ge=1, description="Cap per prompt and strategy, largest margins first (best_vs_random: in random order)."
    )
    length_penalty: float = Field(
        0.0,
        ge=0.0,
        description="Subtracted from a completion's reward per character of its text before ranking; the pairs "
        "and sft tables carry the penalised rewards. Counters rewards that grow with length.",
    )
    include_truncated: bool = Field(
        False,
        description="Use completions cut off at max_new_tokens (finish_reason `length`); by default they are "
        "dropped (and counted).",
    )
    sft_min_reward: float | None = Field(
        None, description="Best-of-N rows below this reward are left out of the SFT set (and counted)."
    )

    @property
    def strategies(self) -> list[str]:
        return [self.strategy] if isinstance(self.strategy, str) else list(dict.fromkeys(self.strategy))


class SFTLossSpec(_Spec):
    name: Literal["sft"]


class ORPOLossSpec(_Spec):
    name: Literal["orpo"]
    lambda_: float = Field(0.1, ge=0.0, description="Weight of the odds-ratio term (ORPO eq. 6).")


class DPOLossSpec(_Spec):
    name: Literal["dpo"]
    beta: float = Field(0.1, gt=0.0, description="Strength of the KL penalty (DPO eq. 7).")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="Assumed label-noise rate (conservative DPO).")


class IPOLossSpec(_Spec):
    name: Literal["ipo"]
    tau: float = Field(
        0.1, gt=0.0, description="Regularisation; the target log-ratio margin is 1/(2*tau) (IPO eq. 17)."
    )


class SimPOLossSpec(_Spec):
    name: Literal["simpo"]
    beta: float = Field(2.0, gt=0.0, description="Reward scale of the length-averaged log-prob (SimPO eq. 6).")
    gamma: float = Field(1.0, ge=0.0, description="Target reward margin (SimPO's gamma, in reward units).")


LossSpec = Annotated[
    Union[SFTLossSpec, ORPOLossSpec, DPOLossSpec, IPOLossSpec, SimPOLossSpec], Field(discriminator="name")
]


class DDPBackendSpec(_Spec):
    name: Literal["ddp"]
    num_workers: int = Field(1, ge=1, description="Ray Train workers (processes), one per GPU when use_gpu.")
    use_gpu: bool = True


class DeepSpeedBackendSpec(_Spec):
    name: Literal["deepspeed"]
    zero_stage: Literal[0, 1, 2, 3] = 3
    offload_optimizer: bool = Field(False, description="Keep optimizer state in CPU memory (ZeRO-Offload).")
    offload_params: bool = Field(False, description="Keep parameters in CPU memory (ZeRO-3 only).")
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = True


class QLoRABackendSpec(_Spec):
    name: Literal["qlora"]
    use_gpu: bool = True
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True

    @model_validator(mode="before")
    @classmethod
    def _one_worker(cls, data: Any) -> Any:
        if isinstance(data, dict) and "num_workers" in data:
            if data["num_workers"] != 1:
                raise ValueError(
                    f"num_workers {data['num_workers']!r}: the qlora backend trains on one worker (one GPU holds "
                    "the 4-bit base); for several workers use ddp with train.lora, or deepspeed"
                )
            data = {k: v for k, v in data.items() if k != "num_workers"}
        return data

    @property
    def num_workers(self) -> int:
        return 1  # one process holds the 4-bit base; QLoRA does not shard it


BackendSpec = Annotated[Union[DDPBackendSpec, DeepSpeedBackendSpec, QLoRABackendSpec], Field(discriminator="name")]


class LoraSpec(_Spec):
    r: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: str | list[str] = Field("all-linear", description="`all-linear` or module names.")


class TrainSpec(_Spec):
    loss: LossSpec = Field(default_factory=lambda: ORPOLossSpec(name="orpo"))
    backend: BackendSpec = Field(default_factory=lambda: DDPBackendSpec(name="ddp"))
    lora: LoraSpec | None = Field(None, description="Train LoRA adapters instead of all weights.")
    epochs: int = Field(1, ge=1)
    lr: float = Field(5.0e-5, gt=0.0)
    schedule: Literal["constant", "cosine"] = "cosine"
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    batch_size: int = Field(8, ge=1, description="Examples per worker per micro-step.")
    grad_accum: int = Field(
        1, ge=1, description="Micro-steps per optimizer step; global batch = batch_size * workers * grad_accum."
    )
    max_length: int = Field(
        512, ge=8, description="Prompt + completion tokens; prompts are truncated on the left first."
    )
    max_prompt_length: int | None = Field(
        None, ge=1, description="Keep at most this many prompt tokens (the last ones); null: only `max_length` applies."
    )
    group_by_length: bool = Field(
        True,
        description="Sort each window of 16 optimizer steps by length and shuffle the steps: less padding, "
        "the same examples per step whatever the micro-batch split.",
    )
    precompute_reference: bool = Field(
        False,
        description="DPO/IPO: compute reference log-probs once in a `ref_logps` stage (Ray Data actors) instead "
        "of keeping a reference model in every training worker.",
    )
    max_failures: int = Field(
        1, ge=0, description="Times Ray Train restarts the worker group from the last checkpoint after a failure."
    )
    gradient_checkpointing: bool = False
    log_every: int = Field(10, ge=1, description="Print a progress line every N optimizer steps.")


class ExportSpec(_Spec):
    merge_lora: bool = Field(True, description="Merge LoRA weights into the base (a plain HF model vLLM loads).")


class EvalSpec(_Spec):
    enabled: bool = True
    num_samples: int = Field(1, ge=1, description="Samples per held-out prompt, for both the base and trained policy.")
    temperature: float | None = Field(
        None, ge=0.0, description="Sampling temperature; defaults to generate.temperature."
    )


# A name that becomes part of a path (the Ray Train run directory): no separators, no `..`, no leading dot.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class JobSpec(_Spec):
    name: str = Field(
        description="Run name (names the Ray Train run directory): letters, digits, `.`, `_`, `-`; no path "
        "separators or `..`.",
        json_schema_extra={"pattern": SAFE_NAME.pattern},
    )
    output_dir: str = Field(description="Where every stage writes; on a cluster, a path all nodes share.")
    seed: int = 0
    data: DataSpec
    policy: ModelSpec
    generate: GenerateSpec = Field(default_factory=GenerateSpec)
    score: ScoreSpec = Field(default_factory=ScoreSpec)
    pairs: PairsSpec = Field(default_factory=PairsSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    export: ExportSpec = Field(default_factory=ExportSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not SAFE_NAME.fullmatch(value) or ".." in value:
            raise ValueError(
                f"{value!r} is not a plain name: it becomes part of a path under output_dir, so it may hold only "
                "letters, digits, `.`, `_` and `-`, start with a letter or digit, and contain no `/`, `\\` or `..`"
            )
        return value

    @field_validator("output_dir")
    @classmethod
    def _local_output(cls, value: str) -> str:
        if "://" in value and not value.startswith("file://"):
            raise ValueError(
                "remote URIs are not supported yet; use a path every node can read (local disk, NFS, a PVC)"
            )
        return value.removeprefix("file://")

    @model_validator(mode="after")
    def _cross_checks(self) -> JobSpec:
        problems = cross_check(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self


# Mirrors `losses.LOSSES[name].needs_reference` without importing torch at spec time (a unit test checks they agree).
LOSSES_NEEDING_REFERENCE = {"sft": False, "orpo": False, "dpo": True, "ipo": True, "simpo": False}


def cross_check(spec: JobSpec) -> list[str]:
    """Combinations that cannot work, each as "path: message"."""
    problems = []
    strategies = spec.pairs.strategies
    generated = spec.data.kind == "prompts"  # a preference set brings its own pairs
    if "gold_vs_weak" in strategies and generated:
        if spec.generate.weak_model is None:
            problems.append("generate.weak_model: pairs strategy gold_vs_weak needs a weak model")
        if spec.data.reference_field is None:
            problems.append("data.reference_field: pairs strategy gold_vs_weak needs the gold answer field")
    if set(POLICY_STRATEGIES) & set(strategies) and spec.generate.num_samples < 2 and generated:
        problems.append(f"generate.num_samples: strategy {strategies} compares policy samples, so it needs at least 2")
    if not generated:
        # Imported pairs are taken as they are; a setting that would change nothing is refused, not ignored.
        defaults = PairsSpec().model_dump()
        unused = sorted(k for k, v in spec.pairs.model_dump().items() if v != defaults[k])
        problems += [
            f"pairs.{k}: not used with data.kind preferences (imported pairs are kept as given)" for k in unused
        ]
        if spec.generate.weak_model is not None:
            problems.append("generate.weak_model: not used with data.kind preferences (nothing is generated)")
    backend = spec.train.backend
    if backend.name == "qlora" and spec.train.lora is None:
        problems.append("train.lora: the qlora backend trains LoRA adapters on a 4-bit base; set train.lora")
    if backend.name == "deepspeed" and backend.offload_params and backend.zero_stage != 3:
        problems.append("train.backend.offload_params: parameter offload needs zero_stage 3")
    if spec.train.precompute_reference and not LOSSES_NEEDING_REFERENCE.get(spec.train.loss.name, False):
        problems.append(
            f"train.precompute_reference: loss {spec.train.loss.name!r} uses no reference model (only dpo and ipo do)"
        )
    if spec.train.max_prompt_length is not None and spec.train.max_prompt_length >= spec.train.max_length:
        problems.append(
            f"train.max_prompt_length: {spec.train.max_prompt_length} leaves no room for the completion "
            f"within train.max_length {spec.train.max_length}"
        )
    if spec.eval.enabled and spec.train.lora is not None and not spec.export.merge_lora:
        problems.append("export.merge_lora: eval generates with the exported model, which needs merged LoRA weights")
    if spec.eval.enabled and spec.data.eval_fraction == 0:
        problems.append(
            "data.eval_fraction: eval is enabled but no prompts are held out (set > 0 or eval.enabled=false)"
        )
    return problems


_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_PUBLIC_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


def resolve_function(ref: str):
    """`module:function` -> the callable; ValueError with the reason if it cannot be had.

    Only a public function of a module importable by its dotted name is accepted: never a file path
    (which would run whatever file a spec points at), a private name, a class or another non-function.
    Nothing here evaluates the string; it is split, checked and looked up with getattr.
    """
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected `module:function` (e.g. alignlib.rewards:exact_match), got {ref!r}")
    if "/" in module_name or "\\" in module_name or module_name.endswith(".py"):
        raise ValueError(f"{module_name!r} is a file path; name an importable module (dotted, on the Python path)")
    if not _MODULE.fullmatch(module_name):
        raise ValueError(f"{module_name!r} is not a module name (dotted Python identifiers)")
    if not _PUBLIC_NAME.fullmatch(attr):
        raise ValueError(f"{attr!r} is not a public function name (private `_` names and attribute paths are refused)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"cannot import module {module_name!r}: {err}") from err
    fn = getattr(module, attr, None)
    if fn is None:
        raise ValueError(f"module {module_name!r} has no callable {attr!r}")
    if isinstance(fn, type) or not callable(fn):
        raise ValueError(f"{module_name}:{attr} is a {type(fn).__name__}, not a function")
    return fn


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides; values are parsed as YAML (so `x=[1, 4]` is a list)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise SpecError("command line", [f"{item!r}: overrides are key=value, e.g. train.epochs=2"])
        node = raw
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise SpecError("command line", [f"{key}: {where} is not a mapping, cannot set a key inside it"])
            node = child
        node[parts[-1]] = yaml.safe_load(text) if text else ""
    return raw


def _format_error(err: dict[str, Any]) -> list[str]:
    path = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in err["loc"]).replace(".[", "[")
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = "unknown key"
    if not path:  # cross-field problems from the model validator carry their own paths
        return message.splitlines()
    return [f"{path}: {message}"]


def _without(raw: dict[str, Any], locations: list[tuple]) -> dict[str, Any]:
    """A copy of `raw` without the keys at `locations` (union tags in a location are skipped)."""
    out = copy.deepcopy(raw)
    for loc in locations:
        node, parts = out, [p for p in loc if isinstance(p, str)]
        for i, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                continue
            if i == len(parts) - 1 or not isinstance(node[part], dict):
                del node[part]
                break
            node = node[part]
    return out


def parse_spec(raw: Any, source: str = "<spec>") -> JobSpec:
    if not isinstance(raw, dict):
        raise SpecError(source, ["the job spec must be a YAML mapping"])
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as err:
        errors = err.errors(include_url=False)
    problems = [line for e in errors for line in _format_error(e)]
    # pydantic runs cross-field checks only once every field is valid; validate again without
    # the bad keys so those problems are reported in the same run.
    try:
        JobSpec.model_validate(_without(raw, [e["loc"] for e in errors]))
    except ValidationError as again:
        problems += [line for e in again.errors(include_url=False) if not e["loc"] for line in _format_error(e)]
    raise SpecError(source, list(dict.fromkeys(problems)))


# A spec is a few hundred values; aliases may repeat parts of it, but not blow it up (a "billion laughs"
# document is a few lines whose aliases expand to billions of values once dumped or hashed).
MAX_SPEC_VALUES = 100_000


def expanded_size(raw: Any, limit: int = MAX_SPEC_VALUES) -> int:
    """The number of values in `raw` with every alias expanded; ValueError past `limit` or on a cycle.

    YAML aliases load as shared Python objects, so the document itself is small; the cost comes later
    when it is validated, dumped and hashed as a tree. Sizes are memoised per object: linear time.
    """
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: Any) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise ValueError("a YAML alias refers to a value that contains it (a recursive document)")
        active.add(key)
        children = [*node.keys(), *node.values()] if isinstance(node, dict) else node
        total = 1 + sum(size(child) for child in children)
        active.discard(key)
        if total > limit:
            raise ValueError(f"the document expands to more than {limit} values through its aliases")
        sizes[key] = total
        return total

    return size(raw)


def load_raw(path: str | Path) -> Any:
    """The YAML document of a spec file, unvalidated (SpecError if unreadable).

    `yaml.safe_load` builds only plain data: python/* tags (which would import or call) are refused.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SpecError(str(path), ["file not found"]) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise SpecError(str(path), [f"{where}invalid YAML: {getattr(err, 'problem', err)}"]) from None
    try:
        expanded_size(raw)
    except ValueError as err:
        raise SpecError(str(path), [f"refused: {err}"]) from None
    return raw if raw is not None else {}


def load_spec(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    raw = apply_overrides(load_raw(path), overrides or [])
    return parse_spec(raw, str(path))


def remote_code_models(spec: JobSpec) -> list[tuple[str, str, bool]]:
    """(field, model, trust_remote_code) of every model the job loads, `field` naming where to switch it on."""
    out = [("policy.trust_remote_code", spec.policy.model, spec.policy.trust_remote_code)]
    if spec.generate.weak_model is not None:
        weak = spec.generate.weak_model
        out.append(("generate.weak_model.trust_remote_code", weak.model, weak.trust_remote_code))
    if spec.score.reward is not None and spec.score.reward.type == "model":
        out.append(("score.reward.trust_remote_code", spec.score.reward.model, spec.score.reward.trust_remote_code))
    for i, reward in enumerate(spec.score.rewards):
        if reward.type == "model":
            out.append((f"score.rewards[{i}].trust_remote_code", reward.model, reward.trust_remote_code))
    return out


def stage_sections(spec: JobSpec) -> dict[str, dict[str, Any]]:
    """The parts of the spec each stage depends on; a change there invalidates the stage's output."""
    dump = spec.model_dump(mode="json")
    return {
        "prompts": {"data": dump["data"], "seed": spec.seed, "context": _context_settings(spec)},
        "generate": {"policy": dump["policy"], "generate": dump["generate"], "seed": spec.seed},
        "score": {"score": dump["score"]},
        "pairs": {"pairs": dump["pairs"], "seed": spec.seed},
        "train": {"policy": dump["policy"], "train": dump["train"], "seed": spec.seed},
        "export": {"export": dump["export"]},
        "eval": {
            "policy": dump["policy"],
            "eval": dump["eval"],
            "sampling": {k: dump["generate"][k] for k in ("engine", "max_new_tokens", "temperature", "top_p")},
            "score": dump["score"],
            "seed": spec.seed,
        },
    }


def _context_settings(spec: JobSpec) -> dict[str, Any] | None:
    """What the prompts stage's context-length check reads (see `alignlib.context`): changing it reruns the stage."""
    if spec.data.kind != "prompts":
        return None
    g = spec.generate
    models = [spec.policy] + ([g.weak_model] if g.weak_model is not None else [])
    return {
        "models": [[m.model, m.chat_template] for m in models],
        "max_new_tokens": g.max_new_tokens,
        "max_model_len": g.engine_kwargs.get("max_model_len") if g.engine == "vllm" else None,
    }


def eval_temperature(spec: JobSpec) -> float:
    return spec.generate.temperature if spec.eval.temperature is None else spec.eval.temperature


def json_schema() -> dict[str, Any]:
    return JobSpec.model_json_schema()


def global_batch(spec: JobSpec) -> int:
    return spec.train.batch_size * spec.train.backend.num_workers * spec.train.grad_accum


def optimizer_steps(spec: JobSpec, num_examples: int) -> int:
    per_epoch = math.ceil(num_examples / global_batch(spec))
    return max(1, per_epoch) * spec.train.epochs
