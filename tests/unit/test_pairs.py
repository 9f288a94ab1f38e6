"""Pair strategies: who is chosen, which pairs are dropped, how drops are counted, determinism."""

import math
import random

import pytest

from alignlib import schema as S
from alignlib.pairs import DROP_REASONS, best_of_n, build, import_pairs
from alignlib.spec import PairsSpec

MSG = [{"role": "user", "content": "q"}]


def row(text, reward, generator=S.GENERATOR_POLICY, index=0, pid="p1", finish="stop"):
    return {
        S.PROMPT_ID: pid,
        S.PROMPT: "q",
        S.MESSAGES: MSG,
        S.COMPLETION: text,
        S.REWARD: reward,
        S.GENERATOR: generator,
        S.SAMPLE_INDEX: index,
        S.FINISH_REASON: finish,
    }


def policy(*scored, pid="p1"):
    """("text", reward) or ("text", reward, finish_reason) -> policy rows with sample index = position."""
    return [row(s[0], s[1], index=i, pid=pid, finish=s[2] if len(s) > 2 else "stop") for i, s in enumerate(scored)]


def spec(strategy="best_vs_worst", **kw):
    return PairsSpec(strategy=strategy, **kw)


def nonzero(counts):
    return {k: v for k, v in counts.items() if v and k.startswith(("pairs_", "dropped_"))}


GOLD_WEAK = [row("42", 1.0, S.GENERATOR_GOLD), row("7", 0.0, S.GENERATOR_WEAK), row("41", 0.95, S.GENERATOR_WEAK, 1)]
# mean -0.0643, population std 1.1286: mean - 2 std = -2.3215, nearest is -2.0 (s12), not the worst (s13).
SPREAD = [1.0, 1.0, 0.9, 0.9, 0.8, 0.3, 0.2, 0.0, 0.0, 0.0, -0.5, -0.5, -2.0, -3.0]

CASES = [
    # id, rows, spec, expected (chosen, rejected, strategy) in order, expected non-zero counts
    (
        "best_vs_worst picks extremes",
        policy(("a", 0.5), ("b", 0.9), ("c", 0.1)),
        spec(),
        [("b", "c", "best_vs_worst")],
        {"pairs_best_vs_worst": 1},
    ),
    (
        "best_vs_worst k pairs: i-th best vs i-th worst",
        policy(("a", 1.0), ("b", 0.8), ("c", 0.3), ("d", 0.0)),
        spec(max_pairs_per_prompt=2),
        [("a", "d", "best_vs_worst"), ("b", "c", "best_vs_worst")],
        {"pairs_best_vs_worst": 2},
    ),
    (
        "best_vs_rest largest margins first, capped",
        policy(("best", 1.0), ("x", 0.8), ("y", 0.0), ("z", 0.5)),
        spec("best_vs_rest", max_pairs_per_prompt=2),
        [("best", "y", "best_vs_rest"), ("best", "z", "best_vs_rest")],
        {"pairs_best_vs_rest": 2, "dropped_over_cap": 1},
    ),
    (
        "best_vs_second is the runner-up",
        policy(("a", 0.9), ("b", 0.1), ("c", 0.7)),
        spec("best_vs_second"),
        [("a", "c", "best_vs_second")],
        {"pairs_best_vs_second": 1},
    ),
    (
        "best_vs_second tied with the best",
        policy(("a", 0.9), ("b", 0.9), ("c", 0.1)),
        spec("best_vs_second"),
        [],
        {"dropped_tie": 1},
    ),
    (
        "rejected nearest mean - 2 std",
        policy(*[(f"s{i}", r) for i, r in enumerate(SPREAD)]),
        spec("rejected_at_mean_minus_2std"),
        [("s0", "s12", "rejected_at_mean_minus_2std")],
        {"pairs_rejected_at_mean_minus_2std": 1},
    ),
    (
        "mean - 2 std with all rewards equal is a tie",
        policy(("a", 0.5), ("b", 0.5), ("c", 0.5)),
        spec("rejected_at_mean_minus_2std"),
        [],
        {"dropped_tie": 1},
    ),
    (
        "gold_vs_weak uses the gold answer as chosen",
        GOLD_WEAK,
        spec("gold_vs_weak", max_pairs_per_prompt=5),
        [("42", "7", "gold_vs_weak")],
        {"pairs_gold_vs_weak": 1, "dropped_below_margin": 1},
    ),
    (
        "weak answer equal to gold",
        [row("42", 1.0, S.GENERATOR_GOLD), row("42", 1.0, S.GENERATOR_WEAK)],
        spec("gold_vs_weak", min_margin=0.0),
        [],
        {"dropped_identical": 1},
    ),
    (
        "gold_vs_weak without a weak answer",
        [row("42", 1.0, S.GENERATOR_GOLD)],
        spec("gold_vs_weak"),
        [],
        {"dropped_too_few_candidates": 1},
    ),
    ("tie", policy(("a", 0.5), ("b", 0.5)), spec(), [], {"dropped_tie": 1}),
    ("tie even with min_margin 0", policy(("a", 0.5), ("b", 0.5)), spec(min_margin=0.0), [], {"dropped_tie": 1}),
    ("chosen == rejected text", policy(("same", 0.9), ("same", 0.2)), spec(), [], {"dropped_identical": 1}),
    ("below min_margin", policy(("a", 0.55), ("b", 0.5)), spec(), [], {"dropped_below_margin": 1}),
    (
        "same text pair from two strategies",
        policy(("a", 1.0), ("b", 0.0)),
        spec(["best_vs_worst", "best_vs_second"]),
        [("a", "b", "best_vs_worst")],
        {"pairs_best_vs_worst": 1, "dropped_duplicate": 1},
    ),
    (
        "same text pair twice in one strategy",
        policy(("a", 1.0), ("x", 0.0), ("x", 0.0)),
        spec("best_vs_rest", max_pairs_per_prompt=5),
        [("a", "x", "best_vs_rest")],
        {"pairs_best_vs_rest": 1, "dropped_duplicate": 1},
    ),
    (
        "NaN and missing rewards take no part",
        policy(("a", math.nan), ("b", 0.9), ("n", None), ("c", 0.1)),
        spec(),
        [("b", "c", "best_vs_worst")],
        {"pairs_best_vs_worst": 1, "dropped_nan_reward": 2},
    ),
    (
        "all rewards NaN",
        policy(("a", math.nan), ("b", math.nan)),
        spec(),
        [],
        {"dropped_nan_reward": 2, "dropped_too_few_candidates": 1},
    ),
    (
        "truncated completions are excluded",
        policy(("a", 1.0, "length"), ("b", 0.5), ("c", 0.0)),
        spec(),
        [("b", "c", "best_vs_worst")],
        {"pairs_best_vs_worst": 1, "dropped_truncated": 1},
    ),
    (
        "include_truncated keeps them",
        policy(("a", 1.0, "length"), ("b", 0.5), ("c", 0.0)),
        spec(include_truncated=True),
        [("a", "c", "best_vs_worst")],
        {"pairs_best_vs_worst": 1},
    ),
    (
        "single sample",
        policy(("a", 1.0)),
        spec(["best_vs_worst", "best_vs_random"]),
        [],
        {"dropped_too_few_candidates": 2},
    ),
    (
        "no penalty: the long answer wins",
        policy(("x" * 30, 1.0), ("short", 0.9)),
        spec(min_margin=0.0),
        [("x" * 30, "short", "best_vs_worst")],
        {"pairs_best_vs_worst": 1},
    ),
    # 1.0 - 0.01 * 30 = 0.70 < 0.9 - 0.01 * 5 = 0.85
    (
        "length penalty per character re-ranks",
        policy(("x" * 30, 1.0), ("short", 0.9)),
        spec(min_margin=0.0, length_penalty=0.01),
        [("short", "x" * 30, "best_vs_worst")],
        {"pairs_best_vs_worst": 1},
    ),
]


@pytest.mark.parametrize(
    "rows, pair_spec, expected, expected_counts", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_pairs_and_drop_counts(rows, pair_spec, expected, expected_counts):
    pairs, _, counts = build(rows, pair_spec, seed=0)
    assert [(p[S.CHOSEN], p[S.REJECTED], p[S.STRATEGY]) for p in pairs] == expected
    assert nonzero(counts) == expected_counts
    assert set(DROP_REASONS) <= set(counts), "every drop reason is reported, zero or not"
    for p in pairs:
        assert p[S.CHOSEN] != p[S.REJECTED] and p[S.MARGIN] >= pair_spec.min_margin and p[S.MARGIN] > 0
        assert p[S.MARGIN] == pytest.approx(p[S.CHOSEN_REWARD] - p[S.REJECTED_REWARD])


def test_length_penalty_is_applied_to_the_stored_rewards():
    (p,), _, _ = build(policy(("x" * 30, 1.0), ("short", 0.9)), spec(min_margin=0.0, length_penalty=0.01))
    assert (p[S.CHOSEN_REWARD], p[S.REJECTED_REWARD]) == (pytest.approx(0.85), pytest.approx(0.70))


def test_generators_of_a_gold_vs_weak_pair():
    (p,), _, _ = build(GOLD_WEAK, spec("gold_vs_weak"))
    assert (p[S.CHOSEN_GENERATOR], p[S.REJECTED_GENERATOR], p[S.MARGIN]) == ("gold", "weak", 1.0)


def random_prompts(n, samples, seed=0):
    rng = random.Random(seed)
    return [
        row(f"t{rng.randrange(10)}", rng.choice([0.0, 0.25, 0.5, 0.75, 1.0]), index=i, pid=f"p{k}")
        for k in range(n)
        for i in range(samples)
    ]


def test_best_vs_random_is_seeded_by_seed_and_prompt():
    rows = random_prompts(100, 6)
    s = spec("best_vs_random", max_pairs_per_prompt=2, min_margin=0.0)
    pairs, _, _ = build(rows, s, seed=7)
    again, _, _ = build(list(reversed(rows)), s, seed=7)
    key = sorted((p[S.PROMPT_ID], p[S.CHOSEN], p[S.REJECTED]) for p in pairs)
    assert key == sorted((p[S.PROMPT_ID], p[S.CHOSEN], p[S.REJECTED]) for p in again), "row order does not matter"
    other, _, _ = build(rows, s, seed=8)
    assert key != sorted((p[S.PROMPT_ID], p[S.CHOSEN], p[S.REJECTED]) for p in other), "the seed does"
    best = {pid: max(r[S.REWARD] for r in rows if r[S.PROMPT_ID] == pid) for pid in {r[S.PROMPT_ID] for r in rows}}
    assert all(p[S.CHOSEN_REWARD] == best[p[S.PROMPT_ID]] for p in pairs)


def test_best_vs_random_draws_each_other_sample_once():
    rows = policy(("best", 1.0), ("a", 0.5), ("b", 0.4), ("c", 0.3), ("d", 0.2))
    pairs, _, counts = build(rows, spec("best_vs_random", max_pairs_per_prompt=10))
    assert sorted(p[S.REJECTED] for p in pairs) == ["a", "b", "c", "d"] and counts["pairs_best_vs_random"] == 4
    orders = set()
    for k in range(20):
        scored = policy(("best", 1.0), ("a", 0.5), ("b", 0.4), ("c", 0.3), ("d", 0.2), pid=f"q{k}")
        pairs, _, _ = build(scored, spec("best_vs_random", max_pairs_per_prompt=10))
        orders.add(tuple(p[S.REJECTED] for p in pairs))
    assert len(orders) > 1, "different prompts get different random orders, not margin order"


def test_same_seed_same_pairs_for_every_strategy():
    rows = random_prompts(200, 5)
    s = spec(
        ["best_vs_worst", "best_vs_rest", "best_vs_second", "best_vs_random", "rejected_at_mean_minus_2std"],
        max_pairs_per_prompt=3,
    )
    first, sft, counts = build(rows, s, seed=3)
    shuffled = rows[:]
    random.Random(5).shuffle(shuffled)
    second, sft2, counts2 = build(shuffled, s, seed=3)
    ordered = lambda ps: sorted(ps, key=lambda p: (p[S.PROMPT_ID], p[S.STRATEGY], p[S.CHOSEN], p[S.REJECTED]))  # noqa: E731
    assert ordered(first) == ordered(second) and counts == counts2
    assert sorted(r[S.PROMPT_ID] for r in sft) == sorted(r[S.PROMPT_ID] for r in sft2)


def test_invariants_and_counts_add_up_over_many_prompts():
    rows = random_prompts(200, 4)
    s = spec(["best_vs_worst", "best_vs_rest"], max_pairs_per_prompt=3)
    pairs, sft, counts = build(rows, s)
    assert pairs and all(p[S.CHOSEN] != p[S.REJECTED] and p[S.MARGIN] >= 0.1 for p in pairs)
    keys = [(p[S.PROMPT_ID], p[S.CHOSEN], p[S.REJECTED]) for p in pairs]
    assert len(keys) == len(set(keys)), "no text pair twice for a prompt"
    assert len(sft) == 200 and counts["prompts"] == 200 and counts["sft_rows"] == 200
    assert counts["pairs_best_vs_worst"] + counts["pairs_best_vs_rest"] == len(pairs)
    # Per prompt best_vs_rest has 3 candidates and best_vs_worst 2 (1st vs 4th, 2nd vs 3rd); each
    # candidate is either kept or dropped for exactly one reason.
    candidates = 200 * (3 + 2)
    dropped = sum(counts[k] for k in DROP_REASONS if k not in ("dropped_nan_reward", "dropped_truncated"))
    assert len(pairs) + dropped == candidates
    assert counts["prompts_without_pairs"] == 200 - len({p[S.PROMPT_ID] for p in pairs})


def test_best_of_n_and_its_threshold():
    best, counts = best_of_n(policy(("a", 0.2), ("b", 0.7), ("c", 0.7)), None)
    assert best[S.COMPLETION] == "b" and counts == {"sft_rows": 1}  # ties go to the lower sample index
    best, counts = best_of_n(policy(("a", 0.2)), 0.5)
    assert best is None and counts == {"sft_dropped_below_min_reward": 1}


def test_sft_set_skips_truncated_and_nan_and_counts_prompts_left_without_a_row():
    rows = policy(("cut", 1.0, "length"), ("nan", math.nan), ("ok", 0.3)) + policy(("cut", 1.0, "length"), pid="p2")
    _, sft, counts = build(rows, spec())
    assert [(r[S.PROMPT_ID], r[S.COMPLETION]) for r in sft] == [("p1", "ok")]
    assert counts["sft_rows"] == 1 and counts["sft_dropped_no_usable_sample"] == 1
    assert counts["dropped_truncated"] == 2 and counts["dropped_nan_reward"] == 1


def pref(pid, chosen, rejected, cr=None, rr=None):
    return {
        S.PROMPT_ID: pid,
        S.PROMPT: "q",
        S.MESSAGES: MSG,
        S.CHOSEN: chosen,
        S.REJECTED: rejected,
        S.CHOSEN_REWARD: cr,
        S.REJECTED_REWARD: rr,
        S.SOURCE: "f:1",
    }


def test_imported_pairs_are_kept_as_given_except_identical_duplicate_and_held_out():
    rows = [
        pref("p1", "a", "b", 2.0, 1.5),
        pref("p1", "a", "b", 2.0, 1.5),
        pref("p1", "c", "c"),
        pref("p1", "d", "e", 3.0, 3.5),
        pref("p2", "x", "y"),
        pref("p3", "u", "v"),
    ]
    pairs, sft, counts = import_pairs(rows, {"p1", "p2"}, spec())
    assert [(p[S.CHOSEN], p[S.REJECTED], p[S.MARGIN]) for p in pairs] == [
        ("a", "b", 0.5),
        ("d", "e", -0.5),
        ("x", "y", None),
    ]
    assert {p[S.STRATEGY] for p in pairs} == {"imported"}
    assert nonzero(counts) == {"pairs_imported": 3, "dropped_duplicate": 1, "dropped_identical": 1}
    assert counts["held_out_for_eval"] == 1 and counts["prompts"] == 2 and counts["prompts_without_pairs"] == 0
    assert [(r[S.PROMPT_ID], r[S.COMPLETION]) for r in sft] == [("p1", "d"), ("p2", "x")]  # highest chosen reward
