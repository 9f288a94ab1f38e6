"""Writes arithmetic.jsonl, the data of jobs/smollm2-arithmetic.yaml: two-digit addition and subtraction.

    python jobs/data/make_arithmetic.py        # the same 1,600 problems every time (seeded)

Each line is {"question", "answer", "kind"}. Every (a, op, b) appears once, so the held-out split
(by prompt id) shares no problem with the training prompts. SmolLM2-135M-Instruct answers about a third
of them right when asked greedily (docs/real-model.md).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED, PER_KIND = 0, 800
INSTRUCTION = "Answer with only the number."


def problems(seed: int = SEED, per_kind: int = PER_KIND) -> list[dict]:
    rng = random.Random(seed)
    additions = [(a, b) for a in range(10, 50) for b in range(10, 50)]
    subtractions = [(a, b) for a in range(20, 100) for b in range(10, a)]
    rows = [
        {"question": f"What is {a} + {b}? {INSTRUCTION}", "answer": str(a + b), "kind": "add"}
        for a, b in rng.sample(additions, per_kind)
    ]
    rows += [
        {"question": f"What is {a} - {b}? {INSTRUCTION}", "answer": str(a - b), "kind": "sub"}
        for a, b in rng.sample(subtractions, per_kind)
    ]
    rng.shuffle(rows)
    return rows


if __name__ == "__main__":
    out = Path(__file__).with_name("arithmetic.jsonl")
    out.write_text("".join(json.dumps(row) + "\n" for row in problems()))
    print(f"wrote {out} ({PER_KIND * 2} problems)")
