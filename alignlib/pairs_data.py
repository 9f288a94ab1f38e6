"""The pairs stage on Ray Data: preference pairs, the best-of-N set and the data-quality figures of a scored
table of any size, without the table ever passing through the driver.

The per-prompt rules are `alignlib.pairs`' own (`usable`, `make_pairs`, `best_of_n`): a Ray Data sort by
`prompt_id` puts each prompt's rows in one partition, and a task per partition, on the cluster, applies them to
each of its prompts and returns one row: the partition's pairs, best-of-N rows and share of every figure. From
there:

- `pairs/pairs` and `pairs/sft` are written by those tasks, a file per partition (rows identical to the
  in-driver build's; the files are in prompt order, the in-driver build's one file is in key order too);
- every count (kept pairs per strategy, drops by reason, SFT rows, prompts) is an exact sum;
- reward and margin count, mean, std, min and max, the reward-length Pearson correlation, the share of pairs
  whose chosen answer is longer and the mean lengths are exact, from sums (n, sum, sum of squares, cross
  products) each partition's task adds up;
- quantiles (p25, median, p75), histograms and the Spearman rank correlation come from a deterministic sample of
  at most `SAMPLE_ROWS` completions and `SAMPLE_ROWS` pairs: a row is in it when a hash of its key (prompt,
  generator, sample index; for a pair, prompt, strategy and texts) falls below the sampling rate, so a rerun
  reports the same figures. The report says so, with the sample's size.

The driver holds only each partition's sums (a few hundred numbers) and the bounded sample.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from typing import Any

import pyarrow as pa

from alignlib import schema as S
from alignlib.pairs import _zeros, best_of_n, make_pairs, usable
from alignlib.quality import describe, spearman
from alignlib.spec import PairsSpec

SAMPLE_ROWS = 100_000
# Scored rows per shuffle partition of the group-by. Ray Data's default (200 partitions) costs a task per
# partition in every step after it: 200 tiny tasks for a small table, where a few do the same work.
ROWS_PER_PARTITION = 50_000
MAX_PARTITIONS = 2_000
_MIN, _MAX = "min:", "max:"


def _unit(text: str) -> float:
    """A number in [0, 1) from a text's hash: the same in every process and run."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") / 2**64


def _add(acc: dict[str, float], key: str, value: float) -> None:
    if key.startswith(_MIN):
        acc[key] = min(acc.get(key, math.inf), value)
    elif key.startswith(_MAX):
        acc[key] = max(acc.get(key, -math.inf), value)
    else:
        acc[key] = acc.get(key, 0) + value


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Partials -> one: sums added, minima and maxima kept, samples joined."""
    sums: dict[str, float] = {}
    samples: dict[str, list] = {"completions": [], "pairs": []}
    for part in parts:
        for key, value in part["sums"].items():
            _add(sums, key, value)
        for kind in samples:
            samples[kind] += part["samples"][kind]
    return {"sums": sums, "samples": samples}


class BlockPairs:
    """Ray Data `map_batches` function over whole blocks of the scored table sorted by prompt: each block holds
    every row of its prompts (see `build_on_ray`). Block -> one row: the block's pairs and best-of-N rows (as
    lists), its partial figures (`sums` and sample, as JSON), and its first and last prompt id."""

    def __init__(self, spec: dict[str, Any], seed: int, columns: list[str], rate: float, pairs_dir: str, sft_dir: str):
        self.spec, self.seed, self.columns, self.rate = PairsSpec.model_validate(spec), seed, columns, rate
        self.pairs_dir, self.sft_dir = pairs_dir, sft_dir

    def __call__(self, block: pa.Table) -> pa.Table:
        from alignlib.verify import KEY

        rows = block.sort_by([(c, "ascending") for c in KEY]).to_pylist()
        pairs: list[dict] = []
        sft: list[dict] = []
        sums: dict[str, float] = {}
        samples: dict[str, list] = {"completions": [], "pairs": []}
        start = 0
        for i in range(1, len(rows) + 1):
            if i == len(rows) or rows[i][S.PROMPT_ID] != rows[start][S.PROMPT_ID]:
                self.prompt(rows[start:i], pairs, sft, sums, samples)
                start = i
        if rows:  # the block's tables, written here on the cluster: one file each, named by its first prompt
            import pyarrow.parquet as pq

            from alignlib.locations import fs_path, location

            name = f"part-{hashlib.blake2b(rows[0][S.PROMPT_ID].encode(), digest_size=8).hexdigest()}.parquet"
            for directory, table_rows, columns in (
                (self.pairs_dir, pairs, S.PAIR_COLUMNS),
                (self.sft_dir, sft, S.SFT_COLUMNS),
            ):
                where = location(directory)
                where.mkdir(parents=True, exist_ok=True)
                fs, path = fs_path(where / name)
                pq.write_table(pa.Table.from_pylist(table_rows, schema=S.arrow_schema(columns)), path, filesystem=fs)
        return pa.table(
            {
                "partial": [json.dumps({"sums": sums, "samples": samples})],
                "first": [rows[0][S.PROMPT_ID] if rows else None],
                "last": [rows[-1][S.PROMPT_ID] if rows else None],
            }
        )

    def prompt(self, rows: list[dict], out_pairs: list, out_sft: list, sums: dict, samples: dict) -> None:
        """One prompt's rows: its pairs and best-of-N row appended, its figures added."""
        counts: Counter = Counter()
        kept = usable(rows, self.spec, counts)
        pairs, c = make_pairs(kept, self.spec, self.seed)
        counts.update(c)
        best, c = best_of_n(kept, self.spec.sft_min_reward)
        counts.update(c)
        counts.update(prompts=1, prompts_without_pairs=0 if pairs else 1)
        for key, count in counts.items():
            _add(sums, f"count:{key}", count)
        if best is not None and best[S.REWARD] is not None:
            _add(sums, "sft:sum", best[S.REWARD])
        out_pairs += pairs
        if best is not None:
            out_sft.append(best)
        for row in rows:
            length = float(len(row[S.COMPLETION]))
            key = f"{row[S.PROMPT_ID]}|{row[S.GENERATOR]}|{row[S.SAMPLE_INDEX]}"
            sampled = _unit(key) < self.rate
            values = {}
            for column in self.columns:
                value = row.get(column)
                prefix = f"{column}:{row[S.GENERATOR]}:"
                _add(sums, prefix + "rows", 1)
                if value is None or not math.isfinite(value):
                    continue
                values[column] = value
                for name, amount in (
                    ("n", 1),
                    ("sum", value),
                    ("sumsq", value * value),
                    ("len", length),
                    ("lensq", length * length),
                    ("lenxv", length * value),
                ):
                    _add(sums, prefix + name, amount)
                _add(sums, _MIN + prefix, value)
                _add(sums, _MAX + prefix, value)
            if sampled:
                samples["completions"].append([row[S.GENERATOR], length, values])
        for p in pairs:
            margin, strategy = p[S.MARGIN], p[S.STRATEGY]
            _add(sums, "pairs:n", 1)
            _add(sums, "pairs:chosen_longer", int(len(p[S.CHOSEN]) > len(p[S.REJECTED])))
            _add(sums, "pairs:chosen_chars", len(p[S.CHOSEN]))
            _add(sums, "pairs:rejected_chars", len(p[S.REJECTED]))
            if margin is not None and math.isfinite(margin):
                for scope in ("margin:", f"margin@{strategy}:"):
                    for name, amount in (("n", 1), ("sum", margin), ("sumsq", margin * margin)):
                        _add(sums, scope + name, amount)
                    _add(sums, _MIN + scope, margin)
                    _add(sums, _MAX + scope, margin)
                if _unit(f"{p[S.PROMPT_ID]}|{strategy}|{p[S.CHOSEN]}|{p[S.REJECTED]}") < self.rate:
                    samples["pairs"].append([strategy, margin])


def _task(pairs: BlockPairs):
    """A plain function around the callable (Ray Data runs functions as tasks, classes as actors)."""

    def pairs_of_block(block: pa.Table) -> pa.Table:
        return pairs(block)

    return pairs_of_block


def _check_no_prompt_split(per_block) -> None:
    """Every prompt's rows were in one block: no two blocks' prompt ranges share an end (they would if Ray Data
    had split a sorted partition inside a prompt). A split would mis-pair that prompt, so it fails the stage."""
    ends = sorted((r["first"], r["last"]) for r in per_block if r["first"] is not None)
    for (_, last), (first, _) in zip(ends, ends[1:], strict=False):
        if first <= last:
            raise RuntimeError(f"pairs: prompt {first} was split across two Ray Data blocks; refusing its pairs")


def build_on_ray(scored_dir: str, spec: PairsSpec, seed: int, total_rows: int, pairs_dir: str, sft_dir: str):
    """Pairs and best-of-N of the scored table in `scored_dir`, written to `pairs_dir` and `sft_dir`;
    (counts, quality)."""
    import ray
    from ray.data.context import DataContext, ShuffleStrategy

    rate = min(1.0, SAMPLE_ROWS / max(1, total_rows))
    partitions = max(1, min(MAX_PARTITIONS, -(-total_rows // ROWS_PER_PARTITION)))
    context = DataContext.get_current()
    default = context.shuffle_strategy, context.target_max_block_size
    # A sort puts each prompt's rows in one reduce partition (key ranges), and with no block size limit (set
    # before the datasets are made: they copy the context) Ray Data keeps that partition one block, which the
    # pairing task gets whole. `map_groups` (a function call and a one-row table per prompt) measured ~30x
    # slower than the in-driver build at 10^5 rows. Partitions of ROWS_PER_PARTITION rows bound each task's memory.
    context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    context.target_max_block_size = None
    try:
        scored = ray.data.read_parquet(scored_dir)
        names = scored.schema().names
        columns = [S.REWARD] + sorted(c for c in names if c.startswith("reward_") and c != S.REWARD_SOURCE)
        per_block = (
            scored.repartition(partitions)
            .sort(S.PROMPT_ID)
            .map_batches(
                _task(BlockPairs(spec.model_dump(mode="json"), seed, columns, rate, pairs_dir, sft_dir)),
                batch_format="pyarrow",
                batch_size=None,
            )
            .take_all()
        )
    finally:
        context.shuffle_strategy, context.target_max_block_size = default
    _check_no_prompt_split(per_block)
    total = merge([json.loads(p["partial"]) for p in per_block])
    strategies = spec.strategies
    totals = _zeros(spec, strategies)
    for key, value in total["sums"].items():
        if key.startswith("count:"):
            totals[key.removeprefix("count:")] += int(value)
    counts = dict(totals)
    quality = figures(total, columns, counts, rate)
    quality["sft_mean_reward"] = total["sums"].get("sft:sum", 0.0) / counts["sft_rows"] if counts["sft_rows"] else None
    return counts, quality


def _exact(sums: dict[str, float], prefix: str, sample: list[float]) -> dict[str, Any]:
    """describe() of the sample, with count, mean, std, min and max replaced by the exact figures."""
    n = int(sums.get(prefix + "n", 0))
    if not n:
        return {"count": 0}
    out = describe(sorted(sample)) if sample else {}
    mean = sums[prefix + "sum"] / n
    out.update(
        count=n,
        mean=mean,
        std=math.sqrt(max(0.0, sums[prefix + "sumsq"] / n - mean * mean)),
        min=sums[_MIN + prefix],
        max=sums[_MAX + prefix],
        sampled=len(sample),
    )
    return out


def _exact_pearson(sums: dict[str, float], prefix: str) -> float | None:
    n = sums.get(prefix + "n", 0)
    if n < 2:
        return None
    sx, sy = sums[prefix + "len"], sums[prefix + "sum"]
    sxx, syy, sxy = sums[prefix + "lensq"], sums[prefix + "sumsq"], sums[prefix + "lenxv"]
    vx, vy = sxx - sx * sx / n, syy - sy * sy / n
    if vx <= 1e-12 * max(1.0, sxx) or vy <= 1e-12 * max(1.0, syy):
        return None
    return (sxy - sx * sy / n) / math.sqrt(vx * vy)


def figures(total: dict[str, Any], columns: list[str], counts: dict[str, Any], rate: float) -> dict[str, Any]:
    """The quality dict `alignlib.quality.data_quality` makes, from the merged partials."""
    sums, sample = total["sums"], total["samples"]
    generators = sorted({k.split(":")[1] for k in sums if k.startswith(f"{S.REWARD}:") and k.endswith(":rows")})

    def by_generator(column: str) -> tuple[dict, dict]:
        stats, correlation = {}, {}
        for g in generators:
            prefix = f"{column}:{g}:"
            picked = [
                (length, values[column])
                for gen, length, values in sample["completions"]
                if gen == g and column in values
            ]
            stats[g] = _exact(sums, prefix, [v for _, v in picked]) | {
                "non_finite": int(sums.get(prefix + "rows", 0) - sums.get(prefix + "n", 0))
            }
            correlation[g] = {
                "n": int(sums.get(prefix + "n", 0)),
                "pearson": _exact_pearson(sums, prefix),
                "spearman": spearman([x for x, _ in picked], [y for _, y in picked]),
                "spearman_sampled": len(picked),
            }
        return stats, correlation

    rewards, correlation = by_generator(S.REWARD)
    components = {}
    for column in columns[1:]:
        stats, corr = by_generator(column)
        components[column] = {"by_generator": stats, "length_correlation": corr}
    strategies = sorted({k.split("@", 1)[1].split(":")[0] for k in sums if k.startswith("margin@")})
    n_pairs = int(sums.get("pairs:n", 0))
    return {
        "reward_by_generator": rewards,
        "reward_length_correlation": correlation,
        "components": components,
        "margin": _exact(sums, "margin:", [m for _, m in sample["pairs"]]),
        "margin_by_strategy": {
            s: _exact(sums, f"margin@{s}:", [m for t, m in sample["pairs"] if t == s]) for s in strategies
        },
        "chosen_longer_fraction": sums["pairs:chosen_longer"] / n_pairs if n_pairs else None,
        "chosen_mean_chars": sums["pairs:chosen_chars"] / n_pairs if n_pairs else None,
        "rejected_mean_chars": sums["pairs:rejected_chars"] / n_pairs if n_pairs else None,
        "counts": {k: v for k, v in counts.items() if isinstance(v, int)},
        "method": {
            "exact": "counts, means, std, min, max, Pearson, chosen-longer share, mean lengths",
            "sampled": "quantiles, histograms, Spearman",
            "sample_rate": rate,
            "sampled_completions": len(sample["completions"]),
            "sampled_pairs": len(sample["pairs"]),
        },
    }
