"""The data-quality report: correlations, distributions and the HTML page, on hand-built tables."""

import math
import re

import pytest

from alignlib import schema as S
from alignlib.quality import data_quality, histogram, pearson, ranks, render_html, spearman

X = [1.0, 2.0, 3.0, 4.0, 5.0]
Y = [2.0, 4.0, 5.0, 4.0, 5.0]


def test_pearson_by_hand():
    # means 3 and 4; sum dx*dy = 6, sum dx^2 = 10, sum dy^2 = 6  ->  r = 6 / sqrt(60)
    assert pearson(X, Y) == pytest.approx(6 / math.sqrt(60))
    assert pearson(X, [-v for v in X]) == pytest.approx(-1.0)


def test_spearman_uses_mean_ranks_for_ties():
    assert ranks(Y) == [1.0, 2.5, 4.5, 2.5, 4.5]
    # ranks dy = -2, -0.5, 1.5, -0.5, 1.5: sum dx*dy = 7, sum dy^2 = 9  ->  rho = 7 / sqrt(90)
    assert spearman(X, Y) == pytest.approx(7 / math.sqrt(90))
    cubes = [v**3 for v in X]
    assert spearman(X, cubes) == pytest.approx(1.0) and pearson(X, cubes) < 0.99  # monotonic, not linear


def test_undefined_correlations_are_none():
    assert pearson([1.0, 2.0], [3.0, 3.0]) is None and spearman([1.0], [2.0]) is None


def test_histogram_bins_cover_min_to_max():
    hist = histogram([0.0, 0.1, 0.5, 0.99, 1.0], bins=4)
    assert hist["edges"] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert hist["counts"] == [2, 0, 1, 2]  # 1.0 (the max) falls in the last bin
    assert histogram([3.0, 3.0]) == {"edges": [3.0, 3.0], "counts": [2]}


def completion(generator, text, reward):
    return {S.GENERATOR: generator, S.COMPLETION: text, S.REWARD: reward}


def hand_built():
    # policy: length 1..5 characters, reward Y (grows with length); weak: reward falls with length, one NaN.
    rows = [completion("policy", "x" * n, r) for n, r in zip(range(1, 6), Y, strict=True)]
    rows += [completion("weak", "y" * n, 10.0 - n) for n in range(1, 5)] + [completion("weak", "nan", math.nan)]
    pairs = [
        {S.CHOSEN: "aaaa", S.REJECTED: "b", S.MARGIN: 0.5, S.STRATEGY: "best_vs_worst"},
        {S.CHOSEN: "a", S.REJECTED: "bbb", S.MARGIN: 1.5, S.STRATEGY: "gold_vs_weak"},
        {S.CHOSEN: "aaa", S.REJECTED: "bb", S.MARGIN: 1.0, S.STRATEGY: "gold_vs_weak"},
    ]
    counts = {"pairs_best_vs_worst": 1, "pairs_gold_vs_weak": 2, "dropped_tie": 7, "dropped_truncated": 3}
    return data_quality(rows, pairs, counts)


def test_numbers_of_a_hand_built_table():
    q = hand_built()
    policy, weak = q["reward_by_generator"]["policy"], q["reward_by_generator"]["weak"]
    assert (policy["count"], policy["mean"], policy["min"], policy["median"], policy["max"]) == (5, 4.0, 2.0, 4.0, 5.0)
    assert policy["std"] == pytest.approx(math.sqrt(6 / 5)) and sum(policy["histogram"]["counts"]) == 5
    assert (weak["count"], weak["non_finite"], weak["mean"]) == (4, 1, 7.5)
    corr = q["reward_length_correlation"]
    assert corr["policy"]["pearson"] == pytest.approx(6 / math.sqrt(60))
    assert corr["policy"]["spearman"] == pytest.approx(7 / math.sqrt(90))
    assert corr["weak"] == {"n": 4, "pearson": pytest.approx(-1.0), "spearman": pytest.approx(-1.0)}
    assert (q["margin"]["count"], q["margin"]["mean"], q["margin"]["median"]) == (3, 1.0, 1.0)
    assert q["margin_by_strategy"]["gold_vs_weak"]["mean"] == 1.25
    assert q["chosen_longer_fraction"] == pytest.approx(2 / 3)
    assert q["chosen_mean_chars"] == pytest.approx(8 / 3) and q["rejected_mean_chars"] == 2.0
    assert q["counts"]["dropped_tie"] == 7


def test_html_report_shows_the_plots_and_numbers():
    page = render_html(hand_built(), "run <demo>")
    assert page.startswith("<!doctype html>") and "<title>run &lt;demo&gt;</title>" in page
    # one histogram per generator and one of the margins, each with its bars
    assert page.count("<svg") == 3 and page.count("<rect") >= 3
    assert 'aria-label="reward histogram of policy"' in page and 'aria-label="margin histogram"' in page
    assert f"{6 / math.sqrt(60):.4g}" in page and f"{7 / math.sqrt(90):.4g}" in page
    assert "<td>dropped_tie</td><td>7</td>" in page and "<td>dropped_truncated</td><td>3</td>" in page
    # |Spearman| >= 0.3 is flagged for both generators here
    assert page.count("reward tracks length") == 2
    assert not re.search(r"<script", page)


def test_each_combined_reward_is_reported_with_its_length_correlation():
    rows = [
        completion("policy", "x" * n, float(n))
        | {"reward_long": float(n), "reward_short": -float(n) / 10, S.REWARD_SOURCE: "1*a + 1*b"}
        for n in range(1, 5)
    ]
    q = data_quality(rows, [], {})
    assert sorted(q["components"]) == ["reward_long", "reward_short"]
    short = q["components"]["reward_short"]
    assert short["by_generator"]["policy"]["mean"] == pytest.approx(-0.25)
    assert short["length_correlation"]["policy"]["spearman"] == pytest.approx(-1.0)
    assert q["components"]["reward_long"]["length_correlation"]["policy"]["pearson"] == pytest.approx(1.0)
    page = render_html(q, "t")
    assert "reward_short (one of the combined rewards)" in page and "<td>-0.25</td>" in page
