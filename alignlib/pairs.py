"""Stage `pairs`: scored completions -> preference pairs and a best-of-N SFT set.

In: `score/scored` (SCORED_COLUMNS). Out: `pairs/pairs` (PAIR_COLUMNS) and `pairs/sft`
(SFT_COLUMNS). Strategies, applied per prompt:

- best_vs_worst: the highest-reward policy sample vs the lowest.
- best_vs_rest: the highest-reward policy sample vs each other one, largest margins first.
- gold_vs_weak: the dataset's reference answer vs each weak-model answer (no human labels needed).

A candidate pair is dropped, and counted in the manifest, when chosen and rejected are the same
text, when their rewards tie, or when the margin is below `min_margin`. The functions here are
pure (lists of row dicts in, rows and counts out), so they are tested without Ray.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from alignlib import schema as S

Row = dict[str, Any]


def _pair(chosen: Row, rejected: Row, strategy: str) -> Row:
    return {
        S.PROMPT_ID: chosen[S.PROMPT_ID],
        S.PROMPT: chosen[S.PROMPT],
        S.MESSAGES: chosen[S.MESSAGES],
        S.CHOSEN: chosen[S.COMPLETION],
        S.REJECTED: rejected[S.COMPLETION],
        S.CHOSEN_REWARD: chosen[S.REWARD],
        S.REJECTED_REWARD: rejected[S.REWARD],
        S.MARGIN: chosen[S.REWARD] - rejected[S.REWARD],
        S.STRATEGY: strategy,
        S.CHOSEN_GENERATOR: chosen[S.GENERATOR],
        S.REJECTED_GENERATOR: rejected[S.GENERATOR],
    }


def _ranked(rows: Iterable[Row], generator: str) -> list[Row]:
    """Rows of one generator, best first; ties broken by sample index so the choice is stable."""
    return sorted((r for r in rows if r[S.GENERATOR] == generator), key=lambda r: (-r[S.REWARD], r[S.SAMPLE_INDEX]))


def candidate_pairs(rows: list[Row], strategy: str) -> list[tuple[Row, Row]]:
    """(chosen, rejected) candidates of one prompt for one strategy, before any filtering."""
    if strategy == "best_vs_worst":
        policy = _ranked(rows, S.GENERATOR_POLICY)
        return [(policy[0], policy[-1])] if len(policy) >= 2 else []
    if strategy == "best_vs_rest":
        policy = _ranked(rows, S.GENERATOR_POLICY)
        return [(policy[0], other) for other in policy[1:]]
    if strategy == "gold_vs_weak":
        gold = _ranked(rows, S.GENERATOR_REFERENCE)
        return [(gold[0], weak) for weak in _ranked(rows, S.GENERATOR_WEAK)[::-1]] if gold else []
    raise ValueError(f"unknown pair strategy {strategy!r}")


def make_pairs(
    rows: list[Row], strategies: list[str], min_margin: float, max_pairs_per_prompt: int
) -> tuple[list[Row], Counter]:
    """Pairs of one prompt's scored rows, and counts of what was emitted and dropped (and why)."""
    counts: Counter = Counter()
    pairs: list[Row] = []
    seen: set[tuple[str, str]] = set()
    for strategy in strategies:
        kept = []
        for chosen, rejected in candidate_pairs(rows, strategy):
            margin = chosen[S.REWARD] - rejected[S.REWARD]
            if chosen[S.COMPLETION] == rejected[S.COMPLETION]:
                counts["dropped_identical"] += 1
            elif margin == 0:
                counts["dropped_tie"] += 1
            elif margin < min_margin:
                counts["dropped_below_margin"] += 1
            elif (chosen[S.COMPLETION], rejected[S.COMPLETION]) in seen:
                counts["dropped_duplicate"] += 1
            else:
                kept.append(_pair(chosen, rejected, strategy))
                seen.add((chosen[S.COMPLETION], rejected[S.COMPLETION]))
        kept.sort(key=lambda p: -p[S.MARGIN])
        if len(kept) > max_pairs_per_prompt:
            counts["dropped_over_cap"] += len(kept) - max_pairs_per_prompt
        counts[f"pairs_{strategy}"] += min(len(kept), max_pairs_per_prompt)
        pairs.extend(kept[:max_pairs_per_prompt])
    return pairs, counts


def best_of_n(rows: list[Row], min_reward: float | None) -> tuple[Row | None, Counter]:
    """The best policy sample of one prompt for rejection-sampling fine-tuning, or None."""
    policy = _ranked(rows, S.GENERATOR_POLICY)
    if not policy:
        return None, Counter()
    best = policy[0]
    if min_reward is not None and best[S.REWARD] < min_reward:
        return None, Counter(sft_dropped_below_min_reward=1)
    row = {c: best[c] for c in (S.PROMPT_ID, S.PROMPT, S.MESSAGES, S.COMPLETION, S.REWARD)}
    return row, Counter(sft_rows=1)


def build(scored: list[Row], strategies: list[str], min_margin: float, max_pairs_per_prompt: int,
          sft_min_reward: float | None) -> tuple[list[Row], list[Row], dict[str, int]]:  # fmt: skip
    """All prompts: (pairs, sft rows, counts)."""
    by_prompt: dict[str, list[Row]] = {}
    for row in scored:
        by_prompt.setdefault(row[S.PROMPT_ID], []).append(row)
    pairs, sft, counts = [], [], Counter()
    for rows in by_prompt.values():
        p, c = make_pairs(rows, strategies, min_margin, max_pairs_per_prompt)
        pairs += p
        counts += c
        best, c = best_of_n(rows, sft_min_reward)
        counts += c
        if best is not None:
            sft.append(best)
    counts["prompts"] = len(by_prompt)
    counts["prompts_without_pairs"] = len(by_prompt) - len({p[S.PROMPT_ID] for p in pairs})
    return pairs, sft, dict(counts)
