"""Pair strategies: who is chosen, which pairs are dropped and how drops are counted."""

import pytest

from alignlib import schema as S
from alignlib.pairs import best_of_n, build, make_pairs

MSG = [{"role": "user", "content": "q"}]


def row(text, reward, generator=S.GENERATOR_POLICY, index=0, pid="p1"):
    return {
        S.PROMPT_ID: pid, S.PROMPT: "q", S.MESSAGES: MSG, S.COMPLETION: text, S.REWARD: reward,
        S.GENERATOR: generator, S.SAMPLE_INDEX: index,
    }  # fmt: skip


def policy(*scored):
    return [row(text, reward, index=i) for i, (text, reward) in enumerate(scored)]


def test_best_vs_worst_picks_extremes():
    pairs, counts = make_pairs(policy(("a", 0.5), ("b", 0.9), ("c", 0.1)), ["best_vs_worst"], 0.1, 1)
    (p,) = pairs
    assert (p[S.CHOSEN], p[S.REJECTED], p[S.MARGIN], p[S.STRATEGY]) == ("b", "c", pytest.approx(0.8), "best_vs_worst")
    assert (p[S.CHOSEN_GENERATOR], p[S.REJECTED_GENERATOR]) == ("policy", "policy")
    assert counts == {"pairs_best_vs_worst": 1}


def test_ties_identical_texts_and_small_margins_are_dropped_and_counted():
    _, counts = make_pairs(policy(("a", 0.5), ("b", 0.5)), ["best_vs_worst"], 0.1, 1)
    assert counts["dropped_tie"] == 1 and counts["pairs_best_vs_worst"] == 0
    _, counts = make_pairs(policy(("same", 0.9), ("same", 0.2)), ["best_vs_worst"], 0.1, 1)
    assert counts["dropped_identical"] == 1
    _, counts = make_pairs(policy(("a", 0.55), ("b", 0.5)), ["best_vs_worst"], 0.1, 1)
    assert counts["dropped_below_margin"] == 1


def test_best_vs_rest_largest_margins_first_and_capped():
    rows = policy(("best", 1.0), ("x", 0.8), ("y", 0.0), ("z", 0.5))
    pairs, counts = make_pairs(rows, ["best_vs_rest"], 0.1, 2)
    assert [p[S.REJECTED] for p in pairs] == ["y", "z"]
    assert counts["dropped_over_cap"] == 1 and counts["pairs_best_vs_rest"] == 2


def test_gold_vs_weak_uses_reference_as_chosen():
    rows = [
        row("42", 1.0, S.GENERATOR_REFERENCE),
        row("7", 0.0, S.GENERATOR_WEAK),
        row("41", 0.95, S.GENERATOR_WEAK, 1),
    ]
    pairs, counts = make_pairs(rows, ["gold_vs_weak"], 0.1, 5)
    assert [(p[S.CHOSEN], p[S.REJECTED]) for p in pairs] == [("42", "7")]
    assert pairs[0][S.CHOSEN_GENERATOR] == "reference" and pairs[0][S.REJECTED_GENERATOR] == "weak"
    assert counts["dropped_below_margin"] == 1


def test_weak_answer_equal_to_gold_is_never_a_pair():
    rows = [row("42", 1.0, S.GENERATOR_REFERENCE), row("42", 1.0, S.GENERATOR_WEAK)]
    pairs, counts = make_pairs(rows, ["gold_vs_weak"], 0.0, 1)
    assert pairs == [] and counts["dropped_identical"] == 1


def test_the_same_pair_from_two_strategies_is_emitted_once():
    pairs, counts = make_pairs(policy(("a", 1.0), ("b", 0.0)), ["best_vs_worst", "best_vs_rest"], 0.1, 1)
    assert len(pairs) == 1 and counts["dropped_duplicate"] == 1


def test_chosen_never_equals_rejected_and_margin_is_positive_over_many_prompts():
    import random

    rng = random.Random(0)
    scored = [
        row(rng.choice("abc"), rng.choice([0.0, 0.5, 1.0]), index=i, pid=f"p{k}") for k in range(200) for i in range(4)
    ]
    pairs, sft, counts = build(scored, ["best_vs_worst", "best_vs_rest"], 0.1, 3, None)
    assert pairs and all(p[S.CHOSEN] != p[S.REJECTED] and p[S.MARGIN] >= 0.1 for p in pairs)
    assert len(sft) == 200 and counts["prompts"] == 200
    emitted = counts.get("pairs_best_vs_worst", 0) + counts.get("pairs_best_vs_rest", 0)
    assert emitted == len(pairs)


def test_best_of_n_and_its_threshold():
    best, counts = best_of_n(policy(("a", 0.2), ("b", 0.7), ("c", 0.7)), None)
    assert best[S.COMPLETION] == "b" and counts == {"sft_rows": 1}  # ties go to the lower sample index
    best, counts = best_of_n(policy(("a", 0.2)), 0.5)
    assert best is None and counts == {"sft_dropped_below_min_reward": 1}
