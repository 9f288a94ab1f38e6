"""Spec settings -> the ray.data.llm processor config, the finish-reason rule, length grouping for reward models.

The configs are built for real (`vLLMEngineProcessorConfig` validates them); no engine starts here.
"""

import pytest

from alignlib.generate.vllm_engine import finish_reason, generate_config
from alignlib.score import PAD_SLACK, length_groups
from alignlib.score.vllm_scorer import reward_config
from alignlib.spec import ModelRewardSpec, SpecError, parse_spec
from alignlib.vllm_processor import pool_size

MINIMAL = {"name": "t", "output_dir": "out", "data": {"path": "p.jsonl"}, "policy": {"model": "builtin:tiny-policy"}}


def spec_with(**sections):
    return {**MINIMAL, **sections}


def problems(raw) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_spec(raw, "job.yaml")
    return info.value.problems


@pytest.fixture(autouse=True)
def _cache(model_cache):  # configs resolve builtin:tiny-* to a built model directory
    return model_cache


def gpu_spec(**generate):
    return parse_spec(spec_with(generate=generate))


def test_every_generate_setting_lands_in_the_processor_config():
    spec = gpu_spec(
        batch_size=48,
        concurrency=[2, 6],
        resources={"GPU": 1, "CPU": 2},
        accelerator_type="H100",
        max_pending_requests=96,
        engine_kwargs={"tensor_parallel_size": 2, "max_model_len": 4096},
    )
    config = generate_config(spec.policy, spec.generate)
    assert config.batch_size == 48
    assert config.concurrency == (2, 6)
    assert config.accelerator_type == "H100"
    assert config.max_pending_requests == 96
    assert config.task_type == "generate"
    assert config.engine_kwargs == {
        "dtype": "bfloat16",
        "disable_log_stats": True,
        "tensor_parallel_size": 2,
        "max_model_len": 4096,
        "task_type": "generate",
        "trust_remote_code": False,
    }
    # One bundle per tensor-parallel worker: ray.data.llm replicates it tensor_parallel_size times.
    assert config.placement_group_config["bundle_per_worker"] == {"GPU": 1.0, "CPU": 2.0}
    assert config.model_source.endswith("tiny-policy-v1")
    assert config.runtime_env == {"env_vars": {"VLLM_LOGGING_LEVEL": "ERROR"}}, "CPU-engine settings stay off GPU"


def test_defaults_leave_the_engine_knobs_to_ray():
    spec = gpu_spec()
    config = generate_config(spec.policy, spec.generate)
    assert config.accelerator_type is None and config.max_pending_requests is None
    assert config.concurrency == (1, 1)


def test_cpu_engines_get_the_small_machine_settings_and_float32():
    spec = gpu_spec(resources={"CPU": 1})
    config = generate_config(spec.policy, spec.generate)
    assert config.engine_kwargs["dtype"] == "float32"
    assert config.runtime_env["env_vars"]["VLLM_CPU_KVCACHE_SPACE"] == "1"
    # Chunked prefill would rewind a seeded request's CPU generator when it splits a prompt, which crashes.
    assert config.engine_kwargs["enable_chunked_prefill"] is False
    # Blocks of 32 tokens: a chat prompt's whole blocks are shared by its other samples (prefix caching).
    assert config.engine_kwargs["block_size"] == 32
    on_gpu = generate_config(gpu_spec().policy, gpu_spec().generate).engine_kwargs
    assert "enable_chunked_prefill" not in on_gpu and "block_size" not in on_gpu
    # engine_kwargs set in the spec win over these defaults.
    mine = gpu_spec(resources={"CPU": 1}, engine_kwargs={"block_size": 64})
    assert generate_config(mine.policy, mine.generate).engine_kwargs["block_size"] == 64


def test_a_fixed_concurrency_is_a_fixed_pool_not_ray_data_llms_one_to_n():
    assert pool_size(3) == (3, 3)
    assert pool_size((1, 4)) == (1, 4)
    assert generate_config(gpu_spec(concurrency=3).policy, gpu_spec(concurrency=3).generate).concurrency == (3, 3)


def test_new_generate_fields_are_validated():
    found = problems(spec_with(generate={"max_pending_requests": 0, "accelerator_type": 3}))
    assert sorted(found) == [
        "generate.accelerator_type: Input should be a valid string",
        "generate.max_pending_requests: Input should be greater than or equal to 1",
    ]


def test_reward_model_on_vllm_is_a_classify_processor():
    reward = ModelRewardSpec(
        type="model",
        model="builtin:tiny-reward",
        engine="vllm",
        batch_size=16,
        concurrency=[1, 2],
        resources={"CPU": 1},
        engine_kwargs={"enforce_eager": True},
    )
    config = reward_config(reward)
    assert config.task_type == "classify" and config.engine_kwargs["task_type"] == "classify"
    assert config.engine_kwargs["enforce_eager"] is True and config.engine_kwargs["dtype"] == "float32"
    assert (config.batch_size, config.concurrency) == (16, (1, 2))
    assert config.model_source.endswith("tiny-reward-v1")


def test_reward_engine_kwargs_without_vllm_are_refused():
    raw = spec_with(score={"reward": {"type": "model", "model": "m", "engine_kwargs": {"enforce_eager": True}}})
    with pytest.raises(SpecError) as info:
        parse_spec(raw)
    assert "engine_kwargs are vLLM engine arguments; they need engine: vllm" in str(info.value)


def test_finish_reason_follows_vllms_rule():
    eos = {0}
    assert finish_reason([5, 6, 7], max_tokens=3, stop_ids=eos) == "length"
    assert finish_reason([5, 0], max_tokens=3, stop_ids=eos) == "stop"
    assert finish_reason([5, 6, 0], max_tokens=3, stop_ids=eos) == "stop", "EOS at the limit is a stop"
    assert finish_reason([5, 6], max_tokens=3, stop_ids=eos) == "stop", "early end (a stop token id from the model)"


def test_length_groups_cover_every_row_once_and_never_pad_short_to_long():
    lengths = [12, 300, 14, 13, 40, 290, 12, 41, 500]
    groups = length_groups(lengths)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert [[lengths[i] for i in g] for g in groups] == [[12, 12, 13, 14], [40, 41], [290, 300], [500]]
    for g in groups:
        assert len(g) * max(lengths[i] for i in g) <= PAD_SLACK * sum(lengths[i] for i in g)


def test_uniform_lengths_stay_one_micro_batch():
    assert length_groups([20] * 32) == [list(range(32))]
    assert length_groups([]) == []


def test_length_grouped_rewards_equal_padded_and_one_by_one_rewards():
    import pyarrow as pa

    from alignlib import schema as S
    from alignlib.score import ModelScorer

    # Heavy-tailed: most answers a few tokens, every 7th one hundreds.
    texts = [" plus ".join(["the number"] * (40 + i)) if i % 7 == 0 else str(i) * (1 + i % 3) for i in range(30)]
    batch = pa.table(
        {
            S.MESSAGES: [[{"role": "user", "content": f"What is {i} + 1?"}] for i in range(30)],
            S.COMPLETION: texts,
        }
    )
    grouped = ModelScorer("builtin:tiny-reward", "auto", max_length=512)
    padded = ModelScorer("builtin:tiny-reward", "auto", max_length=512, group_by_length=False)
    by_group = grouped(batch)[S.REWARD].to_pylist()
    assert by_group == pytest.approx(padded(batch)[S.REWARD].to_pylist(), abs=1e-5)
    one_by_one = [padded(batch.slice(i, 1))[S.REWARD][0].as_py() for i in range(30)]
    assert by_group == pytest.approx(one_by_one, abs=1e-5), "each reward lands on its own row"
    assert len(set(by_group)) > 20
