"""The parts of `alignlib serve` that need no server: request checks, ranking, rewards, settings, preflight.

The server itself, with Ray Serve, vLLM and the openai client, is tests/integration/test_serve.py.
"""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
from pathlib import Path

import pytest

from alignlib import schema as S
from alignlib.serving import (
    RequestError,
    RewardScorer,
    parse_request,
    rank,
    replica_options,
    response,
    reward_rows,
    serve_settings,
)
from alignlib.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = {
    "model_name": "m",
    "num_samples": 4,
    "max_num_samples": 8,
    "max_new_tokens": 16,
    "temperature": 0.7,
    "top_p": 1.0,
}
CHAT = [{"role": "user", "content": "What is 1 + 1?"}]


def test_a_request_takes_the_served_defaults_and_its_own_settings():
    assert parse_request({"messages": CHAT}, SETTINGS) == {
        "messages": CHAT,
        "n": 4,
        "max_tokens": 16,
        "temperature": 0.7,
        "top_p": 1.0,
        "seed": None,
        "return_candidates": False,
    }
    mine = parse_request(
        {
            "model": "m",
            "messages": CHAT,
            "n": 2,
            "max_completion_tokens": 5,
            "temperature": 0,
            "seed": 3,
            "return_candidates": True,
            "user": "ignored",
        },
        SETTINGS,
    )
    assert (mine["n"], mine["max_tokens"], mine["temperature"], mine["seed"], mine["return_candidates"]) == (
        2,
        5,
        0.0,
        3,
        True,
    )


@pytest.mark.parametrize(
    "body,param",
    [
        ([], None),
        ({"messages": CHAT, "stream": True}, "stream"),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            "messages[1].role",
        ),
        ({"messages": [{"content": "hi"}]}, "messages[0].role"),
        ({"messages": CHAT, "n": True}, "n"),
        ({"messages": CHAT, "top_p": 0}, "top_p"),
        ({"messages": CHAT, "temperature": 2.5}, "temperature"),
        ({"messages": CHAT, "seed": -1}, "seed"),
        ({"messages": CHAT, "return_candidates": "yes"}, "return_candidates"),
    ],
)
def test_a_bad_request_names_its_field(body, param):
    with pytest.raises(RequestError) as refused:
        parse_request(body, SETTINGS)
    assert refused.value.param == param and refused.value.status == 400
    assert refused.value.body()["error"]["type"] == "invalid_request_error"


def candidate(index, reward, tokens=4, finish="stop", error=None):
    return {
        S.SAMPLE_INDEX: index,
        S.COMPLETION: f"answer {index}",
        S.REWARD: reward,
        S.NUM_TOKENS: tokens,
        S.FINISH_REASON: finish,
        "error": error,
    }


def test_ranking_is_the_one_rule_with_unscored_candidates_last():
    ranked = rank(
        [
            candidate(0, None, error="reward f failed"),
            candidate(1, 0.5, tokens=6),
            candidate(2, 0.5, tokens=3),
            candidate(3, 0.9, finish="length"),
            candidate(4, 0.9),
            candidate(5, 0.5, tokens=3, finish="length"),
        ]
    )
    # Highest reward; then stopped over cut; then the lower sample index (token counts play no part); unscored last.
    assert [c[S.SAMPLE_INDEX] for c in ranked] == [4, 3, 1, 2, 5, 0]
    assert [c["rank"] for c in ranked] == [1, 2, 3, 4, 5, 6]
    body = response({"return_candidates": True}, ranked, prompt_tokens=10, model_name="m")
    assert body["choices"][0]["message"]["content"] == "answer 4" and body["alignlib"]["reward"] == 0.9
    assert body["usage"] == {"prompt_tokens": 10, "completion_tokens": 24, "total_tokens": 34}
    assert body["alignlib"]["candidates"][-1]["reward_error"] == "reward f failed"


def failing_reward(prompt: str, completion: str, gold: str | None) -> float:
    if "boom" in completion:
        raise ValueError("cannot score this")
    return float("nan") if "nan" in completion else float(len(completion))


def served(*texts):
    return reward_rows(CHAT, [candidate(i, None) | {S.COMPLETION: t} for i, t in enumerate(texts)])


def test_rewards_are_the_score_stages_weighted_sum_and_a_failing_function_fails_only_its_request():
    failing = "tests.unit.test_serving:failing_reward"
    scorer = RewardScorer(
        [
            {"type": "function", "function": "alignlib.rewards:length_penalty", "column": "reward_a", "weight": 2.0},
            {"type": "function", "function": failing, "column": "reward_b", "weight": 0.5},
        ]
    )
    # What serve.batch hands the deployment: the waiting requests, each a list of its candidates' rows.
    out = asyncio.run(scorer.score([served("abcd", "ab"), served("abcd", "boom"), served("nan"), served("a")]))
    assert out[0] == [(pytest.approx(2 * -0.04 + 0.5 * 4), None), (pytest.approx(2 * -0.02 + 0.5 * 2), None)]
    # As in the score stage, one failed row fails the batch: here, the request it belongs to, every candidate.
    assert [value for value, _ in out[1]] == [None, None]
    assert out[1][0][1] == out[1][1][1] == f"reward {failing} failed on prompt request (candidate 1): cannot score this"
    assert out[2] == [(None, f"reward {failing} returned nan for prompt request (candidate 0)")]
    assert out[3] == [(pytest.approx(2 * -0.01 + 0.5 * 1), None)], "the requests scored with a failed one are served"


def test_a_single_reward_writes_reward_itself_and_a_non_finite_model_output_leaves_its_candidate_unscored():
    import pyarrow as pa

    class NanModel:  # stands in for a ModelScorer whose reward model returned NaN for one answer
        def scored(self, table):
            rewards = [math.nan if c == "bad" else 1.5 for c in table[S.COMPLETION].to_pylist()]
            return table.append_column(S.REWARD, pa.array(rewards, pa.float64()))

    scorer = RewardScorer([])
    scorer.models, scorer.components = [NanModel()], [(S.REWARD, "builtin:tiny-reward", None)]
    out = scorer._score_all([served("good", "bad"), served("bad")])
    nan = (None, "reward builtin:tiny-reward returned nan")
    assert out == [[(1.5, None), nan], [nan]]
    assert [c[S.SAMPLE_INDEX] for c in rank([candidate(0, math.nan), candidate(1, 0.1)])] == [1, 0]


def test_settings_and_replicas_come_from_the_spec(tmp_path):
    spec = load_spec(
        ROOT / "jobs/demo.yaml", [f"output_dir={tmp_path}", "serve.num_samples=6", "serve.engine.replicas=[0, 3]"]
    )
    settings = serve_settings(spec)
    assert (settings["model_name"], settings["num_samples"], settings["max_new_tokens"]) == ("demo", 6, 8)
    options = replica_options(spec.serve.engine.replicas, {"CPU": 1, "GPU": 1, "TPU": 2}, 8.0)
    assert options["autoscaling_config"] == {
        "min_replicas": 0,
        "max_replicas": 3,
        "initial_replicas": 1,
        "target_ongoing_requests": 8.0,
    }
    assert options["ray_actor_options"] == {"num_cpus": 1, "num_gpus": 1, "resources": {"TPU": 2}}
    assert replica_options(2, {"CPU": 1}, 8.0)["num_replicas"] == 2


@pytest.mark.parametrize(
    "override,words",
    [
        ("serve.num_samples=20", "serve.num_samples: 20 is over serve.max_num_samples 16"),
        ("serve.engine.replicas=[2, 1]", "serve.engine.replicas"),
        ("serve.reward.replicas=0", "serve.reward.replicas"),
    ],
)
def test_bad_serve_settings_are_spec_errors(override, words, tmp_path):
    from alignlib.spec import SpecError

    with pytest.raises(SpecError) as refused:
        load_spec(ROOT / "jobs/demo.yaml", [f"output_dir={tmp_path}", override])
    assert words in str(refused.value)


def test_serve_refuses_a_reward_that_needs_the_gold_answer_before_starting_anything():
    # The demo scores with numeric_closeness, which compares with the data's gold answer; a request has none.
    done = subprocess.run(
        [sys.executable, "-m", "alignlib", "serve", "jobs/demo.yaml", "policy.model=/no/such/model", "--port", "70000"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert (
        "score.reward: alignlib.rewards:numeric_closeness compares answers with the data's gold answer" in done.stderr
    )
    assert "policy.model: no such model directory /no/such/model" in done.stderr
    assert "--port: 70000 is not a TCP port" in done.stderr
    assert "Traceback" not in done.stderr
