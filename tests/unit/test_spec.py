"""The job spec: defaults, unknown keys, discriminated unions, cross-field checks, overrides."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from alignlib.spec import SpecError, apply_overrides, json_schema, load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[2]
MINIMAL = {"name": "t", "output_dir": "out", "data": {"path": "p.jsonl"}, "policy": {"model": "builtin:tiny-policy"}}


def spec_with(**sections):
    raw = json.loads(json.dumps(MINIMAL))
    raw.update(sections)
    return raw


def problems(raw) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_spec(raw, "job.yaml")
    return info.value.problems


def test_minimal_spec_fills_defaults():
    spec = parse_spec(MINIMAL)
    assert spec.generate.engine == "vllm"
    assert spec.train.loss.name == "orpo" and spec.train.loss.lambda_ == 0.1
    assert spec.train.backend.name == "ddp"
    assert spec.pairs.strategies == ["best_vs_worst"]


def test_unknown_keys_are_errors_with_their_path():
    raw = spec_with(train={"epochs": 2, "warmup": 1.0}, colour="blue")
    assert sorted(problems(raw)) == ["colour: unknown key", "train.warmup: unknown key; did you mean 'warmup_ratio'?"]


def test_the_names_trl_hugging_face_and_vllm_users_bring_are_translated():
    raw = spec_with(
        train={
            "learning_rate": 1e-5,
            "num_train_epochs": 2,
            "gradient_accumulation_steps": 4,
            "loss": {"name": "orpo", "beta": 0.2},
        },
        generate={"n": 4, "max_tokens": 32},
    )
    assert sorted(problems(raw)) == [
        "generate.max_tokens: unknown key; alignlib calls it 'max_new_tokens'",
        "generate.n: unknown key; alignlib calls it 'num_samples'",
        "train.gradient_accumulation_steps: unknown key; alignlib calls it 'grad_accum'",
        "train.learning_rate: unknown key; alignlib calls it 'lr'",
        "train.loss.beta: unknown key; alignlib calls it 'lambda_'",
        "train.num_train_epochs: unknown key; alignlib calls it 'epochs'",
    ]
    # DPO's beta is its own: no translation there.
    assert parse_spec(spec_with(train={"loss": {"name": "dpo", "beta": 0.2}})).train.loss.beta == 0.2


def test_each_loss_carries_only_its_own_knobs():
    assert problems(spec_with(train={"loss": {"name": "dpo", "lambda_": 0.5}})) == [
        "train.loss.lambda_: unknown key for 'dpo': it is a setting of 'orpo'; to switch, give the whole mapping, "
        "e.g. 'train.loss={name: dpo}'"
    ]
    spec = parse_spec(spec_with(train={"loss": {"name": "ipo", "tau": 0.05}}))
    assert spec.train.loss.tau == 0.05


def test_unknown_loss_and_backend_names_are_reported_together():
    found = problems(spec_with(train={"loss": {"name": "ppo"}, "backend": {"name": "fsdp"}}))
    assert len(found) == 2
    assert found[0].startswith("train.loss:") and "'sft', 'orpo', 'dpo', 'ipo'" in found[0]
    assert found[1].startswith("train.backend:")


def test_field_errors_are_all_listed_at_once():
    found = problems(spec_with(generate={"num_samples": 0, "top_p": 2.0}, data={"path": "p", "eval_fraction": 1.5}))
    paths = sorted(p.split(":")[0] for p in found)
    assert paths == ["data.eval_fraction", "generate.num_samples", "generate.top_p"]


def test_impossible_combinations_are_refused_together():
    found = problems(
        spec_with(
            pairs={"strategy": ["gold_vs_weak", "best_vs_worst"]},
            generate={"num_samples": 1},
            train={"backend": {"name": "qlora"}},
            data={"path": "p", "eval_fraction": 0.0},
        )
    )
    assert sorted(p.split(":")[0] for p in found) == [
        "data.eval_fraction",
        "data.gold_field",
        "generate.num_samples",
        "generate.weak_model",
        "train.lora",
    ]


def test_field_and_cross_field_problems_come_together():
    found = problems(spec_with(pairs={"strategy": "gold_vs_weak"}, train={"epochs": 0}, typo=1))
    assert sorted(found) == [
        "data.gold_field: pairs strategy gold_vs_weak needs the gold answer field",
        "generate.weak_model: pairs strategy gold_vs_weak needs a weak model",
        "train.epochs: Input should be greater than or equal to 1",
        "typo: unknown key",
    ]


def test_eval_needs_merged_lora():
    found = problems(spec_with(train={"lora": {"r": 4}}, export={"merge_lora": False}))
    assert found == ["export.merge_lora: eval generates with the exported model, which needs merged LoRA weights"]
    parse_spec(spec_with(train={"lora": {"r": 4}}, export={"merge_lora": False}, eval={"enabled": False}))


def test_function_reward_must_import():
    found = problems(spec_with(score={"reward": {"type": "function", "function": "alignlib.rewards:nope"}}))
    assert found == ["score.reward.function: module 'alignlib.rewards' has no callable 'nope'"]
    found = problems(spec_with(score={"reward": {"type": "function", "function": "no_colon"}}))
    assert "expected `module:function`" in found[0]


def test_the_old_gold_answer_field_name_says_what_it_became():
    found = problems(spec_with(data={"path": "p.jsonl", "reference_field": "answer"}))
    assert found == ["data.reference_field was renamed data.gold_field"]
    raw = apply_overrides(json.loads(json.dumps(MINIMAL)), ["data.reference_field=answer"])
    assert problems(raw) == ["data.reference_field was renamed data.gold_field"]
    assert parse_spec(spec_with(data={"path": "p.jsonl", "gold_field": "answer"})).data.gold_field == "answer"


def test_a_reward_function_still_taking_reference_is_refused_when_the_spec_is_validated(tmp_path, monkeypatch):
    (tmp_path / "old_style_reward.py").write_text(
        "def score(prompt, completion, reference):\n    return 1.0\n\n"
        "def both(prompt, completion, gold, reference=None):\n    return 1.0\n\n"
        "def flagged(prompt, completion, gold):\n    return 1.0\n\n"
        "flagged.needs_reference = True\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    found = problems(spec_with(score={"reward": {"type": "function", "function": "old_style_reward:score"}}))
    assert found == [
        "score.reward.function: reward function old_style_reward:score has a parameter `reference`; the gold "
        "answer is now passed as `gold` (fn(prompt=, completion=, gold=)): rename the parameter to `gold`"
    ]
    rewards = [{"type": "function", "function": "old_style_reward:score"}]
    assert "rename the parameter to `gold`" in problems(spec_with(score={"rewards": rewards}))[0]
    found = problems(spec_with(score={"reward": {"type": "function", "function": "old_style_reward:flagged"}}))
    assert found == [
        "score.reward.function: reward function old_style_reward:flagged sets `needs_reference`, which is now "
        "called `needs_gold`; rename it"
    ]
    parse_spec(spec_with(score={"reward": {"type": "function", "function": "old_style_reward:both"}}))


def test_concurrency_range_is_checked():
    assert parse_spec(spec_with(generate={"concurrency": [1, 4]})).generate.concurrency == (1, 4)
    assert problems(spec_with(generate={"concurrency": [3, 2]}))[0].startswith("generate.concurrency")


def test_llm_runner_refuses_tensor_parallel_naming_the_runner_to_use():
    assert parse_spec(spec_with(generate={"vllm_runner": "llm"})).generate.vllm_runner == "llm"
    (found,) = problems(spec_with(generate={"vllm_runner": "llm", "engine_kwargs": {"tensor_parallel_size": 2}}))
    assert found.startswith("generate: ") and "{'tensor_parallel_size': 2} needs vllm_runner: processor" in found
    assert problems(spec_with(generate={"vllm_runner": "ray"}))[0].startswith("generate.vllm_runner")


def test_object_store_output_dirs_are_taken_and_other_uris_refused():
    assert parse_spec(spec_with(output_dir="s3://bucket/runs/demo/")).output_dir == "s3://bucket/runs/demo"
    assert parse_spec(spec_with(output_dir="gs://bucket/run")).output_dir == "gs://bucket/run"
    assert parse_spec(spec_with(output_dir="file:///tmp/run")).output_dir == "/tmp/run"
    (found,) = problems(spec_with(output_dir="s3:///run"))
    assert found.startswith("output_dir: ") and "names no bucket" in found
    (found,) = problems(spec_with(output_dir="ftp://host/run"))
    assert found.startswith("output_dir: ") and "s3://, gs://" in found


def test_overrides_parse_values_as_yaml_and_create_sections():
    raw = apply_overrides(json.loads(json.dumps(MINIMAL)), ["train.epochs=3", "generate.concurrency=[1, 4]", "seed=7"])
    spec = parse_spec(raw)
    assert (spec.train.epochs, spec.generate.concurrency, spec.seed) == (3, (1, 4), 7)


def test_override_into_a_scalar_is_an_error():
    with pytest.raises(SpecError, match="seed is not a mapping"):
        apply_overrides({"seed": 1}, ["seed.x=2"])
    with pytest.raises(SpecError, match="overrides are key=value"):
        apply_overrides({}, ["train.epochs"])


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("name: x\noutput_dir: [unclosed\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(path) in str(info.value) and "line 3" in info.value.problems[0]


@pytest.mark.parametrize("path", sorted((ROOT / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_job_validates(path):
    spec = load_spec(path)
    assert spec.name and spec.output_dir


def test_validate_command_prints_every_problem_and_exits_nonzero(tmp_path):
    raw = spec_with(train={"loss": {"name": "dpo", "beta": -1}}, typo=1)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    done = subprocess.run([sys.executable, "-m", "alignlib", "validate", str(path)], capture_output=True, text=True)
    assert done.returncode == 2
    assert "train.loss.beta: Input should be greater than 0" in done.stderr
    assert "typo: unknown key" in done.stderr


def test_schema_command_prints_json_schema():
    done = subprocess.run([sys.executable, "-m", "alignlib", "schema"], capture_output=True, text=True, check=True)
    schema = json.loads(done.stdout)
    assert {"data", "policy", "train"} <= set(schema["properties"])
    assert schema == json.loads(json.dumps(json_schema())), "the whole schema of the spec, nothing else"


def test_qlora_with_several_workers_is_refused_with_the_reason():
    lora = {"r": 4}
    found = problems(spec_with(train={"backend": {"name": "qlora", "num_workers": 4}, "lora": lora}))
    assert len(found) == 1 and found[0].startswith("train.backend: num_workers 4: the qlora backend trains on one")
    ok = parse_spec(spec_with(train={"backend": {"name": "qlora", "num_workers": 1}, "lora": lora}))
    assert ok.train.backend.num_workers == 1


def test_training_knobs_are_cross_checked():
    found = problems(spec_with(train={"precompute_reference": True, "max_length": 64, "max_prompt_length": 64}))
    assert sorted(found) == [
        "train.max_prompt_length: 64 leaves no room for the completion within train.max_length 64",
        "train.precompute_reference: loss 'orpo' uses no reference model (only dpo and ipo do)",
    ]
    parse_spec(spec_with(train={"loss": {"name": "dpo"}, "precompute_reference": True, "max_prompt_length": 32}))


REWARD_MODEL = {"loss": {"name": "reward"}, "backend": {"name": "ddp", "num_workers": 2, "use_gpu": False}}


def test_reward_model_loss_defaults_and_knobs():
    spec = parse_spec(spec_with(train=REWARD_MODEL, eval={"enabled": False}))
    assert (spec.train.loss.margin, spec.train.loss.center_rewards_coefficient) == (False, None)
    loss = {"name": "reward", "margin": True, "center_rewards_coefficient": 0.01}
    spec = parse_spec(spec_with(train={**REWARD_MODEL, "loss": loss}, eval={"enabled": False}))
    assert (spec.train.loss.margin, spec.train.loss.center_rewards_coefficient) == (True, 0.01)
    bad = {"name": "reward", "beta": 0.1, "center_rewards_coefficient": -1}
    found = problems(spec_with(train={"loss": bad}, eval={"enabled": False}))
    assert sorted(p.split(":")[0] for p in found) == ["train.loss.beta", "train.loss.center_rewards_coefficient"]


def test_reward_model_refuses_what_it_cannot_do_yet_naming_each_field():
    """A reward model is a scorer: eval cannot sample it and a next round cannot start from it; deepspeed and
    qlora are not wired for its score head; an unmerged LoRA export is no directory score.reward loads."""
    train = {"loss": {"name": "reward"}, "backend": {"name": "deepspeed"}, "lora": {"r": 4}}
    found = problems(spec_with(train=train, rounds={"count": 2}, export={"merge_lora": False}))
    assert sorted(p.split(":")[0] for p in found) == [
        "eval.enabled",
        "export.merge_lora",  # the reward model's export
        "export.merge_lora",  # and the existing checks: eval and rounds sample the export
        "export.merge_lora",
        "rounds.count",
        "train.backend",
    ]
    assert any(p.startswith("eval.enabled: loss reward trains a reward model") for p in found)
    assert any("train.backend: loss reward trains on the ddp backend" in p and "deepspeed" in p for p in found)
    found = problems(spec_with(train={"loss": {"name": "reward"}, "backend": {"name": "qlora"}, "lora": {"r": 4}}))
    assert sorted(p.split(":")[0] for p in found) == ["eval.enabled", "train.backend"]


def test_reward_model_on_imported_preferences_validates():
    spec = parse_spec(
        spec_with(data={"path": "p.jsonl", "kind": "preferences"}, train=REWARD_MODEL, eval={"enabled": False})
    )
    assert spec.train.loss.name == "reward"


def test_reward_model_source_check_names_the_policy(tmp_path):
    """Before any stage runs: a policy whose config has no sequence-classification class, or is a classifier
    with more than one label, is refused naming policy.model; the built-in tiny policy is fine."""
    from alignlib.sources import problems as source_problems

    def job(model: str):
        return parse_spec(spec_with(policy={"model": model}, train=REWARD_MODEL, eval={"enabled": False}))

    classifier = tmp_path / "two-labels"
    classifier.mkdir()
    (classifier / "config.json").write_text(
        json.dumps({"model_type": "llama", "architectures": ["LlamaForSequenceClassification"], "num_labels": 2})
    )
    (found,) = source_problems(job(str(classifier)), ["train"])
    assert found.startswith("policy.model: loss reward trains") and "num_labels=2" in found
    vision = tmp_path / "vision"
    vision.mkdir()
    (vision / "config.json").write_text(json.dumps({"model_type": "vit"}))
    (found,) = source_problems(job(str(vision)), ["train"])
    assert "model type 'vit' has no sequence-classification class" in found
    assert source_problems(job(str(vision)), ["generate"]) == []  # only the train stage checks the head
