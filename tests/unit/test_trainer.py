"""Training arithmetic, measured on the weights it produces, in this process (the Trainer without Ray Train).

The epoch body that Ray Train's workers run (`train.loop.Trainer.train_epoch`) is called here directly on
tokenized rows of the tiny policy, so these exactness checks take seconds; tests/integration keeps one real
Ray Train run per backend.

- the micro-batch split is invisible: batch 4 x accumulation 1 and batch 1 x accumulation 4 end on the
  same weights;
- an epoch's metrics: one line per optimizer step with that step's own means, and epoch means;
- precomputed reference log-probs (the ref_logps stage's actor, run here on a table) are the starting
  policy's, train exactly like a frozen reference copy, and are really what the loss reads.
"""

from pathlib import Path

import pyarrow as pa
import pytest
import torch
from torch.testing import assert_close

from alignlib import schema as S
from alignlib.spec import parse_spec
from alignlib.train.data import tokenize_rows
from alignlib.train.launch import optimizer_steps
from alignlib.train.loop import Trainer


def pairs_rows(n: int) -> list[dict]:
    """Arithmetic pairs whose answers differ in length, so batches need padding."""
    rows = []
    for i in range(n):
        a, b = 3 * i % 11, 5 * i % 7
        prompt = f"What is {a} + {b}?"
        chosen = f"{a + b}" + " because" * (i % 4)
        rows.append(
            {
                S.PROMPT_ID: f"p{i}",
                S.PROMPT: prompt,
                S.MESSAGES: [{"role": "user", "content": prompt}],
                S.CHOSEN: chosen,
                S.REJECTED: "no idea " * (1 + i % 3),
                S.CHOSEN_REWARD: 1.0,
                S.REJECTED_REWARD: 0.0,
                S.MARGIN: 1.0,
                S.STRATEGY: "gold_vs_weak",
                S.CHOSEN_GENERATOR: "gold",
                S.REJECTED_GENERATOR: "weak",
            }
        )
    return rows


def make_spec(tmp_path: Path, name: str, **train):
    train = {
        "epochs": 1,
        "lr": 1e-3,
        "schedule": "constant",
        "max_length": 48,
        "log_every": 1,
        "backend": {"name": "ddp", "num_workers": 1, "use_gpu": False},
        **train,
    }
    return parse_spec(
        {
            "name": name,
            "output_dir": str(tmp_path / name),
            "data": {"path": "unused.jsonl"},
            "policy": {"model": "builtin:tiny-policy"},
            "train": train,
            "eval": {"enabled": False},
        }
    )


def train(spec, rows: list[dict]) -> Trainer:
    """Every epoch of `spec` on `rows`, in this process; the trainer after its last epoch."""
    examples = tokenize_rows(spec, rows, paired=spec.train.loss.name != "sft")
    trainer = Trainer(spec, optimizer_steps(spec, len(examples)))
    for epoch in range(spec.train.epochs):
        trainer.train_epoch(iter(examples), epoch)
    return trainer


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.backend.unwrapped.state_dict().items()}


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def initial_weights() -> dict[str, torch.Tensor]:
    from alignlib.models import load_causal_lm

    return {k: v.detach().clone() for k, v in load_causal_lm("builtin:tiny-policy", "float32").state_dict().items()}


def test_micro_batch_split_does_not_change_the_update(model_cache, tmp_path):
    rows = pairs_rows(16)
    whole = weights(train(make_spec(tmp_path, "b4xa1", batch_size=4, grad_accum=1), rows))
    split = weights(train(make_spec(tmp_path, "b1xa4", batch_size=1, grad_accum=4), rows))
    moved = max_difference(whole, {k: v for k, v in initial_weights().items() if k in whole})
    assert moved > 1e-3, "four optimizer steps at lr 1e-3 moved the weights"
    assert max_difference(whole, split) < 1e-5, "same examples per step, same update"


def test_an_epoch_reports_per_step_means_and_epoch_means(model_cache, tmp_path):
    import json

    spec = make_spec(tmp_path, "metrics", batch_size=4, epochs=2, loss={"name": "sft"})
    rows = [{**r, S.COMPLETION: r[S.CHOSEN], S.REWARD: 1.0} for r in pairs_rows(16)]
    examples = tokenize_rows(spec, rows, paired=False)
    log = tmp_path / "metrics.jsonl"
    trainer = Trainer(spec, optimizer_steps(spec, 16), metrics_path=str(log))
    epochs = [trainer.train_epoch(iter(examples), e) for e in range(2)]
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    steps = [x for x in lines if x["kind"] == "step"]
    assert [x["step"] for x in steps] == list(range(1, 9)), "4 steps of 4 examples per epoch, one line each"
    # Each step line holds its own step's mean loss; the epoch's mean loss is the mean of its steps'.
    for epoch, metrics in zip((1, 2), epochs, strict=True):
        own = [x["sft_loss"] for x in steps if x["epoch"] == epoch]
        assert metrics["train/sft_loss"] == pytest.approx(sum(own) / len(own))
    assert epochs[1]["train/loss"] < epochs[0]["train/loss"]
    assert len({round(x["sft_loss"], 6) for x in steps}) == len(steps), "per-step values, not a running mean"


def test_max_steps_ends_training_mid_epoch_with_the_schedule_spanning_those_steps(model_cache, tmp_path):
    spec = make_spec(
        tmp_path, "max-steps", batch_size=4, epochs=3, max_steps=3, loss={"name": "sft"}, schedule="cosine"
    )
    rows = [{**r, S.COMPLETION: r[S.CHOSEN], S.REWARD: 1.0} for r in pairs_rows(16)]
    examples = tokenize_rows(spec, rows, paired=False)
    assert optimizer_steps(spec, 16) == 3, "3 steps, not 3 epochs of 4"
    trainer = Trainer(spec, optimizer_steps(spec, 16))
    metrics = trainer.train_epoch(iter(examples), 0)
    assert (metrics["step"], metrics["examples"]) == (3, 12), "stopped after its 3rd step, 4 rows unread"
    assert trainer.done(0), "the first epoch is the last"
    assert trainer.backend.lr == pytest.approx(0.0, abs=1e-12), "the cosine schedule ends at the last step"


def test_precomputed_reference_trains_like_a_frozen_copy(model_cache, tmp_path):
    from alignlib.losses import sequence_logps
    from alignlib.models import load_causal_lm, load_tokenizer
    from alignlib.train.data import collate, encode_rows
    from alignlib.train.reference import ReferenceLogps

    rows = pairs_rows(12)
    dpo = {"loss": {"name": "dpo", "beta": 0.5}, "batch_size": 4}
    copy_spec = make_spec(tmp_path, "dpo-copy", **dpo)
    precomputed_spec = make_spec(tmp_path, "dpo-precomputed", precompute_reference=True, **dpo)
    # The ref_logps stage's actor, applied to the pairs as one table.
    table = pa.Table.from_pylist(rows)
    with_ref = ReferenceLogps(precomputed_spec.model_dump(mode="json"))(table).to_pylist()
    assert [r[S.PROMPT_ID] for r in with_ref] == [r[S.PROMPT_ID] for r in rows]

    # Its numbers are the starting policy's summed log-probs, computed here one pair at a time.
    tokenizer = load_tokenizer("builtin:tiny-policy")
    model = load_causal_lm("builtin:tiny-policy", "float32").eval()
    for row, got in zip(rows[:3], with_ref[:3], strict=True):
        batch = collate(encode_rows(tokenizer, [row], True, 48), tokenizer.pad_token_id, paired=True)
        with torch.no_grad():
            expected = sequence_logps(model(input_ids=batch["input_ids"]).logits, batch["labels"]).tolist()
        values = [got[S.REF_CHOSEN_LOGPS], got[S.REF_REJECTED_LOGPS]]
        assert values == pytest.approx(expected, abs=1e-4) and max(values) < 0

    copy = train(copy_spec, rows)
    assert copy.reference_source == "frozen-copy"
    precomputed = train(precomputed_spec, with_ref)
    assert precomputed.reference_source == "precomputed" and precomputed.reference is None
    # Float rounding differs with the micro-batch shapes (the ref_logps stage sorts by length, and logits start at
    # each batch's first answer token); Adam's normalised steps carry it into the weights: 2e-5 measured, where
    # a wrong reference moves them by 3e-3.
    assert max_difference(weights(copy), weights(precomputed)) < 1e-4, "same reference, same training"

    # And the columns are what the loss reads: a shifted reference trains to different weights.
    shifted = [{**r, S.REF_CHOSEN_LOGPS: r[S.REF_CHOSEN_LOGPS] + 5.0} for r in with_ref]
    moved = train(make_spec(tmp_path, "dpo-shifted", precompute_reference=True, **dpo), shifted)
    assert max_difference(weights(copy), weights(moved)) > 1e-4


def test_precomputed_reference_without_its_columns_is_refused(model_cache, tmp_path):
    spec = make_spec(tmp_path, "dpo-missing", precompute_reference=True, loss={"name": "dpo"})
    with pytest.raises(Exception, match=r"missing column\(s\) \['ref_chosen_logps', 'ref_rejected_logps'\]"):
        train(spec, pairs_rows(4))


def test_logits_from_the_first_answer_token_on_give_the_same_log_probs(model_cache):
    """`model_logps` asks the model for logits from the position before the batch's first labelled token on
    (`logits_to_keep`), through the peft wrapper too; the log-probs equal those from every position's logits."""
    from peft import LoraConfig, get_peft_model

    from alignlib.losses import sequence_logps
    from alignlib.models import load_causal_lm, load_tokenizer
    from alignlib.train.data import collate, encode_rows
    from alignlib.train.loop import _base_model, _keeps_logits, model_logps

    tokenizer = load_tokenizer("builtin:tiny-policy")
    rows = pairs_rows(6)
    batch = collate(encode_rows(tokenizer, rows, True, 48), tokenizer.pad_token_id, paired=True)
    first = int((batch["labels"] != -100).any(dim=0).float().argmax())
    assert 0 < first < batch["labels"].shape[1] - 1, "the prompts leave columns whose logits are skipped"
    base = load_causal_lm("builtin:tiny-policy", "float32").eval()
    lora = get_peft_model(
        load_causal_lm("builtin:tiny-policy", "float32"),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    ).eval()
    for model in (base, lora):
        assert _keeps_logits(_base_model(model))
        with torch.no_grad():
            full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            for average in (False, True):
                expected = sequence_logps(full, batch["labels"], average=average)
                got = model_logps(model, batch, average=average)
                assert torch.allclose(got, expected, atol=1e-5), (got, expected)


# -- checkpoints: one layout, written and resumed by `Trainer.fit` under both launchers ----------------------------


def run_dir(store: str, tmp_path: Path, name: str):
    """A run's directory: local, or an object-store prefix (a `RemotePath` on pyarrow's in-memory filesystem,
    which like S3 needs no directory made before a file is written into it)."""
    if store == "local":
        return tmp_path / name
    import pyarrow.fs as pafs

    from alignlib.locations import RemotePath

    return RemotePath("mock://", pafs._MockFileSystem(), f"bucket/{name}")


def sft_examples(spec, n: int) -> list[dict]:
    rows = [{**r, S.COMPLETION: r[S.CHOSEN], S.REWARD: 1.0} for r in pairs_rows(n)]
    return tokenize_rows(spec, rows, paired=False)


@pytest.mark.parametrize("store", ["local", "object-store"])
def test_fit_checkpoints_each_epoch_keeps_the_last_two_and_resumes_to_the_same_weights(store, model_cache, tmp_path):
    from alignlib.train.checkpoints import INDEX, TrainResult, finished, read_index

    spec = make_spec(tmp_path, f"fit-{store}", batch_size=4, epochs=3, loss={"name": "sft"})
    examples = sft_examples(spec, 8)
    total = optimizer_steps(spec, len(examples))
    whole, run = Trainer(spec, total), run_dir(store, tmp_path, "whole")
    whole.fit(run, lambda: iter(examples))
    assert [(e["name"], e["epoch"]) for e in read_index(run)] == [
        ("checkpoint_epoch-0002", 1),
        ("checkpoint_epoch-0003", 2),
    ]
    assert sorted(p.name for p in run.iterdir()) == sorted([INDEX, "checkpoint_epoch-0002", "checkpoint_epoch-0003"])
    result = TrainResult.read(run)
    assert result.checkpoint == str(run / "checkpoint_epoch-0003") and result.error is None
    assert (result.metrics["epoch"], result.metrics["step"]) == (3, total)
    assert finished(run, spec.train.epochs, total)

    # Stopped after its first checkpoint (as a killed worker is): listed, not finished; a new trainer resumes it.
    class Killed(Exception):
        pass

    epochs_read = []

    def first_epoch_only():
        epochs_read.append(len(epochs_read))
        if len(epochs_read) > 1:
            raise Killed
        return iter(examples)

    cut = run_dir(store, tmp_path, "cut")
    with pytest.raises(Killed):
        Trainer(spec, total).fit(cut, first_epoch_only)
    assert [e["epoch"] for e in read_index(cut)] == [0] and not finished(cut, spec.train.epochs, total)
    resumed = Trainer(spec, total)
    resumed.fit(cut, lambda: iter(examples))
    assert max_difference(weights(whole), weights(resumed)) < 1e-6, "the optimizer state was restored too"
    assert TrainResult.read(cut).metrics["step"] == total

    # A finished run is read back, not trained again.
    Trainer(spec, total).fit(run, lambda: pytest.fail("a finished run read its rows again"))


def test_a_run_that_reached_max_steps_mid_way_is_finished(model_cache, tmp_path):
    from alignlib.train.checkpoints import finished, read_index

    spec = make_spec(tmp_path, "fit-max-steps", batch_size=4, epochs=3, max_steps=3, loss={"name": "sft"})
    examples = sft_examples(spec, 16)
    total = optimizer_steps(spec, len(examples))
    run = tmp_path / "run"
    Trainer(spec, total).fit(run, lambda: iter(examples))
    assert [(e["epoch"], e["metrics"]["step"]) for e in read_index(run)] == [(0, 3)]
    assert finished(run, spec.train.epochs, total), "the first epoch reached train.max_steps"
    Trainer(spec, total).fit(run, lambda: pytest.fail("a finished run read its rows again"))


class RankPart:
    """A worker of a group of two, as Ray Train runs them: each writes its own part of a checkpoint (as DeepSpeed
    writes every rank's optimizer shard under `deepspeed/`), rank 0 also the model and the epoch."""

    def __init__(self, rank: int):
        self.rank = rank

    def save(self, directory: Path, epoch: int) -> None:
        import time

        time.sleep(0.1 * self.rank)  # rank 1 is the slower one: without waiting for it, its part would be lost
        (directory / "deepspeed").mkdir(exist_ok=True)
        (directory / "deepspeed" / f"shard-{self.rank}").write_text(str(epoch))
        if self.rank == 0:
            (directory / "model").mkdir()
            (directory / "model" / "weights").write_text(str(epoch))
            (directory / "epoch").write_text(str(epoch))


@pytest.mark.parametrize("store", ["local", "object-store"])
def test_every_rank_writes_its_part_and_the_checkpoint_is_listed_once_whole(store, tmp_path):
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from alignlib.train.checkpoints import TrainResult, read_index, save

    run = run_dir(store, tmp_path, "group")
    barrier = threading.Barrier(2, timeout=30)
    with ThreadPoolExecutor(2) as pool:
        for epoch in range(3):
            metrics = {"epoch": epoch + 1, "step": 2 * (epoch + 1)}
            lead, other = (pool.submit(save, run, RankPart(rank), epoch, metrics, barrier.wait) for rank in (0, 1))
            lead.result()  # rank 0 has listed the checkpoint: every part is in it already
            listed = run / read_index(run)[-1]["name"]
            assert sorted(p.name for p in (listed / "deepspeed").iterdir()) == ["shard-0", "shard-1"]
            other.result()
    assert [e["name"] for e in read_index(run)] == ["checkpoint_epoch-0002", "checkpoint_epoch-0003"]
    for name in ("checkpoint_epoch-0002", "checkpoint_epoch-0003"):
        assert sorted(p.name for p in (run / name).iterdir()) == ["deepspeed", "epoch", "model"]
        assert sorted(p.name for p in (run / name / "deepspeed").iterdir()) == ["shard-0", "shard-1"]
    assert not (run / "checkpoint_epoch-0001").exists() and not any(p.name.endswith(".tmp") for p in run.iterdir())
    assert TrainResult.read(run).metrics == {"epoch": 3, "step": 6}


def test_reward_model_reads_the_tokens_the_scorer_reads_and_learns_the_pairs(model_cache, tmp_path):
    """loss reward: the policy becomes a one-label classifier; the loop's reward of each padded row equals the
    model's reward of that row alone as `score.ModelScorer` builds it (`models.reward_sequence`: rendered prompt
    + answer + EOS), the pairs' margins reach the loss, and training ranks chosen above rejected."""
    from alignlib.losses import reward_loss
    from alignlib.models import reward_sequence
    from alignlib.train.data import collate
    from alignlib.train.loop import model_rewards

    loss = {"name": "reward", "margin": True, "center_rewards_coefficient": 0.01}
    spec = make_spec(tmp_path, "rm", loss=loss, epochs=2, lr=3e-3, batch_size=4)
    rows = pairs_rows(16)
    for i, row in enumerate(rows):
        row[S.MARGIN] = 0.25 * (i % 3)
    examples = tokenize_rows(spec, rows, paired=True)
    trainer = Trainer(spec, optimizer_steps(spec, len(examples)))
    model = trainer.backend.unwrapped
    assert type(model).__name__ == "LlamaForSequenceClassification" and model.config.num_labels == 1

    batch = collate(examples[:4], trainer.tokenizer.pad_token_id, paired=True, with_margins=True)
    assert (batch["attention_mask"] == 0).any()  # padded rows
    with torch.no_grad():
        rewards = model_rewards(model, batch)
        sequences = [
            reward_sequence(trainer.tokenizer, row[S.MESSAGES], row[side], 48)
            for side in (S.CHOSEN, S.REJECTED)
            for row in rows[:4]
        ]
        alone = [float(model(input_ids=torch.tensor([ids])).logits) for ids in sequences]
    assert_close(rewards, torch.tensor(alone), rtol=1e-5, atol=1e-5)
    assert_close(batch["margins"], torch.tensor([0.0, 0.25, 0.5, 0.0]))
    start = reward_loss(rewards[:4], rewards[4:], batch["margins"], 0.01).losses.mean()

    epochs = [trainer.train_epoch(iter(examples), epoch) for epoch in range(spec.train.epochs)]
    assert epochs[0]["train/loss"] == pytest.approx(float(start), rel=0.2)  # step 1 of 4 starts from `start`
    assert epochs[1]["train/loss"] < 0.5 * epochs[0]["train/loss"]
    assert epochs[1]["train/accuracy"] == 1.0 and epochs[1]["train/reward_margin"] > epochs[0]["train/reward_margin"]


def test_reward_margins_of_imported_pairs_without_scores_are_refused_naming_the_field(model_cache, tmp_path):
    spec = make_spec(tmp_path, "rm-margin", loss={"name": "reward", "margin": True})
    rows = pairs_rows(3)
    rows[1][S.MARGIN] = None  # an imported pair without score_chosen / score_rejected
    with pytest.raises(ValueError, match=r"train.loss.margin: 1 pairs have no reward margin \(e.g. prompt p1"):
        tokenize_rows(spec, rows, paired=True)
    without = [{k: v for k, v in row.items() if k != S.MARGIN} for row in pairs_rows(3)]
    with pytest.raises(ValueError, match="margin"):  # the column itself is required
        tokenize_rows(spec, without, paired=True)
    assert "margins" not in collate_keys(make_spec(tmp_path, "rm-plain", loss={"name": "reward"}))


def collate_keys(spec) -> set[str]:
    from alignlib.spec import pair_margins
    from alignlib.train.data import collate

    examples = tokenize_rows(spec, pairs_rows(2), paired=True)
    return set(collate(examples, 0, paired=True, with_margins=pair_margins(spec)))
