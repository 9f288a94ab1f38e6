"""Spec fields of the data side: combined rewards, pair settings, preference imports."""

import json

import pytest

from alignlib.spec import SpecError, parse_spec

MINIMAL = {"name": "t", "output_dir": "out", "data": {"path": "p.jsonl"}, "policy": {"model": "builtin:tiny-policy"}}
CLOSENESS = {"type": "function", "function": "alignlib.rewards:numeric_closeness"}


def spec_with(**sections):
    return json.loads(json.dumps(MINIMAL)) | sections


def problems(raw) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_spec(raw, "job.yaml")
    return info.value.problems


def test_one_reward_keeps_its_old_form_and_default():
    ((column, reward, weight),) = parse_spec(MINIMAL).score.components()
    assert (column, reward.function, weight) == ("reward", "alignlib.rewards:exact_match", None)
    ((column, reward, weight),) = parse_spec(spec_with(score={"reward": CLOSENESS})).score.components()
    assert (column, reward.function, weight) == ("reward", "alignlib.rewards:numeric_closeness", None)


def test_weighted_rewards_get_columns_named_after_them():
    spec = parse_spec(
        spec_with(
            score={
                "rewards": [
                    CLOSENESS,
                    {"type": "model", "model": "builtin:tiny-reward", "weight": 0.5, "resources": {"CPU": 1}},
                    {"type": "model", "model": "/models/rm-7b/", "weight": -1.0, "name": "big"},
                ]
            }
        )
    )
    assert [(c, w) for c, _, w in spec.score.components()] == [
        ("reward_numeric_closeness", 1.0),
        ("reward_tiny_reward", 0.5),
        ("reward_big", -1.0),
    ]


@pytest.mark.parametrize(
    "score, expected",
    [
        ({"reward": CLOSENESS, "rewards": [CLOSENESS]}, "score: set `reward` (one reward) or `rewards`"),
        ({"rewards": [CLOSENESS, CLOSENESS | {"weight": 2}]}, "score: rewards named ['numeric_closeness'] more than"),
        ({"rewards": [CLOSENESS | {"name": "a b"}]}, "score.rewards[0].name: String should match pattern"),
        ({"rewards": [CLOSENESS | {"weight": "heavy"}]}, "score.rewards[0].weight: Input should be a valid"),
        ({"reward": CLOSENESS | {"weight": 1.0}}, "score.reward.weight: unknown key"),
    ],
)
def test_bad_reward_combinations(score, expected):
    (found,) = problems(spec_with(score=score))
    assert found.startswith(expected), found


@pytest.mark.parametrize(
    "strategy", ["best_vs_second", "best_vs_random", "rejected_at_mean_minus_2std", "best_vs_worst"]
)
def test_policy_strategies_need_two_samples(strategy):
    (found,) = problems(spec_with(pairs={"strategy": strategy}, generate={"num_samples": 1}))
    assert found.startswith("generate.num_samples:")


def test_pair_settings():
    spec = parse_spec(spec_with(pairs={"length_penalty": 0.01, "include_truncated": True}))
    assert (spec.pairs.length_penalty, spec.pairs.include_truncated) == (0.01, True)
    assert parse_spec(MINIMAL).pairs.include_truncated is False
    assert problems(spec_with(pairs={"length_penalty": -1})) == [
        "pairs.length_penalty: Input should be greater than or equal to 0"
    ]


def test_preference_imports_refuse_settings_they_would_ignore():
    data = {"path": "p.jsonl", "kind": "preferences"}
    no_eval = {"enabled": False}  # a preference file has no gold answers for the default reward
    spec = parse_spec(spec_with(data=data, generate={"num_samples": 1}, eval=no_eval))
    assert spec.data.kind == "preferences"  # no policy samples, so no num_samples check
    found = problems(
        spec_with(
            data=data,
            pairs={"strategy": "gold_vs_weak", "min_margin": 0.5},
            generate={"weak_model": {"model": "builtin:tiny-weak"}},
            eval=no_eval,
        )
    )
    assert sorted(found) == [
        "generate.weak_model: not used with data.kind preferences (nothing is generated)",
        "pairs.min_margin: not used with data.kind preferences (imported pairs are kept as given)",
        "pairs.strategy: not used with data.kind preferences (imported pairs are kept as given)",
    ]
