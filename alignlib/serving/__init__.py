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

The package: `protocol.py` (the request, the ranking, the response), `deployments.py` (the three deployments and
the application), `process.py` (the command: preflight checks, run until stopped).
"""

from alignlib.serving.deployments import (
    PolicyEngine,
    RewardScorer,
    app_builder,
    build_app,
    engine_resources,
    gateway_class,
    replica_options,
    reward_plan,
    reward_resources,
    serve_settings,
)
from alignlib.serving.process import STOP_TIMEOUT_S, preflight, preflight_spec, serve_forever
from alignlib.serving.protocol import (
    APP_NAME,
    DEFAULT_FUNCTION_CPUS,
    GATEWAY_CPUS,
    ROLES,
    RequestError,
    parse_request,
    rank,
    response,
    reward_rows,
)

__all__ = [
    "APP_NAME",
    "DEFAULT_FUNCTION_CPUS",
    "GATEWAY_CPUS",
    "ROLES",
    "STOP_TIMEOUT_S",
    "PolicyEngine",
    "RequestError",
    "RewardScorer",
    "app_builder",
    "build_app",
    "engine_resources",
    "gateway_class",
    "parse_request",
    "preflight",
    "preflight_spec",
    "rank",
    "replica_options",
    "response",
    "reward_plan",
    "reward_resources",
    "reward_rows",
    "serve_forever",
    "serve_settings",
]
