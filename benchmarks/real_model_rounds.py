"""The real-model recipe under each loss: greedy held-out accuracy by round, answer length and time.

    python benchmarks/real_model_rounds.py                 # sft, orpo and dpo, one after the other
    python benchmarks/real_model_rounds.py --loss sft      # one of them

Runs `alignlib run jobs/smollm2-arithmetic.yaml train.loss.name=LOSS output_dir=runs/smollm2-arithmetic-LOSS`
for each loss as a user would (a process of its own; a finished run is skipped stage by stage, so a second
call only prints), with everything else the same: prompts, samples, reward, pairs, LoRA, epochs, lr. Then
prints one markdown table from each run's rounds.json and tables: base, then every round. Accuracy is the mean
reward of the greedy held-out answers (alignlib.rewards:stated_number is 1 for a right answer, 0 otherwise),
also split into the addition and subtraction problems; answer tokens their mean length; minutes the sum of
the round's stage times (the base row's: the base model's held-out answers and round 1's candidates, sampled
by the same engine); sample accuracy the share of the round's own 8 samples per prompt that were right;
trained on the round's best-of-N rows (sft) or pairs (orpo, dpo). The whole call of each loss is printed too.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "jobs" / "smollm2-arithmetic.yaml"
DATA = ROOT / "jobs" / "data" / "arithmetic.jsonl"
LOSSES = {"sft": "{name: sft}", "orpo": "{name: orpo, lambda_: 0.1}", "dpo": "{name: dpo, beta: 0.1}"}


def run(loss: str, extra: list[str]) -> tuple[Path, float]:
    out = ROOT / "runs" / f"smollm2-arithmetic-{loss}"
    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "alignlib",
            "run",
            str(RECIPE),
            f"train.loss={LOSSES[loss]}",
            f"output_dir={out}",
            *extra,
        ],
        cwd=ROOT,
        check=True,
    )
    return out, time.perf_counter() - start


def by_kind(answers: Path) -> str:
    """Held-out accuracy on addition / subtraction, from a table of greedy answers."""
    from alignlib.store import read_table

    kind = {json.loads(line)["question"]: json.loads(line)["kind"] for line in DATA.read_text().splitlines()}
    right: dict[str, list[float]] = {"add": [], "sub": []}
    for row in read_table(answers).to_pylist():
        right[kind[row["prompt"]]].append(row["reward"])
    return " / ".join(f"{sum(v) / len(v):.0%}" for v in right.values())


def rows(loss: str, out: Path) -> list[str]:
    saved = json.loads((out / "rounds.json").read_text())
    start, lines = saved["start"], []
    lines.append(
        f"| {loss} | base | **{start['held_out_reward']:.1%}** | {by_kind(out / 'baseline' / 'completions')} | "
        f"{start['held_out_mean_tokens']:.1f} | {start['seconds'] / 60:.1f} | | |"
    )
    for f in saved["rounds"]:
        k, n = f["round"], sum((f.get("pairs") or {}).values())
        examples = (
            n
            if loss != "sft"
            else json.loads((out / f"round-{k}" / "pairs" / "manifest.json").read_text())["tables"]["sft"]
        )
        lines.append(
            f"| {loss} | {k} | **{f['held_out_reward']:.1%}** | "
            f"{by_kind(out / f'round-{k}' / 'eval' / 'completions')} | {f['held_out_mean_tokens']:.1f} | "
            f"{f['seconds'] / 60:.1f} | {f['sample_mean_reward']:.1%} | {examples} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loss", choices=list(LOSSES), action="append", help="default: all three")
    parser.add_argument("overrides", nargs="*", help="key=value, applied to every run")
    args = parser.parse_args()
    table = [
        "| loss | round | held-out accuracy (greedy) | add / sub | answer tokens | minutes | sample accuracy "
        "| trained on |",
        "|---|---|---|---|---|---|---|---|",
    ]
    calls = []
    for loss in args.loss or list(LOSSES):
        out, seconds = run(loss, args.overrides)
        calls.append(f"{loss}: whole call {seconds / 60:.1f} min")
        table += rows(loss, out)
    print("\n".join(["", *table, "", *calls]))


if __name__ == "__main__":
    main()
