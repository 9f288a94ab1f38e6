"""QLoRA and ZeRO-3 training on a GPU-sized model shape, reporting peak memory and tokens/s.

The model is a randomly initialised Llama of real proportions (hidden 2048, 16 layers, GQA,
~0.8B parameters) built offline with the built-in tokenizer, so no hub is needed. Each run goes
through alignlib's own `run_training` (one GPU worker: QLoRA in one actor, ZeRO-3 under Ray Train)
and prints one line:

    GPU-TRAIN qlora-orpo  peak_memory_mb=...  tokens_per_s=...  padding=...

Skipped on machines without CUDA (CI has none). Run on a GPU machine with
`python -m pytest tests/gpu -s` and copy the lines into the README's performance section.
"""

import json
import os
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def gpu_sized_model(tmp_path_factory, model_cache):
    from transformers import LlamaConfig, LlamaForCausalLM

    from alignlib.models import load_tokenizer, resolve_model

    path = tmp_path_factory.mktemp("gpu-sized") / "llama-0.8b"
    tokenizer = load_tokenizer("builtin:tiny-policy")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    for f in Path(resolve_model("builtin:tiny-policy")).glob("*token*"):
        shutil.copy(f, path / f.name)
    return path


def pairs(n: int) -> list[dict]:
    from alignlib import schema as S

    rows = []
    for i in range(n):
        prompt = f"Explain step {i}: what is {i % 13} + {i % 7}?"
        rows.append(
            {
                S.PROMPT_ID: f"p{i}",
                S.PROMPT: prompt,
                S.MESSAGES: [{"role": "user", "content": prompt}],
                S.CHOSEN: f"{i % 13 + i % 7}" + " and that is the sum" * (i % 9),
                S.REJECTED: "I do not know" * (1 + i % 5),
                S.CHOSEN_REWARD: 1.0,
                S.REJECTED_REWARD: 0.0,
                S.MARGIN: 1.0,
                S.STRATEGY: "gold_vs_weak",
                S.CHOSEN_GENERATOR: "gold",
                S.REJECTED_GENERATOR: "weak",
            }
        )
    return rows


CASES = {
    "qlora-orpo": {
        "loss": {"name": "orpo", "lambda_": 0.1},
        "backend": {"name": "qlora", "use_gpu": True},
        "lora": {"r": 16, "alpha": 32},
        "gradient_checkpointing": True,
    },
    "zero3-dpo": {
        "loss": {"name": "dpo", "beta": 0.1},
        "backend": {"name": "deepspeed", "zero_stage": 3, "num_workers": 1, "use_gpu": True},
    },
}


@pytest.mark.parametrize("case", list(CASES))
def test_gpu_training_reports_memory_and_throughput(case, gpu_sized_model, ray_session, tmp_path):
    import ray

    from alignlib.spec import parse_spec
    from alignlib.train.launch import metrics_path, read_metrics, run_training

    train = {"epochs": 2, "lr": 1e-5, "batch_size": 8, "max_length": 512, "log_every": 5, **CASES[case]}
    spec = parse_spec(
        {
            "name": case,
            "output_dir": str(tmp_path),
            "data": {"path": "unused.jsonl"},
            "policy": {"model": str(gpu_sized_model), "dtype": "bfloat16"},
            "train": train,
            "eval": {"enabled": False},
        }
    )
    rows = pairs(256)
    result = run_training(spec, ray.data.from_items(rows).materialize(), len(rows), run_name=case)
    assert result.error is None, result.error
    epochs, _ = read_metrics(metrics_path(spec, case))
    last = epochs[-1]
    line = {k: round(last[k], 3) for k in ("peak_memory_mb", "tokens_per_s", "padding")}
    print(f"GPU-TRAIN {case}  " + "  ".join(f"{k}={v}" for k, v in line.items()), flush=True)
    if os.environ.get("ALIGNLIB_GPU_REPORT"):
        with open(os.environ["ALIGNLIB_GPU_REPORT"], "a") as f:
            f.write(json.dumps({"case": case, "device": torch.cuda.get_device_name(), **line}) + "\n")
    assert last["peak_memory_mb"] > 0 and last["tokens_per_s"] > 0
    assert epochs[-1]["train/loss"] < epochs[0]["train/loss"], epochs
