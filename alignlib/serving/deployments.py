"""The three Ray Serve deployments of `alignlib serve` (the `Gateway` ingress, the `PolicyEngine`, the
`RewardScorer`), their settings and resources from the spec, and the application that binds them."""

from __future__ import annotations

import asyncio
import math
import uuid
from typing import TYPE_CHECKING, Any, cast

from fastapi import Request  # at module level: FastAPI resolves the route's annotations in this module

from alignlib import schema as S
from alignlib.serving.protocol import (
    DEFAULT_FUNCTION_CPUS,
    GATEWAY_CPUS,
    RequestError,
    parse_request,
    rank,
    response,
    reward_rows,
)

if TYPE_CHECKING:
    from vllm.inputs import TokensPrompt

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
        # vLLM's TokensPrompt is a TypedDict whose optional keys its stubs mark required under Python 3.10.
        prompt = cast("TokensPrompt", {"prompt_token_ids": prompt_token_ids})
        async for output in self.engine.generate(prompt, params, uuid.uuid4().hex):
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


def preflight_spec(spec) -> list[str]:
    """Settings that cannot serve, found from the spec alone (also checked when rendering a RayService)."""
    from alignlib.spec.job import rewards_needing_gold

    return [
        f"{where}: {function} compares answers with the data's gold answer, which a served request does not have; "
        "serve with a reward model or a function that needs no gold answer, e.g. "
        "'score.reward={type: model, model: MODEL}'"
        for where, function in rewards_needing_gold(spec.score)
    ]


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
