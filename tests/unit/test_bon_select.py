"""Best-of-N selection: one best answer per prompt in input order, a total tie order, flags that say why."""

from alignlib import schema as S
from alignlib.bon import FLAG_ALL_TRUNCATED, FLAG_NO_CANDIDATES, select


def prompt(i):
    return {
        S.PROMPT_ID: f"p{i}",
        S.PROMPT: f"q{i}",
        S.MESSAGES: [{"role": "user", "content": f"q{i}"}],
        S.SOURCE: f"d.jsonl:{i + 1}",
        S.GOLD: None,
    }


def sample(i, k, reward, finish="stop", tokens=3, generator=S.GENERATOR_POLICY):
    return {
        S.PROMPT_ID: f"p{i}",
        S.SAMPLE_INDEX: k,
        S.COMPLETION: f"answer {i}.{k}",
        S.REWARD: reward,
        S.FINISH_REASON: finish,
        S.NUM_TOKENS: tokens,
        S.GENERATOR: generator,
    }


def test_one_best_answer_per_prompt_in_input_order_with_every_candidate_ranked():
    prompts = [prompt(2), prompt(0), prompt(1)]  # the data file's order, not the ids'
    scored = [
        sample(0, 0, 0.1),
        sample(0, 1, 0.9),
        sample(1, 0, 0.5),
        sample(2, 0, 0.3),
        sample(2, 1, 0.2),
        sample(0, 0, 5.0, generator=S.GENERATOR_GOLD),
    ]  # gold answers are not candidates
    best, candidates, counts = select(prompts, scored)
    assert [b[S.PROMPT_ID] for b in best] == ["p2", "p0", "p1"]
    assert [(b[S.COMPLETION], b[S.REWARD]) for b in best] == [
        ("answer 2.0", 0.3),
        ("answer 0.1", 0.9),
        ("answer 1.0", 0.5),
    ]
    assert [(c[S.PROMPT_ID], c[S.SAMPLE_INDEX], c["rank"]) for c in candidates] == [
        ("p2", 0, 1),
        ("p2", 1, 2),
        ("p0", 1, 1),
        ("p0", 0, 2),
        ("p1", 0, 1),
    ]
    assert counts == {"prompts": 3, FLAG_ALL_TRUNCATED: 0, FLAG_NO_CANDIDATES: 0, "tied": 0}


def test_ties_break_by_stopping_then_sample_index_not_by_length():
    scored = [
        sample(0, 0, 1.0, finish="length", tokens=1),
        sample(0, 1, 1.0, tokens=5),
        sample(0, 2, 1.0, tokens=2),
        sample(0, 3, 0.5, tokens=1),
    ]
    (best,), candidates, counts = select([prompt(0)], scored)
    assert best["best_sample_index"] == 1, "stopped beats cut; then the lower index, however many tokens"
    assert best["tied"] is True and counts["tied"] == 1
    assert [c[S.SAMPLE_INDEX] for c in candidates] == [1, 2, 0, 3]
    assert [c["tied"] for c in candidates] == [True, True, True, False]
    again, _, _ = select([prompt(0)], list(reversed(scored)))
    assert again[0]["best_sample_index"] == 1, "the order is total: the input order changes nothing"


def test_prompts_whose_choice_means_nothing_are_flagged_not_dropped():
    scored = [sample(0, 0, 0.4, finish="length"), sample(0, 1, 0.2, finish="length"), sample(1, 0, 0.1)]
    best, _, counts = select([prompt(0), prompt(1), prompt(2)], scored)
    assert [b["flag"] for b in best] == [FLAG_ALL_TRUNCATED, None, FLAG_NO_CANDIDATES]
    assert best[0][S.COMPLETION] == "answer 0.0", "the best cut answer is still given, with its flag"
    assert best[2][S.COMPLETION] is None and best[2]["num_candidates"] == 0
    assert (counts[FLAG_ALL_TRUNCATED], counts[FLAG_NO_CANDIDATES]) == (1, 1)
