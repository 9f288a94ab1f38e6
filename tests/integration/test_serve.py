"""`alignlib serve JOB.yaml`: best-of-N answers behind an OpenAI-compatible API, for real.

One server for the module: its own process, attached to the session's Ray (Ray Serve, vLLM's async engine on
the tiny policy, the tiny reward model plus a length reward), on a free loopback port, called with the official
`openai` client. The tests run in file order: requests, concurrency, bad requests, a killed engine replica,
then the stop by pid.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
import yaml

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
MODEL, SAMPLES, MAX_TOKENS, LENGTH_WEIGHT = "served-demo", 4, 8, 0.5
JOB = {
    "name": "served",
    "output_dir": "unused",
    "seed": 0,
    "data": {"path": str(ROOT / "jobs/data/addition.jsonl"), "prompt_field": "question", "eval_fraction": 0.0},
    "policy": {"model": "builtin:tiny-policy"},
    "generate": {
        "engine": "vllm",
        "num_samples": SAMPLES,
        "max_new_tokens": MAX_TOKENS,
        "resources": {"CPU": 1},
        "engine_kwargs": {"enforce_eager": True, "max_model_len": 128},
    },
    "score": {
        "rewards": [
            {"type": "model", "model": "builtin:tiny-reward", "name": "rm", "resources": {"CPU": 0.5}},
            {
                "type": "function",
                "function": "alignlib.rewards:length_penalty",
                "name": "short",
                "weight": LENGTH_WEIGHT,
            },
        ]
    },
    "eval": {"enabled": False},
    "serve": {"model_name": MODEL, "max_num_samples": 8},
}
QUESTION = [{"role": "user", "content": "What is 12 + 30?"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_session, model_cache, tmp_path_factory):
    """(base URL, process, log file) of `alignlib serve` on a free loopback port, ready for requests."""
    folder = tmp_path_factory.mktemp("serve")
    spec = folder / "job.yaml"
    spec.write_text(yaml.safe_dump(JOB))
    port, log = free_port(), folder / "serve.log"
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "alignlib", "serve", str(spec), "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.time() + 300
    while "[alignlib] serving" not in log.read_text():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"alignlib serve did not start (exit {proc.poll()}):\n{log.read_text()[-4000:]}")
        time.sleep(0.5)
    yield f"http://127.0.0.1:{port}/v1", proc, log
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0], api_key="unused", max_retries=0, timeout=120)


def ask(client, **options):
    return client.chat.completions.create(model=MODEL, messages=QUESTION, **options)


def offline_rewards(completions: list[str]) -> list[float]:
    """The served reward recomputed here: the tiny reward model (as the score stage runs it) + weight x length."""
    from alignlib.models import load_tokenizer, reward_sequence
    from alignlib.rewards import length_penalty
    from alignlib.score import ModelScorer

    scorer = ModelScorer("builtin:tiny-reward", "auto", 1024)
    tokenizer = load_tokenizer("builtin:tiny-reward")
    model = scorer.rewards([reward_sequence(tokenizer, QUESTION, c, 1024) for c in completions])
    return [
        m + LENGTH_WEIGHT * length_penalty(prompt="", completion=c, gold=None)
        for m, c in zip(model, completions, strict=True)
    ]


def test_models_lists_the_served_name(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert f"serving {MODEL} (builtin:tiny-policy, best of n={SAMPLES}" in server[2].read_text()


def test_choice_zero_is_the_highest_reward_candidate(client):
    done = ask(client, seed=7, extra_body={"return_candidates": True})
    extension = done.model_extra["alignlib"]
    candidates = extension["candidates"]
    assert len(candidates) == SAMPLES == extension["num_candidates"], "n defaults to generate.num_samples"
    assert [c["rank"] for c in candidates] == [1, 2, 3, 4]
    rewards = [c["reward"] for c in candidates]
    assert rewards == sorted(rewards, reverse=True)
    assert done.choices[0].message.content == candidates[0]["content"]
    assert extension["reward"] == rewards[0] and extension["best_sample_index"] == candidates[0]["index"]
    assert sorted(c["index"] for c in candidates) == [0, 1, 2, 3]
    # The rewards are the spec's: the reward model as the score stage runs it, plus the weighted length reward.
    assert rewards == pytest.approx(offline_rewards([c["content"] for c in candidates]), abs=1e-4)
    assert all(1 <= c["num_tokens"] <= MAX_TOKENS and c["finish_reason"] in ("stop", "length") for c in candidates)
    assert done.usage.completion_tokens == sum(c["num_tokens"] for c in candidates)
    assert done.model == MODEL and done.object == "chat.completion"
    # A seed makes the candidates, and so the answer, reproducible.
    again = ask(client, seed=7, extra_body={"return_candidates": True}).model_extra["alignlib"]["candidates"]
    assert [c["content"] for c in again] == [c["content"] for c in candidates]
    # n and max_tokens per request; without return_candidates only the chosen answer's reward comes back.
    small = ask(client, n=2, max_tokens=3)
    assert small.model_extra["alignlib"]["num_candidates"] == 2 and "candidates" not in small.model_extra["alignlib"]
    assert 2 <= small.usage.completion_tokens <= 6
    # n = 1: nothing to choose, so nothing is scored unless the candidates are asked for.
    single = ask(client, n=1).model_extra["alignlib"]
    assert (single["num_candidates"], single["reward"]) == (1, None)
    (scored,) = ask(client, n=1, extra_body={"return_candidates": True}).model_extra["alignlib"]["candidates"]
    assert scored["reward"] == pytest.approx(offline_rewards([scored["content"]])[0], abs=1e-4)


def test_32_concurrent_requests_for_4_rounds(server):
    async def rounds():
        client = openai.AsyncOpenAI(base_url=server[0], api_key="unused", max_retries=0, timeout=300)
        answers = []
        for r in range(4):
            answers += await asyncio.gather(
                *[
                    client.chat.completions.create(
                        model=MODEL,
                        messages=[{"role": "user", "content": f"What is {i} + {r}?"}],
                        extra_body={"return_candidates": True},
                    )
                    for i in range(32)
                ]
            )
        await client.close()
        return answers

    answers = asyncio.run(rounds())
    assert len(answers) == 128
    for answer in answers:
        candidates = answer.model_extra["alignlib"]["candidates"]
        assert len(candidates) == SAMPLES
        assert answer.choices[0].message.content == candidates[0]["content"]
        assert candidates[0]["reward"] == max(c["reward"] for c in candidates)


def raw_post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


BAD = [  # (request fields, status, param, words of the message)
    ({"messages": []}, 400, "messages", "non-empty list"),
    ({"messages": "What is 1 + 1?"}, 400, "messages", "non-empty list"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role", "one of system, user, assistant"),
    ({"messages": [{"role": "user", "content": 42}]}, 400, "messages[0].content", "must be a string"),
    ({"messages": QUESTION, "n": 0}, 400, "n", "between 1 and 8"),
    ({"messages": QUESTION, "n": 9}, 400, "n", "between 1 and 8"),
    ({"messages": QUESTION, "n": 2.5}, 400, "n", "an integer"),
    ({"messages": QUESTION, "temperature": "hot"}, 400, "temperature", "a number"),
    ({"messages": QUESTION, "max_tokens": -1}, 400, "max_tokens", "at least 1"),
    ({"messages": [{"role": "user", "content": "one two " * 100}]}, 400, "messages", "context of 128 tokens"),
    ({"messages": QUESTION, "stream": True}, 400, "stream", "stream is not supported"),
    ({"messages": QUESTION, "model": "gpt-4"}, 404, "model", "does not exist"),
]


@pytest.mark.parametrize("fields,status,param,words", BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_a_bad_request_gets_an_openai_error_and_the_server_keeps_serving(server, fields, status, param, words):
    code, body = raw_post(server[0] + "/chat/completions", json.dumps({"model": MODEL, **fields}).encode())
    assert code == status, body
    assert body["error"]["param"] == param and words in body["error"]["message"], body
    assert body["error"]["type"] == "invalid_request_error"


def test_bad_json_and_the_openai_client_see_400(client, server):
    code, body = raw_post(server[0] + "/chat/completions", b"{not json")
    assert code == 400 and "not valid JSON" in body["error"]["message"]
    with pytest.raises(openai.BadRequestError) as refused:
        ask(client, n=99)
    assert refused.value.status_code == 400 and "n must be between 1 and 8" in str(refused.value)
    assert ask(client).choices[0].message.content is not None, "still serving after bad requests"


def replica_pids(ray_session, deployment: str) -> list[int]:
    """Pids of a deployment's live replicas, by the process title Ray gives an actor's worker."""
    title = f"ray::ServeReplica:alignlib:{deployment}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes().startswith(title):
                found.append(int(entry.name))
        except OSError:
            pass  # ended while we looked
    return found


def test_a_killed_engine_replica_is_replaced_and_requests_after_it_succeed(client, ray_session):
    (pid,) = replica_pids(ray_session, "PolicyEngine")
    os.kill(pid, signal.SIGKILL)
    deadline, answered = time.time() + 240, None
    while answered is None and time.time() < deadline:
        try:  # Serve holds requests while it restarts the replica; one may fail with the dying replica
            answered = ask(client)
        except (openai.APIStatusError, openai.APIConnectionError):
            time.sleep(1)
    assert answered is not None, "no answer within 240 s of the kill"
    assert all(ask(client).choices[0].message.content is not None for _ in range(3))
    (new,) = replica_pids(ray_session, "PolicyEngine")
    assert new != pid


def test_stopped_by_pid_it_exits_cleanly_and_frees_the_port(server, ray_session):
    url, proc, log = server
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=90) == 0, log.read_text()[-3000:]
    assert "stopping the server" in log.read_text()
    with pytest.raises(OSError):
        urllib.request.urlopen(url + "/models", timeout=5)
    assert [replica_pids(ray_session, d) for d in ("Gateway", "PolicyEngine", "RewardScorer")] == [[], [], []]
