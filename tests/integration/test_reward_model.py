"""Reward-model training (train.loss: reward), for real on the built-in tiny policy.

The session's small job (conftest: tiny-policy samples scored by builtin:tiny-reward, paired best vs worst) is
copied up to its pairs; the same job with `loss: reward` then runs its train and export stages, once with one
worker (one Ray actor, all weights) and once with two DDP workers under Ray Train and LoRA (merged on export).
What a user would see: the export is a one-label sequence-classification directory, `score.ModelScorer` (the
transformers reward engine) loads it and scores rows, and it ranks the chosen answer above the rejected one on
more training pairs than the model it started from, the policy with a fresh score head.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from alignlib import schema as S
from alignlib.store import read_table

sys.path.insert(0, str(Path(__file__).parent))
from conftest import SMALL_JOB, UPSTREAM  # noqa: E402

pytestmark = pytest.mark.integration

TRAIN = {"loss": {"name": "reward", "center_rewards_coefficient": 0.01}, "epochs": 6, "lr": 2e-3, "batch_size": 8}
BACKENDS = {
    "one-worker": {"backend": {"name": "ddp", "num_workers": 1, "use_gpu": False}},
    "ddp-2-workers-lora": {
        "backend": {"name": "ddp", "num_workers": 2, "use_gpu": False},
        "lora": {"r": 8, "alpha": 16},
        "lr": 5e-3,
    },
}


def pair_accuracy(model: str, pairs: list[dict], max_length: int) -> float:
    """Share of pairs whose chosen answer `model` (a reward-model directory) scores above the rejected one,
    scored by alignlib's transformers reward engine."""
    from alignlib.score import ModelScorer

    scorer = ModelScorer(model, "float32", max_length)
    rows = [{S.MESSAGES: p[S.MESSAGES], S.COMPLETION: p[side]} for side in (S.CHOSEN, S.REJECTED) for p in pairs]
    rewards = scorer.scored(pa.Table.from_pylist(rows))[S.REWARD].to_pylist()
    chosen, rejected = rewards[: len(pairs)], rewards[len(pairs) :]
    return sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(pairs)


def untrained_start(spec, target: Path) -> str:
    """The model training starts from, saved as a directory: the policy with the score head the first worker
    draws (seeded with the job's seed before the model is built, as `Trainer` seeds it)."""
    import torch

    from alignlib.models import load_reward_head, load_tokenizer

    torch.manual_seed(spec.seed)
    load_reward_head(spec.policy.model, "float32").save_pretrained(target)
    load_tokenizer(spec.policy.model).save_pretrained(target)
    return str(target)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_reward_model_trains_exports_and_scores(backend, small_job, tmp_path):
    from transformers import AutoConfig

    from alignlib.pipeline import Pipeline
    from alignlib.spec import parse_spec

    run = tmp_path / "run"
    for stage in UPSTREAM:
        shutil.copytree(small_job / stage, run / stage)
    raw = json.loads(json.dumps(SMALL_JOB))
    raw["train"] = {**raw["train"], **TRAIN, **BACKENDS[backend]}
    spec = parse_spec({**raw, "output_dir": str(run)})
    pipeline = Pipeline(spec)
    assert pipeline.stages() == ["prompts", "generate", "score", "pairs", "train", "export"]
    assert pipeline.todo() == ["train", "export"]  # the small job's pairs are this job's: only training is new

    manifests = pipeline.run(["train", "export"])
    kind = manifests["export"]["stats"]["kind"]
    assert kind == ("reward-model-merged-lora" if "lora" in BACKENDS[backend] else "reward-model-full")
    exported = run / "export" / "model"
    config = AutoConfig.from_pretrained(exported)
    assert config.architectures == ["LlamaForSequenceClassification"] and config.num_labels == 1
    assert config.pad_token_id is not None and not (exported / "adapter_config.json").exists()

    pairs = read_table(pipeline.table_path("pairs", "pairs")).to_pylist()
    start = pair_accuracy(untrained_start(spec, tmp_path / "start"), pairs, spec.train.max_length)
    trained = pair_accuracy(str(exported), pairs, spec.train.max_length)
    print(f"{backend}: pair accuracy on {len(pairs)} training pairs {start:.2f} (start) -> {trained:.2f} (trained)")
    assert trained > 0.75 and trained > start + 0.15
