"""Training does what the spec says, measured on the weights it produces (real Ray Train, tiny policy, CPU).

- the micro-batch split is invisible: batch 4 x accumulation 1 and batch 1 x accumulation 4 end on
  the same weights;
- precomputed reference log-probs (the ref_logps stage's columns) train exactly like a frozen
  reference copy, and the columns are really what the loss reads.
"""

from pathlib import Path

import pytest
import torch

from alignlib import schema as S
from alignlib.spec import parse_spec
from alignlib.train.backends import _read_weights
from alignlib.train.launch import run_training

pytestmark = pytest.mark.integration


def pairs_rows(n: int) -> list[dict]:
    """Arithmetic pairs whose answers differ in length, so batches need padding."""
    rows = []
    for i in range(n):
        a, b = 3 * i % 11, 5 * i % 7
        prompt = f"What is {a} + {b}?"
        chosen = f"{a + b}" + " because" * (i % 4)
        rows.append({
            S.PROMPT_ID: f"p{i}", S.PROMPT: prompt, S.MESSAGES: [{"role": "user", "content": prompt}],
            S.CHOSEN: chosen, S.REJECTED: "no idea " * (1 + i % 3), S.CHOSEN_REWARD: 1.0, S.REJECTED_REWARD: 0.0,
            S.MARGIN: 1.0, S.STRATEGY: "gold_vs_weak", S.CHOSEN_GENERATOR: "reference", S.REJECTED_GENERATOR: "weak",
        })  # fmt: skip
    return rows


def make_spec(tmp_path: Path, name: str, **train) -> object:
    train = {"epochs": 1, "lr": 1e-3, "schedule": "constant", "max_length": 48, "log_every": 1,
             "backend": {"name": "ddp", "num_workers": 1, "use_gpu": False}, **train}  # fmt: skip
    return parse_spec({
        "name": name, "output_dir": str(tmp_path / name), "data": {"path": "unused.jsonl"},
        "policy": {"model": "builtin:tiny-policy"}, "train": train, "eval": {"enabled": False},
    })  # fmt: skip


def train_weights(spec, dataset, n: int) -> dict[str, torch.Tensor]:
    result = run_training(spec, dataset, n, run_name=spec.name)
    assert result.error is None, result.error
    return _read_weights(Path(result.checkpoint.path) / "model")


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def initial_weights() -> dict[str, torch.Tensor]:
    from alignlib.models import load_causal_lm

    return {k: v.detach().clone() for k, v in load_causal_lm("builtin:tiny-policy", "float32").state_dict().items()}


def test_micro_batch_split_does_not_change_the_update(ray_session, tmp_path):
    import ray

    rows = pairs_rows(16)
    dataset = ray.data.from_items(rows).materialize()
    whole = train_weights(make_spec(tmp_path, "b4xa1", batch_size=4, grad_accum=1), dataset, len(rows))
    split = train_weights(make_spec(tmp_path, "b1xa4", batch_size=1, grad_accum=4), dataset, len(rows))
    moved = max_difference(whole, {k: v for k, v in initial_weights().items() if k in whole})
    assert moved > 1e-3, "four optimizer steps at lr 1e-3 moved the weights"
    assert max_difference(whole, split) < 1e-5, "same examples per step, same update"


def test_precomputed_reference_trains_like_a_frozen_copy(ray_session, tmp_path):
    import ray

    from alignlib.losses import sequence_logps
    from alignlib.models import load_causal_lm, load_tokenizer
    from alignlib.train.data import collate, encode_rows
    from alignlib.train.reference import reference_logps

    rows = pairs_rows(12)
    dpo = {"loss": {"name": "dpo", "beta": 0.5}, "batch_size": 4}
    spec = make_spec(tmp_path, "dpo-copy", **dpo)
    with_ref = reference_logps(ray.data.from_items(rows), spec).materialize()
    table = with_ref.to_pandas().set_index(S.PROMPT_ID).loc[[r[S.PROMPT_ID] for r in rows]]
    assert len(table) == len(rows) and set(S.PAIR_COLUMNS) <= set(table.columns) | {S.PROMPT_ID}

    # The stage's numbers are the starting policy's summed log-probs, computed here one pair at a time.
    tokenizer = load_tokenizer("builtin:tiny-policy")
    model = load_causal_lm("builtin:tiny-policy", "float32").eval()
    for row in rows[:3]:
        batch = collate(encode_rows(tokenizer, [row], True, 48), tokenizer.pad_token_id, paired=True)
        with torch.no_grad():
            expected = sequence_logps(model(input_ids=batch["input_ids"]).logits, batch["labels"]).tolist()
        got = table.loc[row[S.PROMPT_ID], [S.REF_CHOSEN_LOGPS, S.REF_REJECTED_LOGPS]].tolist()
        assert got == pytest.approx(expected, abs=1e-4) and max(got) < 0

    copy = train_weights(spec, ray.data.from_items(rows).materialize(), len(rows))
    precomputed = train_weights(make_spec(tmp_path, "dpo-precomputed", **dpo), with_ref, len(rows))
    assert max_difference(copy, precomputed) < 1e-5, "same reference, same training"

    # And the columns are what the loss reads: a shifted reference trains to different weights.
    shifted = with_ref.map(lambda r: {**r, S.REF_CHOSEN_LOGPS: r[S.REF_CHOSEN_LOGPS] + 5.0}).materialize()
    moved = train_weights(make_spec(tmp_path, "dpo-shifted", **dpo), shifted, len(rows))
    assert max_difference(copy, moved) > 1e-4


def test_deepspeed_resume_restores_optimizer_state(ray_session, tmp_path):
    """One epoch, then the same run asked for two (as after a crash in epoch 2): DeepSpeed's own checkpoint
    brings back Adam's moments and the schedule, so the weights equal those of two uninterrupted epochs."""
    import ray

    rows = pairs_rows(16)
    dataset = ray.data.from_items(rows).materialize()
    deepspeed = {"backend": {"name": "deepspeed", "zero_stage": 2, "num_workers": 1, "use_gpu": False},
                 "batch_size": 4, "loss": {"name": "orpo"}}  # fmt: skip
    full = train_weights(make_spec(tmp_path, "ds-full", epochs=2, **deepspeed), dataset, len(rows))
    first = make_spec(tmp_path, "ds-resumed", epochs=1, **deepspeed)
    once = train_weights(first, dataset, len(rows))
    resumed = run_training(make_spec(tmp_path, "ds-resumed", epochs=2, **deepspeed), dataset, len(rows), "ds-resumed")
    assert resumed.error is None and resumed.metrics["epoch"] == 2
    assert (Path(resumed.checkpoint.path) / "deepspeed").is_dir()
    again = _read_weights(Path(resumed.checkpoint.path) / "model")
    assert max_difference(once, again) > 1e-4, "the second epoch trained"
    assert max_difference(full, again) < 1e-5, "resumed equals uninterrupted"
