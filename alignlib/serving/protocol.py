"""The OpenAI chat-completions protocol of `alignlib serve`: a request checked into the fields the deployments use,
candidates ranked (`alignlib.ranking`), and the response a client reads."""

from __future__ import annotations

import time
import uuid
from typing import Any

from alignlib import schema as S
from alignlib.ranking import ranked

APP_NAME = "alignlib"
DEFAULT_FUNCTION_CPUS = 0.5
GATEWAY_CPUS = 0.25


class RequestError(ValueError):
    """A request that cannot be served as sent: answered with an OpenAI-style error, the server keeps going."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        status: int = 400,
        kind: str = "invalid_request_error",
        code: str | None = None,
    ):
        super().__init__(message)
        self.param, self.status, self.kind, self.code = param, status, kind, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


# -- the request ---------------------------------------------------------------------------------------------

ROLES = ("system", "user", "assistant")


def _number(body: dict, name: str, kind: type, low: float, high: float | None = None):
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise RequestError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}", name)
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise RequestError(f"{name} must be {bound}, got {value}", name)
    return kind(value)


def parse_request(body: Any, settings: dict[str, Any]) -> dict[str, Any]:
    """A chat completion request's JSON -> the sampling it asks for, or RequestError naming the bad field.

    `settings` holds the served defaults and bounds (`serve_settings`). Fields of the OpenAI API that best-of-N
    does not use (`user`, `logprobs`, ...) are accepted and ignored, as OpenAI-compatible servers do.
    """
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    if body.get("stream"):
        raise RequestError(
            "stream is not supported: the best of the n candidates is known only after all are "
            "scored; send stream=false",
            "stream",
        )
    model = body.get("model")
    if model is not None and model != settings["model_name"]:
        raise RequestError(
            f"the model {model!r} does not exist; this server serves {settings['model_name']!r}",
            "model",
            status=404,
            code="model_not_found",
        )
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {role, content} objects", "messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise RequestError(f"messages[{i}].role must be one of {', '.join(ROLES)}", f"messages[{i}].role")
        if not isinstance(message.get("content"), str):
            raise RequestError(f"messages[{i}].content must be a string", f"messages[{i}].content")
    if messages[-1]["role"] == "assistant":
        raise RequestError(
            "the last message must be a user or system turn: the answer is the model's to write",
            f"messages[{len(messages) - 1}].role",
        )
    n = _number(body, "n", int, 1, settings["max_num_samples"])
    max_tokens = _number(body, "max_completion_tokens", int, 1) or _number(body, "max_tokens", int, 1)
    temperature = _number(body, "temperature", float, 0.0, 2.0)
    top_p = _number(body, "top_p", float, 0.0, 1.0)
    if top_p == 0.0:
        raise RequestError("top_p must be above 0", "top_p")
    seed = _number(body, "seed", int, 0)
    if not isinstance(body.get("return_candidates", False), bool):
        raise RequestError("return_candidates must be true or false", "return_candidates")
    return {
        "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
        "n": n or settings["num_samples"],
        "max_tokens": max_tokens or settings["max_new_tokens"],
        "temperature": settings["temperature"] if temperature is None else temperature,
        "top_p": settings["top_p"] if top_p is None else top_p,
        "seed": seed,
        "return_candidates": body.get("return_candidates", False),
    }


def rank(candidates: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Candidates best first (`alignlib.ranking`: the unscored last); each gets its `rank` (1 = best)."""
    return [{**c, "rank": i} for i, c in enumerate(ranked(candidates), start=1)]


def reward_rows(messages: list[dict[str, str]], candidates: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A request's candidates as the score stage's rows (COMPLETION_COLUMNS): no gold answer; `source` names the
    candidate in a reward's error."""
    from alignlib.prompts import _prompt_text

    prompt = _prompt_text(messages)
    return [
        {
            S.PROMPT_ID: "request",
            S.PROMPT: prompt,
            S.MESSAGES: messages,
            S.GOLD: None,
            S.SOURCE: f"request (candidate {c[S.SAMPLE_INDEX]})",
            S.COMPLETION: c[S.COMPLETION],
            S.GENERATOR: S.GENERATOR_POLICY,
            S.SAMPLE_INDEX: c[S.SAMPLE_INDEX],
            S.SEED: None,
            S.FINISH_REASON: c[S.FINISH_REASON],
            S.NUM_TOKENS: c[S.NUM_TOKENS],
        }
        for c in candidates
    ]


def response(request: dict[str, Any], ranked: list[dict[str, Any]], prompt_tokens: int, model_name: str) -> dict:
    """The OpenAI chat.completion object: `choices[0]` is the best candidate; `alignlib` holds its reward and,
    when asked, every candidate."""
    best = ranked[0]
    generated = sum(c[S.NUM_TOKENS] for c in ranked)
    extension: dict[str, Any] = {
        "reward": best[S.REWARD],
        "num_candidates": len(ranked),
        "best_sample_index": best[S.SAMPLE_INDEX],
    }
    if request["return_candidates"]:
        extension["candidates"] = [
            {
                "index": c[S.SAMPLE_INDEX],
                "content": c[S.COMPLETION],
                "reward": c[S.REWARD],
                "rank": c["rank"],
                "num_tokens": c[S.NUM_TOKENS],
                "finish_reason": c[S.FINISH_REASON],
                "reward_error": c.get("error"),
            }
            for c in ranked
        ]
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_name,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": best[S.COMPLETION]},
                "finish_reason": best[S.FINISH_REASON],
                "logprobs": None,
            }
        ],
        # completion_tokens counts every candidate: that is what the server generated for this request.
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": generated,
            "total_tokens": prompt_tokens + generated,
        },
        "alignlib": extension,
    }
