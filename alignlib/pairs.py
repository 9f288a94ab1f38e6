"""The pair rules: scored completions -> preference pairs and a best-of-N SFT set (run by the stage
`alignlib.stages.pairs`).

In: `score/scored` (SCORED_COLUMNS), or `prompts/preferences` for an imported preference set.
Out: `pairs/pairs` (PAIR_COLUMNS) and `pairs/sft` (SFT_COLUMNS). Strategies, applied per prompt
(chosen is always the best policy sample by `alignlib.ranking`, the order `alignlib bon` and `alignlib serve`
choose by: the highest reward; among equal rewards, one that stopped by itself before one cut at the token
limit, which matters only with `include_truncated`; then the lower sample index):

- best_vs_worst: the best vs the worst; with max_pairs_per_prompt k, the i-th best vs the i-th worst.
- best_vs_rest: the best vs each other sample, largest margins first.
- best_vs_second: the best vs the runner-up (hard negatives).
- best_vs_random: the best vs other samples in a random order seeded by (seed, prompt_id).
- rejected_at_mean_minus_2std: rejected is the sample whose reward is nearest mean - 2 std of the
  prompt's rewards (Xiao et al. 2025, "Finding the Sweet Spot"): clearly bad, but not an outlier.
- gold_vs_weak: the dataset's gold answer vs each weak-model answer (no human labels needed).

Nothing is dropped silently; every drop is counted by reason (DROP_REASONS). Completions whose
reward is NaN or missing, and (unless `include_truncated`) completions cut off at the token
limit, take no part. The functions here are pure (row dicts in, rows and counts out), no Ray.
"""

from __future__ import annotations

import hashlib
import math
import random
import statistics
from collections import Counter
from collections.abc import Callable
from typing import Any

from alignlib import schema as S
from alignlib.ranking import best_first, ranked
from alignlib.spec import PairsSpec

Row = dict[str, Any]
Candidates = list[tuple[Row, Row]]

DROP_REASONS = {
    "dropped_nan_reward": "completions whose reward is NaN or missing",
    "dropped_truncated": "completions cut off at max_new_tokens (finish_reason length)",
    "dropped_too_few_candidates": "prompt x strategy with too few usable completions to form a pair",
    "dropped_identical": "candidate pairs whose chosen and rejected texts are the same",
    "dropped_tie": "candidate pairs whose rewards are equal",
    "dropped_below_margin": "candidate pairs whose reward gap is below min_margin",
    "dropped_duplicate": "candidate pairs with a chosen/rejected text pair already kept for the prompt",
    "dropped_over_cap": "pairs beyond max_pairs_per_prompt",
}

IMPORTED = "imported"


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


def _ranked(rows: list[Row], generator: str) -> list[Row]:
    """Rows of one generator, best first (`alignlib.ranking`)."""
    return ranked(r for r in rows if r[S.GENERATOR] == generator)


def _by_margin(candidates: Candidates) -> Candidates:
    return sorted(candidates, key=lambda c: -(c[0][S.REWARD] - c[1][S.REWARD]))


def _best_vs_worst(policy: list[Row], seed: int) -> Candidates:
    return [(policy[i], policy[-1 - i]) for i in range(len(policy) // 2)]


def _best_vs_rest(policy: list[Row], seed: int) -> Candidates:
    return _by_margin([(policy[0], other) for other in policy[1:]])


def _best_vs_second(policy: list[Row], seed: int) -> Candidates:
    return [(policy[0], policy[1])] if len(policy) >= 2 else []


def _best_vs_random(policy: list[Row], seed: int) -> Candidates:
    others = policy[1:]
    if not others:
        return []
    # A hash, not Python's hash(): the same seed and prompt give the same order in every process.
    digest = hashlib.sha256(f"{seed}:best_vs_random:{policy[0][S.PROMPT_ID]}".encode()).hexdigest()
    random.Random(int(digest[:16], 16)).shuffle(others)
    return [(policy[0], other) for other in others]


def _rejected_at_mean_minus_2std(policy: list[Row], seed: int) -> Candidates:
    if len(policy) < 2:
        return []
    rewards = [r[S.REWARD] for r in policy]
    target = statistics.fmean(rewards) - 2 * statistics.pstdev(rewards)
    best = policy[0]
    # Only a sample scored below the best can be rejected; with none, the tie is counted as such.
    rejected = min(
        policy[1:], key=lambda r: (r[S.REWARD] >= best[S.REWARD], abs(r[S.REWARD] - target), r[S.SAMPLE_INDEX])
    )
    return [(best, rejected)]


POLICY_STRATEGIES: dict[str, Callable[[list[Row], int], Candidates]] = {
    "best_vs_worst": _best_vs_worst,
    "best_vs_rest": _best_vs_rest,
    "best_vs_second": _best_vs_second,
    "best_vs_random": _best_vs_random,
    "rejected_at_mean_minus_2std": _rejected_at_mean_minus_2std,
}


def candidate_pairs(rows: list[Row], strategy: str, seed: int = 0) -> Candidates:
    """(chosen, rejected) candidates of one prompt for one strategy, in the order the cap keeps them."""
    if strategy in POLICY_STRATEGIES:
        return POLICY_STRATEGIES[strategy](_ranked(rows, S.GENERATOR_POLICY), seed)
    if strategy == "gold_vs_weak":
        gold = _ranked(rows, S.GENERATOR_GOLD)
        return _by_margin([(gold[0], weak) for weak in _ranked(rows, S.GENERATOR_WEAK)]) if gold else []
    raise ValueError(f"unknown pair strategy {strategy!r}")


def usable(rows: list[Row], spec: PairsSpec, counts: Counter) -> list[Row]:
    """The completions that may become pairs, with the length penalty applied to their reward."""
    out = []
    for row in rows:
        reward = row[S.REWARD]
        if reward is None or not math.isfinite(reward):
            counts["dropped_nan_reward"] += 1
        elif row.get(S.FINISH_REASON) == "length" and not spec.include_truncated:
            counts["dropped_truncated"] += 1
        elif spec.length_penalty:
            out.append({**row, S.REWARD: reward - spec.length_penalty * len(row[S.COMPLETION])})
        else:
            out.append(row)
    return out


def make_pairs(rows: list[Row], spec: PairsSpec, seed: int = 0) -> tuple[list[Row], Counter]:
    """Pairs of one prompt's usable rows, and counts of what was emitted and dropped (and why)."""
    counts: Counter = Counter()
    pairs: list[Row] = []
    seen: set[tuple[str, str]] = set()
    for strategy in spec.strategies:
        kept: list[Row] = []
        candidates = candidate_pairs(rows, strategy, seed)
        if strategy == "best_vs_worst":  # goes only as deep as the cap: the i-th pair is the i-th best
            candidates = candidates[: spec.max_pairs_per_prompt]
        if not candidates:
            counts["dropped_too_few_candidates"] += 1
        for chosen, rejected in candidates:
            margin = chosen[S.REWARD] - rejected[S.REWARD]
            texts = (chosen[S.COMPLETION], rejected[S.COMPLETION])
            if texts[0] == texts[1]:
                counts["dropped_identical"] += 1
            elif margin == 0:
                counts["dropped_tie"] += 1
            elif margin < spec.min_margin:
                counts["dropped_below_margin"] += 1
            elif texts in seen:
                counts["dropped_duplicate"] += 1
            elif len(kept) >= spec.max_pairs_per_prompt:
                counts["dropped_over_cap"] += 1
            else:
                kept.append(_pair(chosen, rejected, strategy))
                seen.add(texts)
        counts[f"pairs_{strategy}"] += len(kept)
        pairs.extend(kept)
    return pairs, counts


def best_of_n(rows: list[Row], min_reward: float | None) -> tuple[Row | None, Counter]:
    """The best policy sample of one prompt for rejection-sampling fine-tuning, or None."""
    policy = _ranked(rows, S.GENERATOR_POLICY)
    if not policy:
        return None, Counter(sft_dropped_no_usable_sample=1)
    best = policy[0]
    if min_reward is not None and best[S.REWARD] < min_reward:
        return None, Counter(sft_dropped_below_min_reward=1)
    row = {c: best[c] for c in (S.PROMPT_ID, S.PROMPT, S.MESSAGES, S.COMPLETION, S.REWARD)}
    return row, Counter(sft_rows=1)


def _zeros(spec: PairsSpec, strategies: list[str]) -> Counter:
    """Every count a manifest reports, present even when zero, so a reader sees what was checked."""
    keys = list(DROP_REASONS) + [f"pairs_{s}" for s in strategies] + ["sft_rows"]
    return Counter(dict.fromkeys(keys, 0))


def build(scored: list[Row], spec: PairsSpec, seed: int = 0) -> tuple[list[Row], list[Row], dict[str, int]]:
    """All prompts: (pairs, sft rows, counts)."""
    by_prompt: dict[str, list[Row]] = {}
    for row in scored:
        by_prompt.setdefault(row[S.PROMPT_ID], []).append(row)
    pairs, sft, counts = [], [], _zeros(spec, spec.strategies)
    for rows in by_prompt.values():
        rows = usable(rows, spec, counts)
        p, c = make_pairs(rows, spec, seed)
        pairs += p
        counts.update(c)
        best, c = best_of_n(rows, spec.sft_min_reward)
        counts.update(c)
        if best is not None:
            sft.append(best)
    counts["prompts"] = len(by_prompt)
    counts["prompts_without_pairs"] = len(by_prompt) - len({p[S.PROMPT_ID] for p in pairs})
    return pairs, sft, dict(counts)


def import_pairs(preferences: list[Row], train_ids: set[str], spec: PairsSpec) -> tuple[list[Row], list[Row], dict]:
    """An imported preference set (prompts stage, `data.kind: preferences`) -> (pairs, sft rows, counts).

    Pairs are taken as the data gives them: rewards, where the file has them, are carried along but
    not used to re-rank or filter by margin. Same-text and repeated pairs are dropped and counted;
    pairs of held-out eval prompts are counted, not trained on. The SFT set is each prompt's chosen
    answer ranked first by `alignlib.ranking`, the file's order standing for the sample index: the
    highest reward, a chosen answer without one after those with one, the first in the file among equals.
    """
    counts = _zeros(spec, [IMPORTED])
    pairs: list[Row] = []
    sft: dict[str, Row] = {}
    seen: set[tuple[str, str, str]] = set()
    for row in preferences:
        key = (row[S.PROMPT_ID], row[S.CHOSEN], row[S.REJECTED])
        if row[S.PROMPT_ID] not in train_ids:
            counts["held_out_for_eval"] += 1
        elif row[S.CHOSEN] == row[S.REJECTED]:
            counts["dropped_identical"] += 1
        elif key in seen:
            counts["dropped_duplicate"] += 1
        else:
            seen.add(key)
            chosen_reward, rejected_reward = row[S.CHOSEN_REWARD], row[S.REJECTED_REWARD]
            margin = None if chosen_reward is None or rejected_reward is None else chosen_reward - rejected_reward
            pair = {c: row[c] for c in (S.PROMPT_ID, S.PROMPT, S.MESSAGES, S.CHOSEN, S.REJECTED)}
            pairs.append(
                pair
                | {
                    S.CHOSEN_REWARD: chosen_reward,
                    S.REJECTED_REWARD: rejected_reward,
                    S.MARGIN: margin,
                    S.STRATEGY: IMPORTED,
                    S.CHOSEN_GENERATOR: IMPORTED,
                    S.REJECTED_GENERATOR: IMPORTED,
                }
            )
            answer = {c: row[c] for c in (S.PROMPT_ID, S.PROMPT, S.MESSAGES)}
            answer |= {S.COMPLETION: row[S.CHOSEN], S.REWARD: chosen_reward, S.SAMPLE_INDEX: len(pairs)}
            best = sft.get(row[S.PROMPT_ID])
            if best is None or best_first(answer) < best_first(best):
                sft[row[S.PROMPT_ID]] = answer
    counts[f"pairs_{IMPORTED}"] = len(pairs)
    counts["sft_rows"] = len(sft)
    prompts = {r[S.PROMPT_ID] for r in preferences if r[S.PROMPT_ID] in train_ids}
    counts["prompts"] = len(prompts)
    counts["prompts_without_pairs"] = len(prompts) - len({p[S.PROMPT_ID] for p in pairs})
    return pairs, [{c: r[c] for c in S.SFT_COLUMNS} for r in sft.values()], dict(counts)
