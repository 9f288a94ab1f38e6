"""The pairs stage at scale: the in-driver build against the Ray Data one, on synthetic scored tables of
10^5, 10^6 and 10^7 completions (8 per prompt), and the score and generate stages' driver-side output handling
(their key checks, score's reward means) before and after they moved to Arrow arrays.

Each measurement runs in a fresh process (Ray started, and Ray Data warmed up, before the clock starts), so its
peak RSS is that of the driver alone; Ray Data's workers are other processes. A watchdog kills a process whose
RSS passes `--rss-limit-gib` and reports it as such (the in-driver build of 10^7 rows needs more memory than
this machine has).

    .venv/bin/python benchmarks/pairs_scale.py                          # 10^5, 10^6, 10^7
    .venv/bin/python benchmarks/pairs_scale.py --rows 100000 1000000 --sides driver ray
    .venv/bin/python benchmarks/pairs_scale.py --rows 1000000 10000000 --text short   # 10^7 fits 24 GiB / 55 GB

The synthetic table has the scored schema with realistic text lengths: prompts of about 300 characters, answers
of 200 to 1,200 characters (drawn from a pool of distinct texts), one reward per row, `stop` or `length` as the
finish reason; `--text short` makes prompts of about 60 and answers of 20 to 120 characters. Printed: seconds and driver peak RSS per side and size, the time growth per 10x rows, and the
ratio driver/ray of the times (above 1: Ray Data is faster).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PER_PROMPT = 8


TEXT = {"realistic": ((250, 350), (200, 1200)), "short": ((40, 80), (20, 120))}  # (prompt, answer) characters


def make_table(rows: int, directory: Path, text: str = "realistic") -> None:
    """`rows` scored completions, PER_PROMPT per prompt, in Parquet files of 250,000 rows under `directory`."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from alignlib import schema as S

    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(5000)]

    def texts(n: int, low: int, high: int) -> list[str]:
        out = []
        for _ in range(n):
            length = int(rng.integers(low, high))
            picked = rng.choice(words, size=length // 5)
            out.append(" ".join(picked)[:length])
        return out

    (p_low, p_high), (a_low, a_high) = TEXT[text]
    prompt_pool, answer_pool = texts(2000, p_low, p_high), texts(20000, a_low, a_high)
    schema = S.arrow_schema(S.SCORED_COLUMNS)
    directory.mkdir(parents=True, exist_ok=True)
    chunk = 250_000
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        index = np.arange(start, start + n)
        prompt = index // PER_PROMPT
        prompt_text = [prompt_pool[i % len(prompt_pool)] for i in prompt]
        answers = rng.integers(0, len(answer_pool), size=n)
        completion = [answer_pool[i] for i in answers]
        table = pa.table(
            {
                S.PROMPT_ID: [f"p{i:08d}" for i in prompt],
                S.PROMPT: prompt_text,
                S.MESSAGES: [[{"role": "user", "content": t}] for t in prompt_text],
                S.GOLD: [None] * n,
                S.SOURCE: [f"data.jsonl:{i + 1}" for i in prompt],
                S.COMPLETION: completion,
                S.GENERATOR: ["policy"] * n,
                S.SAMPLE_INDEX: (index % PER_PROMPT).astype("int64"),
                S.SEED: index.astype("int64"),
                S.FINISH_REASON: np.where(rng.random(n) < 0.1, "length", "stop").tolist(),
                S.NUM_TOKENS: [len(c) // 4 for c in completion],
                S.REWARD: rng.normal(0.0, 1.0, size=n).round(3),
                S.REWARD_SOURCE: ["bench"] * n,
            }
        ).cast(schema)
        pq.write_table(table, directory / f"part-{start // chunk:05d}.parquet")


def prepare(rows: int, root: Path, text: str = "realistic") -> Path:
    """A run directory whose committed score stage holds the synthetic table (cached by size and text)."""
    import pyarrow as pa

    from alignlib import schema as S
    from alignlib.store import write_table

    run = root / (f"scored-{rows}" if text == "realistic" else f"scored-{rows}-{text}")
    if (run / "score" / "manifest.json").exists():
        return run
    make_table(rows, run / "score" / "scored", text)
    (run / "score" / "manifest.json").write_text(json.dumps({"stage": "score", "tables": {"scored": rows}}))
    prompts = pa.table({S.PROMPT_ID: [f"p{i:08d}" for i in range(rows // PER_PROMPT)]})
    write_table(prompts, run / "prompts" / "train")
    (run / "prompts" / "manifest.json").write_text(json.dumps({"stage": "prompts", "tables": {"train": 0}}))
    return run


def spec_for(run: Path):
    from alignlib.spec import parse_spec

    return parse_spec(
        {
            "name": "bench",
            "output_dir": str(run),
            "data": {"path": str(ROOT / "jobs/data/addition.jsonl")},
            "policy": {"model": "builtin:tiny-policy"},
            "pairs": {"strategy": ["best_vs_worst", "best_vs_rest"], "min_margin": 0.1, "max_pairs_per_prompt": 2},
        }
    )


def measure(side: str, rows: int, root: str, text: str = "realistic") -> dict:
    """In this (fresh) process: one pairs stage or one score-output check; seconds and peak RSS."""
    import resource
    from types import SimpleNamespace

    from alignlib.raydata import ensure_ray
    from alignlib.store import StageStore

    run = prepare(rows, Path(root), text)
    ensure_ray()
    import ray

    ray.data.range(8).map_batches(lambda b: b).materialize()  # Ray Data's first-use start-up, not timed
    started = time.perf_counter()
    if side in ("driver", "ray"):
        import os

        from alignlib.stages import pairs as pairs_stage

        os.environ["ALIGNLIB_PAIRS_DRIVER_MAX_ROWS"] = str(10**12 if side == "driver" else 0)
        spec = spec_for(run)
        store = StageStore(run)
        # The stage's context, for the pairs stage alone: its synthetic input has no score manifest to check.
        p = SimpleNamespace(
            spec=spec, store=store, round=None, force=False, table_path=lambda name, table: store.path(name) / table
        )
        with store.writer("pairs") as out:
            counts = pairs_stage.run(p, out).counts
        result = {"pairs": sum(v for k, v in counts.items() if k.startswith("pairs_")), "sft": counts["sft_rows"]}
    elif side.startswith("generate-"):  # the generate stage's row check, as before / now
        from alignlib import schema as S
        from alignlib.store import read_table
        from alignlib.verify import check_completions

        completions = run / "score" / "scored"  # the synthetic table holds completion keys: 8 per prompt
        ids = read_table(run / "prompts" / "train", columns=[S.PROMPT_ID])[S.PROMPT_ID]
        if side == "generate-before":
            python_key_check(
                completions, {(p, S.GENERATOR_POLICY, i) for p in ids.to_pylist() for i in range(PER_PROMPT)}
            )
        else:
            check_completions(completions, {S.GENERATOR_POLICY: (ids, PER_PROMPT)})
        result = {"prompts": len(ids)}
    else:  # the score stage's output handling: its key check and its means, as before / now
        from alignlib import schema as S
        from alignlib.store import read_table
        from alignlib.verify import check_scored

        scored = run / "score" / "scored"
        if side == "score-before":
            python_key_check(scored)
            values = read_table(scored)[S.REWARD].to_pylist()
            mean = sum(values) / len(values)
        else:
            check_scored(scored, scored)
            mean = stages_mean(read_table(scored, columns=[S.REWARD])[S.REWARD])
        result = {"mean_reward": round(mean, 6)}
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"side": side, "rows": rows, "seconds": round(seconds, 2), "peak_rss_gib": round(peak, 3), **result}


def python_key_check(scored, wanted: set | None = None) -> None:
    """The generate and score stages' key checks before they moved to Arrow: every key a Python tuple, in a list
    and a set (score: the completions' keys, here the same table's; generate: every prompt x sample index)."""
    from collections import Counter

    from alignlib.store import read_table
    from alignlib.verify import KEY

    table = read_table(scored, columns=list(KEY))
    keys = list(zip(*(table[c].to_pylist() for c in KEY), strict=True))
    counts, wanted = Counter(keys), set(keys) if wanted is None else wanted
    assert not [k for k, n in counts.items() if n > 1] and not wanted - counts.keys() and not counts.keys() - wanted


def stages_mean(values) -> float:
    from alignlib.stages.score import column_mean

    return column_mean(values)


def run_one(side: str, rows: int, root: Path, limit_gib: float, timeout: float, text: str) -> dict:
    import psutil

    proc = subprocess.Popen(
        [sys.executable, __file__, "--measure", side, str(rows), str(root), text],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    watched, peak, started = psutil.Process(proc.pid), 0.0, time.time()
    while proc.poll() is None:
        try:
            peak = max(peak, watched.memory_info().rss / 2**30)
        except psutil.Error:
            pass
        if peak > limit_gib or time.time() - started > timeout:
            proc.kill()
            proc.wait()
            why = f"over {limit_gib} GiB RSS" if peak > limit_gib else f"over {timeout:.0f} s"
            return {"side": side, "rows": rows, "failed": f"stopped: {why} after {time.time() - started:.0f} s"}
        time.sleep(0.2)
    out, err = proc.communicate()
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"side": side, "rows": rows, "failed": err.strip().splitlines()[-1] if err.strip() else "no result"}
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    parser.add_argument(
        "--sides", nargs="+", default=["driver", "ray", "score-before", "score-now", "generate-before", "generate-now"]
    )
    parser.add_argument("--dir", default=None, help="where the synthetic tables are kept (default: a temp dir)")
    parser.add_argument("--rss-limit-gib", type=float, default=14.0)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument(
        "--text",
        choices=sorted(TEXT),
        default="realistic",
        help="realistic: prompts ~300, answers 200-1,200 characters; short: ~60 and 20-120",
    )
    parser.add_argument("--measure", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        side, rows, root, text = args.measure
        print(json.dumps(measure(side, int(rows), root, text)), flush=True)
        return
    root = Path(args.dir or tempfile.mkdtemp(prefix="alignlib-pairs-scale-"))
    results = []
    for rows in args.rows:
        started = time.time()
        prepare(rows, root, args.text)
        print(f"# {rows:,} rows ({args.text} texts): table ready in {time.time() - started:.0f} s ({root})", flush=True)
        for side in args.sides:
            result = run_one(side, rows, root, args.rss_limit_gib, args.timeout, args.text)
            results.append(result)
            print(json.dumps(result), flush=True)
    report(results)


def report(results: list[dict]) -> None:
    by = {(r["side"], r["rows"]): r for r in results}
    sizes = sorted({r["rows"] for r in results})
    sides = list(dict.fromkeys(r["side"] for r in results))
    print("\nrows        " + "".join(f"{s:>26}" for s in sides) + "   driver/ray time")
    for n in sizes:
        cells = []
        for s in sides:
            r = by.get((s, n), {})
            cells.append(
                r.get("failed", "")[:26] if "failed" in r else f"{r['seconds']:8.1f} s {r['peak_rss_gib']:6.2f} GiB"
            )
        d, y = by.get(("driver", n), {}), by.get(("ray", n), {})
        ratio = f"{d['seconds'] / y['seconds']:.2f}" if "seconds" in d and "seconds" in y else "-"
        print(f"{n:<12,}" + "".join(f"{c:>26}" for c in cells) + f"   {ratio:>8}")
    for s in sides:
        timed = [(n, by[(s, n)]["seconds"]) for n in sizes if "seconds" in by.get((s, n), {})]
        growth = [f"{b[1] / a[1]:.1f}x for {b[0] // a[0]}x rows" for a, b in zip(timed, timed[1:], strict=False)]
        if growth:
            print(f"{s}: time grows {', '.join(growth)}")


if __name__ == "__main__":
    main()
