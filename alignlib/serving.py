"""`alignlib serve`: best-of-N answers at inference, behind an OpenAI-compatible API on Ray Serve.

Three deployments make one Serve application:
- `Gateway` (the HTTP ingress): `GET /v1/models`, `POST /v1/chat/completions`. It checks the request, renders
  the chat with the policy's chat template exactly as generate and training do, asks the engine for `n`
  candidates, has every candidate scored, and answers with the best one as `choices[0]`.
- `PolicyEngine`: vLLM's async engine for the policy (continuous batching across requests; the `n` samples
  of one request are one vLLM request, so their prompt is computed once).
- `RewardScorer`: the spec's reward(s), a reward model or a function or their weighted sum, scoring the
  candidates of all requests in flight together (`serve.batch`) with the score stage's own code
  (`alignlib.score`: FunctionScorer, ModelScorer, combine, on an Arrow table).

The best candidate is chosen by `alignlib.ranking`, the order `alignlib bon` and the best-of-N SFT set use:
highest reward, then one that ended by itself over one cut at the token limit, then the lower sample index.
Rewards fail as in the score stage: a reward function that raises or returns no finite number for one candidate
fails its request (status 500 and the reward's error), as it stops the stage; the other requests scored with it
are served. A reward model's non-finite output leaves that candidate unscored: it ranks below every scored one,
and when no candidate is scored the request fails with status 500.

Request extensions (send them with the `openai` client's `extra_body`):
- `return_candidates: true` adds `alignlib.candidates`: every candidate with its reward, rank, token count and
  finish reason, best first. `alignlib.reward` is the chosen answer's reward; with `n: 1` there is nothing to
  choose, so the one sample is not scored (`reward: null`) unless `return_candidates` asks for it.
- `seed` (the OpenAI field) makes the candidates reproducible: candidate i samples with seed + i.

`stream: true` is refused: the best answer is known only after every candidate is scored.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from typing import Any

from fastapi import Request  # at module level: FastAPI resolves the route's annotations in this module

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


# -- settings from the spec ---------------------------------------------------------------------------------


def serve_settings(spec) -> dict[str, Any]:
    """The served defaults and bounds, from `serve` and, where it is silent, `generate`."""
    serve, generate = spec.serve, spec.generate
    return {
        "model_name": serve.model_name or spec.name,
        "num_samples": serve.num_samples or generate.num_samples,
        "max_num_samples": serve.max_num_samples,
        "max_new_tokens": serve.max_new_tokens or generate.max_new_tokens,
        "temperature": generate.temperature if serve.temperature is None else serve.temperature,
        "top_p": generate.top_p,
    }


def replica_options(replicas: Any, resources: dict[str, float], target: float) -> dict[str, Any]:
    """A ReplicaSpec's count and resources as `Deployment.options` arguments."""
    actor: dict[str, Any] = {"num_cpus": resources.get("CPU", 0), "num_gpus": resources.get("GPU", 0)}
    custom = {k: v for k, v in resources.items() if k not in ("CPU", "GPU")}
    if custom:
        actor["resources"] = custom
    options: dict[str, Any] = {"ray_actor_options": actor}
    if isinstance(replicas, int):
        options["num_replicas"] = replicas
    else:
        low, high = replicas
        options["autoscaling_config"] = {
            "min_replicas": low,
            "max_replicas": high,
            "initial_replicas": max(low, 1),
            "target_ongoing_requests": target,
        }
    return options


def engine_resources(spec) -> dict[str, float]:
    """The engine deployment's resources: serve.engine.resources, else generate.resources."""
    return spec.serve.engine.resources or spec.generate.resources


def reward_resources(spec) -> dict[str, float]:
    """The reward deployment's resources: serve.reward.resources, else the reward models' (the largest), else
    DEFAULT_FUNCTION_CPUS for function rewards."""
    if spec.serve.reward.resources is not None:
        return spec.serve.reward.resources
    models = [reward.resources for _, reward, _ in spec.score.components() if reward.type == "model"]
    if not models:
        return {"CPU": DEFAULT_FUNCTION_CPUS}
    return {k: max(r.get(k, 0) for r in models) for r in models for k in r}


def reward_plan(spec) -> list[dict[str, Any]]:
    """Each reward component as plain data: how RewardScorer loads and weighs it, and the column it writes."""
    plan = []
    for column, reward, weight in spec.score.components():
        if reward.type == "function":
            plan.append({"type": "function", "function": reward.function, "column": column, "weight": weight})
        else:
            plan.append(
                {
                    "type": "model",
                    "model": reward.model,
                    "dtype": reward.dtype,
                    "column": column,
                    "weight": weight,
                    "max_length": reward.max_length,
                    "trust_remote_code": reward.trust_remote_code,
                }
            )
    return plan


# -- the deployments -----------------------------------------------------------------------------------------


class PolicyEngine:
    """vLLM's async engine for the policy; `sample` returns the `n` candidates of one prompt."""

    def __init__(self, model: str, dtype: str, engine_kwargs: dict[str, Any], trust_remote_code: bool, on_gpu: bool):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from alignlib.models import load_tokenizer, resolve_model
        from alignlib.vllm_processor import engine_arguments

        arguments = engine_arguments(dtype, on_gpu, engine_kwargs, trust_remote_code)
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=resolve_model(model), **arguments))
        self.stop_ids = {load_tokenizer(model, trust_remote_code=trust_remote_code).eos_token_id}

    async def sample(
        self, prompt_token_ids: list[int], n: int, max_tokens: int, temperature: float, top_p: float, seed: int | None
    ) -> list[dict[str, Any]]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        from alignlib.generate.vllm_engine import finish_reason

        params = SamplingParams(
            n=n,
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_tokens,
            seed=seed,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        final = None
        async for output in self.engine.generate({"prompt_token_ids": prompt_token_ids}, params, uuid.uuid4().hex):
            final = output
        if final is None:  # vLLM ended the request without its final output
            raise RuntimeError("the vLLM engine returned no output for the request")
        return [
            {
                S.SAMPLE_INDEX: c.index,
                S.COMPLETION: c.text,
                S.NUM_TOKENS: len(c.token_ids),
                S.FINISH_REASON: finish_reason(c.token_ids, max_tokens, self.stop_ids),
            }
            for c in sorted(final.outputs, key=lambda c: c.index)
        ]

    def __del__(self):
        # Serve calls this when it stops the replica: the engine core is a process of its own, stopped with it.
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()

    async def check_health(self) -> None:
        """Serve's health check: a dead engine core makes Serve replace this replica."""
        if self.engine.errored:
            raise RuntimeError("the vLLM engine has stopped")


class RewardScorer:
    """The spec's reward(s) for the candidates of requests, computed by the score stage's own code
    (`alignlib.score`: FunctionScorer, ModelScorer, combine) on an Arrow table of `reward_rows`; `score` is
    batched across all requests in flight."""

    def __init__(self, plan: list[dict[str, Any]]):
        from alignlib.score import FunctionScorer, ModelScorer

        self.functions: list[FunctionScorer] = []
        self.models: list[ModelScorer] = []
        for part in plan:
            if part["type"] == "function":
                self.functions.append(FunctionScorer(part["function"], part["column"]))
            else:
                scorer = ModelScorer(
                    part["model"],
                    part["dtype"],
                    part["max_length"],
                    part["column"],
                    trust_remote_code=part["trust_remote_code"],
                )
                self.models.append(scorer)
        self.components = [(p["column"], p.get("function") or p["model"], p["weight"]) for p in plan]

    def _score_all(self, requests: list[list[dict[str, Any]]]) -> list[list[tuple[float | None, str | None]]]:
        """Each request's `reward_rows` -> (reward, None) per candidate, or (None, why) for one left unscored.

        A reward function that fails on one candidate fails every candidate of its request, as it stops the score
        stage; the other requests are scored on. Reward models score the candidates of every request together,
        as one batch of the score stage; a non-finite reward leaves its candidate unscored.
        """
        import pyarrow as pa

        from alignlib.score import RewardError, combine

        tables, failed = [], {}
        for i, rows in enumerate(requests):
            table = pa.Table.from_pylist(rows, schema=S.arrow_schema(S.COMPLETION_COLUMNS))
            try:
                for function in self.functions:
                    table = function.scored(table)
            except RewardError as err:
                failed[i] = str(err)
                continue
            tables.append(table)
        scores: list[tuple[float | None, str | None]] = []
        if tables:
            scored = pa.concat_tables(tables)
            for model in self.models:
                scored = model.scored(scored)
            scored = combine(scored, self.components)
            for value, source in zip(scored[S.REWARD].to_pylist(), scored[S.REWARD_SOURCE].to_pylist(), strict=True):
                scores.append((value, None) if math.isfinite(value) else (None, f"reward {source} returned {value}"))
        out: list[list[tuple[float | None, str | None]]] = []
        start = 0
        for i, rows in enumerate(requests):
            if i in failed:
                out.append([(None, failed[i])] * len(rows))
            else:
                out.append(scores[start : start + len(rows)])
                start += len(rows)
        return out

    async def score(self, requests: list[list[dict[str, Any]]]) -> list[list[tuple[float | None, str | None]]]:
        # Batched by serve.batch in `build_app`: one call per request with all its candidates (`reward_rows`); the
        # requests waiting are scored together (`_score_all`), then handed back per request.
        return await asyncio.get_running_loop().run_in_executor(None, self._score_all, requests)


def gateway_class():
    """The ingress deployment's class (FastAPI routes need Serve and FastAPI, imported only when serving)."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from ray import serve

    app = FastAPI(title="alignlib best-of-N")

    @serve.ingress(app)
    class Gateway:
        def __init__(self, engine, reward, policy: dict[str, Any], settings: dict[str, Any]):
            from alignlib.models import context_length, load_tokenizer

            self.engine, self.reward, self.settings = engine, reward, settings
            self.tokenizer = load_tokenizer(
                policy["model"], chat_template=policy["chat_template"], trust_remote_code=policy["trust_remote_code"]
            )
            self.context = policy["max_model_len"] or context_length(policy["model"], policy["trust_remote_code"])

        @app.get("/v1/models")
        async def models(self):
            return {
                "object": "list",
                "data": [{"id": self.settings["model_name"], "object": "model", "created": 0, "owned_by": "alignlib"}],
            }

        @app.post("/v1/chat/completions")
        async def chat(self, http: Request):
            try:
                try:
                    body = await http.json()
                except ValueError as err:
                    raise RequestError(f"the request body is not valid JSON: {err}") from err
                return await self._complete(parse_request(body, self.settings))
            except RequestError as err:
                return JSONResponse(err.body(), status_code=err.status)

        async def _complete(self, request: dict[str, Any]) -> dict[str, Any]:
            from alignlib.models import encode_prompt

            try:
                ids = encode_prompt(self.tokenizer, request["messages"])
            except ValueError as err:  # several turns and no chat template
                raise RequestError(str(err), "messages") from err
            if self.context is not None and len(ids) + request["max_tokens"] > self.context:
                raise RequestError(
                    f"the prompt is {len(ids)} tokens and max_tokens {request['max_tokens']}: together over the "
                    f"model's context of {self.context} tokens; shorten the messages or lower max_tokens",
                    "messages",
                    code="context_length_exceeded",
                )
            candidates = await self.engine.sample.remote(
                ids, request["n"], request["max_tokens"], request["temperature"], request["top_p"], request["seed"]
            )
            if len(candidates) == 1 and not request["return_candidates"]:
                # n = 1: the one sample is the answer whatever its reward; it is scored only when asked for.
                candidates[0][S.REWARD], candidates[0]["error"] = None, None
                return response(request, rank(candidates), len(ids), self.settings["model_name"])
            scores = await self.reward.score.remote(reward_rows(request["messages"], candidates))
            for candidate, (value, error) in zip(candidates, scores, strict=True):
                candidate[S.REWARD], candidate["error"] = value, error
            ranked = rank(candidates)
            if ranked[0][S.REWARD] is None:
                raise RequestError(
                    f"no candidate could be scored: {ranked[0]['error']}", status=500, kind="server_error"
                )
            return response(request, ranked, len(ids), self.settings["model_name"])

    return Gateway


def build_app(spec):
    """The Serve application for a job spec: Gateway -> (PolicyEngine, RewardScorer)."""
    from ray import serve

    from alignlib.vllm_processor import engine_env

    settings = serve_settings(spec)
    target = spec.serve.target_ongoing_requests
    resources = engine_resources(spec)
    on_gpu = resources.get("GPU", 0) > 0
    engine_options = replica_options(spec.serve.engine.replicas, resources, target)
    engine_options["ray_actor_options"]["runtime_env"] = {"env_vars": engine_env(resources)}
    engine = (
        serve.deployment(PolicyEngine, name="PolicyEngine")
        .options(max_ongoing_requests=max(64, int(4 * target)), health_check_period_s=5, **engine_options)
        .bind(spec.policy.model, spec.policy.dtype, spec.generate.engine_kwargs, spec.policy.trust_remote_code, on_gpu)
    )
    scorer = type("RewardScorer", (RewardScorer,), {})
    scorer.score = serve.batch(
        max_batch_size=spec.serve.reward_batch_size, batch_wait_timeout_s=spec.serve.reward_batch_wait_s
    )(RewardScorer.score)
    reward = (
        serve.deployment(scorer, name="RewardScorer")
        .options(
            max_ongoing_requests=max(256, 4 * spec.serve.reward_batch_size),
            **replica_options(spec.serve.reward.replicas, reward_resources(spec), target),
        )
        .bind(reward_plan(spec))
    )
    policy = {
        "model": spec.policy.model,
        "chat_template": spec.policy.chat_template,
        "trust_remote_code": spec.policy.trust_remote_code,
        "max_model_len": spec.generate.engine_kwargs.get("max_model_len"),
    }
    return (
        serve.deployment(gateway_class(), name="Gateway")
        .options(num_replicas=1, max_ongoing_requests=1000, ray_actor_options={"num_cpus": GATEWAY_CPUS})
        .bind(engine, reward, policy, settings)
    )


def app_builder(args: dict[str, Any]):
    """Serve's application builder (`serve run alignlib.serving:app_builder spec=JOB.yaml`, and the RayService
    `alignlib k8s --serve` renders): `spec` is a job spec's path, or `spec_yaml` the spec itself; `overrides`
    an optional list of key=value strings."""
    import yaml

    from alignlib.spec import SpecError, apply_overrides, load_raw, parse_spec

    if "spec_yaml" in args:
        raw, source = yaml.safe_load(args["spec_yaml"]), "serveConfigV2 args.spec_yaml"
    elif "spec" in args:
        from pathlib import Path

        raw, source = load_raw(Path(args["spec"])), str(args["spec"])
    else:
        raise ValueError("alignlib.serving:app_builder needs the argument spec (a job spec's path) or spec_yaml")
    overrides = args.get("overrides") or []
    spec = parse_spec(apply_overrides(raw, overrides if isinstance(overrides, list) else [overrides]), source)
    found = preflight_spec(spec)
    if found:
        raise SpecError(source, found)
    return build_app(spec)


# -- the command ---------------------------------------------------------------------------------------------


def preflight_spec(spec) -> list[str]:
    """Settings that cannot serve, found from the spec alone (also checked when rendering a RayService)."""
    from alignlib.spec.job import rewards_needing_gold

    return [
        f"{where}: {function} compares answers with the data's gold answer, which a served request does not have; "
        "serve with a reward model or a function that needs no gold answer, e.g. "
        "'score.reward={type: model, model: MODEL}'"
        for where, function in rewards_needing_gold(spec.score)
    ]


def preflight(spec) -> list[str]:
    """What would stop the server from starting here, found before Ray or any model starts."""
    import importlib.util

    from alignlib.sources import model_problem, models_read

    found = [
        p
        for field, model in [("policy.model", spec.policy.model), *models_read(spec, ["score"])]
        for p in [model_problem(field, model)]
        if p
    ]
    found += preflight_spec(spec)
    if importlib.util.find_spec("vllm") is None:
        found.append(
            "generate.engine: alignlib serve runs the policy on vLLM, which is not installed "
            "(pip install 'alignlib[cpu]' or 'alignlib[gpu]')"
        )
    return found


def serve_forever(spec, host: str, port: int) -> int:
    """Start the application on Ray Serve at host:port and serve until SIGTERM or Ctrl-C; then take it down.

    Taking it down is bounded: the application is deleted (and Serve shut down when nothing else is left)
    within STOP_TIMEOUT_S. When this command started Ray itself, every process that Ray ran for it (replicas,
    vLLM's engine core) and that still lives after Ray's shutdown is ended too: a SIGTERM sent to the whole
    process group (`timeout`, some supervisors) stops the raylet first, and its workers would be left behind.
    """
    import os
    import signal
    import threading

    import ray
    from ray import serve

    from alignlib.raydata import ensure_ray, log, verbose

    own_ray = not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")
    ensure_ray()
    started = time.monotonic()
    # Serve's per-request and replica INFO lines stay off unless --verbose; warnings and errors still show.
    quiet = None if verbose() else {"log_level": "WARNING"}
    serve.start(http_options={"host": host, "port": port}, logging_config=quiet)
    serve.run(build_app(spec), name=APP_NAME, route_prefix="/", blocking=False, logging_config=quiet)
    settings = serve_settings(spec)
    log(
        f"serving {settings['model_name']} ({spec.policy.model}, best of n={settings['num_samples']} by "
        f"{', '.join(p.get('function') or p['model'] for p in reward_plan(spec))}) at http://{host}:{port}/v1 "
        f"after {time.monotonic() - started:.0f} s; stop with Ctrl-C or SIGTERM"
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    ours: dict[int, float] = {}  # pid -> start time of the processes Ray runs for this command
    while not stop.wait(2.0):
        if own_ray:
            ours.update(_descendants())
    if own_ray:
        ours.update(_descendants())
    log("stopping the server")

    def take_down():
        serve.delete(APP_NAME)
        if not serve.status().applications:
            serve.shutdown()
        if own_ray:
            ray.shutdown()

    down = threading.Thread(target=take_down, daemon=True)
    down.start()
    down.join(STOP_TIMEOUT_S)
    if own_ray:
        _end(ours)
    if down.is_alive():
        log(f"Serve did not stop within {STOP_TIMEOUT_S} s (its Ray was stopped under it?); its processes were ended")
        os._exit(1)  # Ray's client threads would otherwise wait on a cluster that is gone
    return 0


STOP_TIMEOUT_S = 60


def _descendants() -> dict[int, float]:
    import psutil

    out = {}
    for child in psutil.Process().children(recursive=True):
        try:
            out[child.pid] = child.create_time()
        except psutil.Error:
            pass
    return out


def _end(processes: dict[int, float]) -> None:
    """SIGKILL the processes (pid -> start time) still alive; a pid reused by another process is left alone."""
    import psutil

    for pid, created in processes.items():
        try:
            process = psutil.Process(pid)
            if process.create_time() == created:
                process.kill()
        except psutil.Error:
            pass
