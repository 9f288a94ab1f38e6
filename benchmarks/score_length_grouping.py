"""Reward-model scoring: length-grouped micro-batches vs the whole batch padded to its longest row.

Same reward model (builtin:tiny-reward), same rows, same Ray Data batch size; only the scorer's
grouping differs (`ModelScorer(group_by_length=...)`). The rows are a heavy-tailed length mix like
real completions: most answers are short, a few run to hundreds of tokens. The work is what one
scoring actor does with its batches, timed in this process (no Ray start-up in the figures).

    .venv/bin/python benchmarks/score_length_grouping.py            # 3 repeats, prints the ratio range
"""

from __future__ import annotations

import argparse
import random
import statistics
import time


def heavy_tailed_batch(rows: int, seed: int):
    """`rows` completions: 85% of 1-12 words, 15% drawn from a Pareto tail up to ~400 tokens."""
    import pyarrow as pa

    from alignlib import schema as S

    rng = random.Random(seed)
    words = "the sum of a number is what plus minus answer".split()
    texts = []
    for _ in range(rows):
        n = rng.randint(1, 12) if rng.random() < 0.85 else min(200, int(20 * rng.paretovariate(1.2)))
        texts.append(" ".join(rng.choice(words) for _ in range(n)))
    messages = [[{"role": "user", "content": f"What is {rng.randint(0, 99)} + {rng.randint(0, 99)}?"}] for _ in texts]
    return pa.table({S.MESSAGES: messages, S.COMPLETION: texts})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=32, help="Ray Data batch size (score.reward.batch_size)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    args = parser.parse_args()

    import torch

    from alignlib import schema as S
    from alignlib.models import reward_sequence
    from alignlib.score import ModelScorer

    torch.set_num_threads(args.threads)
    table = heavy_tailed_batch(args.rows, seed=0)
    batches = [table.slice(i, args.batch_size) for i in range(0, table.num_rows, args.batch_size)]
    scorers = {
        "grouped": ModelScorer("builtin:tiny-reward", "float32", max_length=512),
        "padded": ModelScorer("builtin:tiny-reward", "float32", max_length=512, group_by_length=False),
    }
    lengths = [
        len(reward_sequence(scorers["padded"].tokenizer, m, c, 512))
        for m, c in zip(table[S.MESSAGES].to_pylist(), table[S.COMPLETION].to_pylist(), strict=True)
    ]
    q = statistics.quantiles(lengths, n=100)
    print(
        f"{args.rows} rows, batch {args.batch_size}; tokens per row: median {q[49]:.0f}, p90 {q[89]:.0f}, "
        f"p99 {q[98]:.0f}, max {max(lengths)}; {torch.get_num_threads()} torch thread(s)"
    )

    for batch in batches[:2]:  # warm-up: first calls allocate
        for scorer in scorers.values():
            scorer(batch)
    # CPU seconds of this process (one torch thread) are the work done, whatever else loads the machine;
    # wall seconds are printed too and match them on an idle machine.
    cpu: dict[str, list[float]] = {name: [] for name in scorers}
    wall: dict[str, list[float]] = {name: [] for name in scorers}
    rewards = {}
    for _ in range(args.repeats):
        for name, scorer in scorers.items():  # alternate, so load from other processes hits both sides alike
            started, started_cpu = time.perf_counter(), time.process_time()
            rewards[name] = [v for b in batches for v in scorer(b)[S.REWARD].to_pylist()]
            cpu[name].append(time.process_time() - started_cpu)
            wall[name].append(time.perf_counter() - started)
    worst = max(abs(a - b) for a, b in zip(rewards["grouped"], rewards["padded"], strict=True))
    for name in scorers:
        print(
            f"{name:8s} CPU {' '.join(f'{t:.2f}s' for t in cpu[name])} ({args.rows / min(cpu[name]):.0f} rows per "
            f"CPU-second at best) | wall {' '.join(f'{t:.2f}s' for t in wall[name])}"
        )
    for label, times in (("CPU time", cpu), ("wall time", wall)):
        ratios = [p / g for p, g in zip(times["padded"], times["grouped"], strict=True)]
        print(
            f"speed-up grouped vs padded, {label}: {statistics.median(ratios):.2f}x "
            f"(range {min(ratios):.2f}-{max(ratios):.2f}x over {args.repeats} runs)"
        )
    print(f"largest reward difference grouped vs padded: {worst:.1e}")


if __name__ == "__main__":
    main()
