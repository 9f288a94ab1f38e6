"""alignlib's losses and log-probs against TRL's on the same inputs (TRL is a test-only dependency).

"Ours" is always ``alignlib.losses``; "TRL's" is always a real TRL method, called either on a minimal
stand-in ``self`` (``types.SimpleNamespace`` with just the attributes the method reads) or, where the
loss sits inside ``DPOTrainer._compute_loss``, on a real ``DPOTrainer`` built on the built-in tiny
policy. No TRL formula is re-typed here: every expected value comes out of TRL's code.

What maps to what (TRL 1.16):
  * ORPO odds-ratio term: ours ``lambda_ * or_loss`` == TRL ``-ORPOTrainer.odds_ratio_loss`` with ``beta = lambda_``.
    The SFT term is defined differently (see ``test_orpo_model_level``): ours is the per-example mean NLL of
    the completion; TRL's is one cross-entropy over all prompt *and* completion tokens of the chosen rows.
  * DPO: ours ``dpo_loss(beta)`` == TRL ``loss_type="sigmoid"`` (summed log-probs). TRL 1.16's sigmoid loss
    ignores ``label_smoothing`` (it only feeds "robust", "exo_pair", "aot*"), so conservative DPO is checked
    through its definition: (1 - eps) * TRL-sigmoid on the pair + eps * TRL-sigmoid on the flipped pair.
  * IPO: ours ``ipo_loss(tau)`` on length-averaged log-probs == TRL ``loss_type="ipo"`` with ``beta = tau``,
    which averages the summed log-ratio over each completion's token count.
  * SimPO: ours ``simpo_loss(beta, gamma)`` == TRL ``CPOTrainer.cpo_loss`` with ``loss_type="simpo"``,
    ``beta = beta`` and ``simpo_gamma = gamma`` (TRL subtracts ``simpo_gamma / beta`` before scaling by beta).
  * Reward model: ours ``reward_loss`` (batch mean) == TRL ``RewardTrainer.compute_loss`` on a stand-in model
    returning the rewards as logits, with the ``margin`` input and ``center_rewards_coefficient``.

The last section holds TRL-free guards for the usual log-prob pitfalls.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

from alignlib.losses import (
    IGNORE_INDEX,
    LOSSES,
    dpo_loss,
    ipo_loss,
    orpo_loss,
    reward_loss,
    sequence_logps,
    simpo_loss,
)

pytestmark = pytest.mark.filterwarnings("ignore:You are importing from 'trl.experimental'")

CPU = torch.device("cpu")
ACCELERATOR = SimpleNamespace(device=CPU)  # all TRL's loss methods read from the accelerator is its device
# Loss level, float32 on both sides (TRL's ORPO casts to float32): same formulas, so float32 rounding only.
TIGHT = {"rtol": 1e-6, "atol": 1e-6}
# Model level: TRL's DPO uses its fused, tiled LM-head kernel, ours the model's logits; same math, other order.
MODEL = {"rtol": 1e-5, "atol": 1e-6}


def trl_module(name: str):
    pytest.importorskip("trl", minversion="1.0")
    import importlib

    return importlib.import_module(name)


def grads(outputs: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(outputs, inputs))


def logps(*shape_values, seed: int, low: float, high: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (low + (high - low) * torch.rand(*shape_values, generator=g)).requires_grad_()


# --------------------------------------------------------------------------- loss level: ORPO, SimPO


@pytest.mark.parametrize("lambda_", [0.1, 1.0])
def test_orpo_odds_ratio_term_matches_trl(lambda_):
    """Ours: orpo_loss(pc, pr, lambda_) = -pc + lambda_ * or_loss. TRL's: ORPOTrainer.odds_ratio_loss with
    beta = lambda_ returns beta * log sigmoid(log odds ratio) (a reward, hence the sign), and its ORPO loss is
    nll - mean(that). Length-averaged log-probs, including values near 0 and near TRL's / our -ln 2 branch point."""
    orpo = trl_module("trl.experimental.orpo.orpo_trainer")
    pc = torch.tensor([-0.05, -0.7, -0.69, -1.3, -3.0, -0.001, -8.0, -2.2], requires_grad=True)
    pr = torch.tensor([-0.4, -0.6, -0.70, -2.5, -1.0, -0.002, -9.0, -0.3], requires_grad=True)
    fake_self = SimpleNamespace(beta=lambda_, accelerator=ACCELERATOR)
    trl_or, trl_chosen_rewards, trl_rejected_rewards, trl_mean_ratio, trl_mean_log_odds = (
        orpo.ORPOTrainer.odds_ratio_loss(fake_self, pc, pr)
    )
    ours = orpo_loss(pc, pr, lambda_=lambda_)

    # The whole per-example loss, with our SFT term -pc (checked against TRL's NLL in test_orpo_model_level).
    expected = -pc - trl_or
    assert_close(ours.losses, expected, **TIGHT)
    assert_close(grads(ours.losses.sum(), [pc, pr]), grads(expected.sum(), [pc, pr]), **TIGHT)
    # Metrics: our per-example or_loss and log odds ratio are TRL's, which logs their batch means.
    assert_close(lambda_ * ours.metrics["or_loss"], -trl_or.detach(), **TIGHT)
    assert_close(ours.metrics["or_loss"].mean(), -trl_mean_ratio.detach(), **TIGHT)
    assert_close(ours.metrics["log_odds_ratio"].mean(), trl_mean_log_odds.detach(), **TIGHT)
    # Log odds grow with log P, so our accuracy (log odds ratio > 0) is TRL's reward accuracy.
    assert_close(ours.metrics["accuracy"], (trl_chosen_rewards > trl_rejected_rewards).float())


def test_orpo_where_we_differ_from_trl_log_p_at_zero():
    """Defined differently on purpose: ours caps log P at -1e-6 (log odds <= ~13.8, finite gradient); TRL's
    odds_ratio_loss does not, so at log P = 0 (a completion the model is certain of) its gradient is NaN."""
    orpo = trl_module("trl.experimental.orpo.orpo_trainer")
    pc, pr = torch.tensor([0.0], requires_grad=True), torch.tensor([-1.0], requires_grad=True)
    trl_or = orpo.ORPOTrainer.odds_ratio_loss(SimpleNamespace(beta=1.0, accelerator=ACCELERATOR), pc, pr)[0]
    assert not torch.isfinite(torch.stack(grads(trl_or.sum(), [pc, pr]))).all()
    ours = orpo_loss(pc, pr, lambda_=1.0).losses.sum()
    assert torch.isfinite(torch.stack(grads(ours, [pc, pr]))).all()


@pytest.mark.parametrize(("beta", "gamma"), [(2.0, 1.0), (2.5, 1.4), (10.0, 3.0)])
def test_simpo_matches_trl_cpo_simpo(beta, gamma):
    """Ours: simpo_loss(beta, gamma). TRL's: CPOTrainer.cpo_loss, loss_type="simpo", simpo_gamma = gamma
    (not gamma / beta: TRL divides by beta itself), no AlphaPO transform, no label smoothing. beta != 1 so a
    gamma mapped the wrong way would fail."""
    cpo = trl_module("trl.experimental.cpo.cpo_trainer")
    pc = logps(16, seed=1, low=-3.0, high=-0.05)
    pr = logps(16, seed=2, low=-3.0, high=-0.05)
    fake_self = SimpleNamespace(
        alpha=0.0, loss_type="simpo", beta=beta, simpo_gamma=gamma, label_smoothing=0.0, accelerator=ACCELERATOR
    )
    trl_losses, trl_chosen_rewards, trl_rejected_rewards = cpo.CPOTrainer.cpo_loss(fake_self, pc, pr)
    ours = simpo_loss(pc, pr, beta=beta, gamma=gamma)
    assert_close(ours.losses, trl_losses, **TIGHT)
    assert_close(grads(ours.losses.sum(), [pc, pr]), grads(trl_losses.sum(), [pc, pr]), **TIGHT)
    assert_close(ours.metrics["reward_chosen"], trl_chosen_rewards, **TIGHT)
    assert_close(ours.metrics["reward_rejected"], trl_rejected_rewards, **TIGHT)


@pytest.mark.parametrize(("margin", "center"), [(False, None), (True, None), (False, 0.01), (True, 0.3)])
def test_reward_matches_trl_reward_trainer(margin, center):
    """Ours: reward_loss(r_c, r_r, margins, c), batch mean. TRL's: RewardTrainer.compute_loss on a stand-in
    self and a stand-in model whose logits are the (2B, 1) rewards, chosen rows first (TRL chunks them so);
    `margin` is TRL's input column of the same name. Value, gradients and TRL's logged accuracy and margin."""
    reward_trainer = trl_module("trl.trainer.reward_trainer")
    chosen = logps(12, seed=12, low=-4.0, high=4.0)
    rejected = logps(12, seed=13, low=-4.0, high=4.0)
    margins = logps(12, seed=14, low=0.0, high=2.0).detach()
    one_process = SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x)  # nothing to gather
    fake_self = SimpleNamespace(
        model=SimpleNamespace(training=True),
        args=SimpleNamespace(center_rewards_coefficient=center),
        accelerator=one_process,
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )

    def model(**_inputs):
        return SimpleNamespace(logits=torch.cat([chosen, rejected]).unsqueeze(-1))

    inputs = {"attention_mask": torch.ones(24, 3, dtype=torch.long)}
    if margin:
        inputs["margin"] = margins
    trl_loss = reward_trainer.RewardTrainer.compute_loss(fake_self, model, inputs)
    ours = reward_loss(chosen, rejected, margins if margin else None, center).losses.mean()
    assert_close(ours, trl_loss, **TIGHT)
    assert_close(grads(ours, [chosen, rejected]), grads(trl_loss, [chosen, rejected]), **TIGHT)
    figures = reward_loss(chosen, rejected).metrics
    logged = fake_self._metrics["train"]
    assert figures["accuracy"].mean().item() == pytest.approx(logged["accuracy"][-1], abs=1e-6)
    assert figures["reward_margin"].mean().item() == pytest.approx(logged["margin"][-1], rel=1e-6, abs=1e-6)


# --------------------------------------------------------------------------- tiny model, TRL trainers

ROWS = [  # (prompt, chosen, rejected): different prompt and completion lengths, so rows are right-padded
    ("What is 2 + 3?", "5", "The answer is 6"),
    ("how many", "the number is 7 plus 1", "8"),
    ("What is 12 + 19? Answer the question.", "31", "It is 13"),
]


@pytest.fixture(scope="module")
def tiny(model_cache):
    """The built-in tiny policy, a reference copy with perturbed weights (so DPO's log-ratios are not 0),
    its tokenizer, and the ROWS as prompt / chosen / rejected token ids."""
    pytest.importorskip("trl", minversion="1.0")
    from alignlib.models import encode_completion, encode_prompt, load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer("builtin:tiny-policy")
    policy = load_causal_lm("builtin:tiny-policy", dtype="float32")
    ref = copy.deepcopy(policy)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    examples = [
        {
            "prompt_ids": encode_prompt(tokenizer, [{"role": "user", "content": prompt}]),
            "chosen_ids": encode_completion(tokenizer, chosen),
            "rejected_ids": encode_completion(tokenizer, rejected),
        }
        for prompt, chosen, rejected in ROWS
    ]
    return SimpleNamespace(tokenizer=tokenizer, policy=policy, ref=ref, examples=examples)


@pytest.fixture(scope="module")
def make_dpo_trainer(tiny, tmp_path_factory):
    """A real trl.DPOTrainer on fresh copies of the tiny policy / reference, from a DPOConfig (~0.1 s each)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    dataset = Dataset.from_list([{"prompt": "What is 1 + 2?", "chosen": "3", "rejected": "4"}] * 2)
    out = tmp_path_factory.mktemp("dpo-trainer")

    def make(**config):
        args = DPOConfig(output_dir=str(out), report_to="none", use_cpu=True, bf16=False, save_strategy="no", **config)
        return DPOTrainer(
            model=copy.deepcopy(tiny.policy),
            ref_model=copy.deepcopy(tiny.ref),
            args=args,
            train_dataset=dataset,
            processing_class=tiny.tokenizer,
        )

    return make


# --------------------------------------------------------------------------- loss level: DPO, IPO


def _stub_policy(per_token_logps: torch.Tensor):
    """Stands in for a model with TRL's fused LM head: returns the given (2B, T - 1) per-token log-probs
    (zero off the completion, as TRL's head does) and zeros for the logged-only fields."""

    def forward(**_kwargs):
        zeros = torch.zeros_like(per_token_logps.detach())
        return SimpleNamespace(log_probs=per_token_logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    return forward


def _trl_dpo(trainer, per_token_logps, completion_mask, ref_chosen, ref_rejected):
    """TRL's DPOTrainer._compute_loss (batch mean) for these per-token policy log-probs, chosen rows first,
    with the reference's summed log-probs given as precomputed inputs."""
    inputs = {
        "input_ids": torch.zeros_like(completion_mask),
        "attention_mask": torch.ones_like(completion_mask),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    return trainer._compute_loss(_stub_policy(per_token_logps), inputs, return_outputs=False)


def _per_token_batch(batch_size: int, max_len: int, seed: int):
    """(2B, T - 1) per-token log-probs, zero off the completion, and the (2B, T) completion mask: row i has
    a 1-token prompt and a completion of 1..max_len tokens, so lengths differ within and across pairs."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (2 * batch_size,), generator=g)
    completion_mask = torch.zeros(2 * batch_size, max_len + 1, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        completion_mask[i, 1 : 1 + n] = 1
    shift_mask = completion_mask[:, 1:].bool()
    values = -4.0 * torch.rand(2 * batch_size, max_len, generator=g)
    return torch.where(shift_mask, values, torch.zeros_like(values)).requires_grad_(), completion_mask, lengths


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_sigmoid_matches_trl(make_dpo_trainer, beta):
    """Ours: dpo_loss(beta) on summed log-probs, batch mean. TRL's: DPOTrainer loss_type="sigmoid",
    precomputed reference log-probs. Values, gradients w.r.t. every log-prob, and TRL's logged rewards."""
    trainer = make_dpo_trainer(beta=beta, loss_type=["sigmoid"], precompute_ref_log_probs=True)
    per_token, completion_mask, _ = _per_token_batch(batch_size=6, max_len=5, seed=3)
    ref_chosen = logps(6, seed=4, low=-15.0, high=-1.0)
    ref_rejected = logps(6, seed=5, low=-15.0, high=-1.0)
    trl_loss = _trl_dpo(trainer, per_token, completion_mask, ref_chosen, ref_rejected)

    policy_chosen, policy_rejected = per_token.sum(dim=1).chunk(2)
    ours = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=beta)
    inputs = [per_token, ref_chosen, ref_rejected]
    assert_close(ours.losses.mean(), trl_loss, **TIGHT)
    assert_close(grads(ours.losses.mean(), inputs), grads(trl_loss, inputs), **TIGHT)
    logged = trainer._metrics["train" if trainer.model.training else "eval"]
    for ours_name, trl_name in [("reward_chosen", "rewards/chosen"), ("reward_margin", "rewards/margins")]:
        assert ours.metrics[ours_name].mean().item() == pytest.approx(logged[trl_name][-1], rel=1e-6, abs=1e-6)


def test_conservative_dpo_is_the_label_flip_mixture_of_trl_sigmoid(make_dpo_trainer):
    """Ours: dpo_loss(label_smoothing=eps), conservative DPO. TRL 1.16 has no conservative DPO: its "sigmoid"
    loss ignores label_smoothing (asserted, so a TRL change is noticed). By definition, cDPO is the expected
    DPO loss when each label is flipped with probability eps, so it must equal
    (1 - eps) * TRL(pair) + eps * TRL(flipped pair), in value and gradient."""
    eps, beta = 0.2, 0.3
    trainer = make_dpo_trainer(beta=beta, loss_type=["sigmoid"], label_smoothing=eps, precompute_ref_log_probs=True)
    per_token, completion_mask, _ = _per_token_batch(batch_size=5, max_len=4, seed=6)
    ref_chosen = logps(5, seed=7, low=-12.0, high=-1.0)
    ref_rejected = logps(5, seed=8, low=-12.0, high=-1.0)
    chosen_rows, rejected_rows = per_token.chunk(2)
    chosen_mask, rejected_mask = completion_mask.chunk(2)
    trl_pair = _trl_dpo(trainer, per_token, completion_mask, ref_chosen, ref_rejected)
    trl_flipped = _trl_dpo(
        trainer,
        torch.cat([rejected_rows, chosen_rows]),
        torch.cat([rejected_mask, chosen_mask]),
        ref_rejected,
        ref_chosen,
    )
    policy_chosen, policy_rejected = per_token.sum(dim=1).chunk(2)
    plain = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=beta).losses.mean()
    assert_close(trl_pair, plain, **TIGHT)  # TRL's sigmoid: label_smoothing has no effect

    ours = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=beta, label_smoothing=eps)
    expected = (1 - eps) * trl_pair + eps * trl_flipped
    inputs = [per_token, ref_chosen, ref_rejected]
    assert_close(ours.losses.mean(), expected, **TIGHT)
    assert_close(grads(ours.losses.mean(), inputs), grads(expected, inputs), **TIGHT)
    assert not torch.isclose(ours.losses.mean(), plain)  # eps really changes our loss


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_ipo_matches_trl(make_dpo_trainer, tau):
    """Ours: ipo_loss(tau) on length-averaged log-probs (LOSSES["ipo"].average_logps). TRL's: DPOTrainer
    loss_type="ipo", beta = tau, which sums per-token log-ratios and divides by the completion's token count.
    Completions of 1..6 tokens, so the averaging is exercised; reference sums are precomputed inputs."""
    assert LOSSES["ipo"].average_logps
    trainer = make_dpo_trainer(beta=tau, loss_type=["ipo"], precompute_ref_log_probs=True)
    per_token, completion_mask, lengths = _per_token_batch(batch_size=6, max_len=6, seed=9)
    ref_chosen = logps(6, seed=10, low=-12.0, high=-1.0)
    ref_rejected = logps(6, seed=11, low=-12.0, high=-1.0)
    trl_loss = _trl_dpo(trainer, per_token, completion_mask, ref_chosen, ref_rejected)

    average = per_token.sum(dim=1) / lengths  # mean over each completion's tokens
    chosen_len, rejected_len = lengths.chunk(2)
    policy_chosen, policy_rejected = average.chunk(2)
    ours = ipo_loss(policy_chosen, policy_rejected, ref_chosen / chosen_len, ref_rejected / rejected_len, tau=tau)
    inputs = [per_token, ref_chosen, ref_rejected]
    assert_close(ours.losses.mean(), trl_loss, **TIGHT)
    assert_close(grads(ours.losses.mean(), inputs), grads(trl_loss, inputs), **TIGHT)


# --------------------------------------------------------------------------- model level


def _collated(tiny):
    from alignlib.train.data import collate

    return collate(tiny.examples, pad_id=tiny.tokenizer.pad_token_id, paired=True)


def test_collate_matches_trl_preference_collator(tiny):
    """Ours: alignlib.train.data.collate. TRL's: DataCollatorForPreference. Same layout (chosen rows then
    rejected rows, right padding), and our labels are TRL's input_ids masked outside its completion_mask."""
    dpo = trl_module("trl.trainer.dpo_trainer")
    trl_examples = [dict(e) for e in tiny.examples]  # the same column names as TRL's tokenized datasets
    theirs = dpo.DataCollatorForPreference(pad_token_id=tiny.tokenizer.pad_token_id)(trl_examples)
    ours = _collated(tiny)
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])
    assert torch.equal(ours["labels"], theirs["input_ids"].masked_fill(theirs["completion_mask"] == 0, IGNORE_INDEX))
    assert (ours["attention_mask"] == 0).any()  # the batch really is padded


def test_sequence_logps_matches_trl_get_batch_logps(tiny):
    """Ours: sequence_logps (sum and mean). TRL's: ORPOTrainer.get_batch_logps, on the tiny policy's logits
    for the padded batch."""
    orpo = trl_module("trl.experimental.orpo.orpo_trainer")
    batch = _collated(tiny)
    with torch.no_grad():
        logits = tiny.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    for average in (False, True):
        theirs = orpo.ORPOTrainer.get_batch_logps(logits, batch["labels"], average_log_prob=average)
        assert_close(sequence_logps(logits, batch["labels"], average=average), theirs, **TIGHT)


@pytest.mark.parametrize(("name", "loss_type", "knob"), [("dpo", "sigmoid", 0.1), ("ipo", "ipo", 0.5)])
def test_dpo_ipo_model_level_match_trl(make_dpo_trainer, tiny, name, loss_type, knob):
    """Ours: policy and reference logits -> sequence_logps (summed for DPO, averaged for IPO, as the LOSSES
    flags say) -> dpo_loss / ipo_loss, batch mean. TRL's: DPOTrainer.compute_loss on the same token ids,
    with its fused LM head and a live reference model. Loss value and the gradient of every policy parameter."""
    trainer = make_dpo_trainer(beta=knob, loss_type=[loss_type])
    model, ref = trainer.model, trainer.ref_model
    batch = _collated(tiny)
    labels = batch.pop("labels")
    trl_inputs = {**batch, "completion_mask": (labels != IGNORE_INDEX).long()}
    params = [p for p in model.parameters() if p.requires_grad]

    trl_loss = trainer.compute_loss(model, trl_inputs)
    trl_grads = grads(trl_loss, params)

    loss = LOSSES[name]
    policy_logps = sequence_logps(model(**batch).logits, labels, average=loss.average_logps)
    with torch.no_grad():
        ref_logps = sequence_logps(ref(**batch).logits, labels, average=loss.average_logps)
    pc, pr = policy_logps.chunk(2)
    rc, rr = ref_logps.chunk(2)
    knob_name = "tau" if name == "ipo" else "beta"
    ours = loss.fn(
        policy_chosen_logps=pc,
        policy_rejected_logps=pr,
        ref_chosen_logps=rc,
        ref_rejected_logps=rr,
        **{knob_name: knob},
    ).losses.mean()
    assert abs((pc - rc) - (pr - rr)).min() > 1e-3  # the perturbed reference makes the loss non-trivial
    assert_close(ours, trl_loss, **MODEL)
    ours_grads = grads(ours, params)
    scale = max(g.abs().max() for g in trl_grads)
    assert scale > 0
    for a, b in zip(ours_grads, trl_grads, strict=True):
        assert_close(a, b, rtol=MODEL["rtol"], atol=MODEL["rtol"] * scale)


def test_orpo_model_level(tiny):
    """TRL's ORPOTrainer.concatenated_forward (on a stand-in self) and odds_ratio_loss vs ours on the tiny policy.

    Same definition: the length-averaged completion log-probs, and the odds-ratio term (value and gradient of
    every policy parameter). Different definition, asserted so a silent change on either side is caught:
    our SFT term is mean over examples of -(mean completion-token log-prob); TRL's NLL is one cross-entropy
    over every non-padding token of the chosen rows, prompt included, averaged over the batch's tokens."""
    orpo = trl_module("trl.experimental.orpo.orpo_trainer")
    lambda_ = 0.25
    model = copy.deepcopy(tiny.policy)
    params = list(model.parameters())
    batch = _collated(tiny)
    labels = batch["labels"]
    trl_batch = {}
    for side, half in zip(("chosen", "rejected"), (0, 1), strict=True):
        for key, value in [("input_ids", batch["input_ids"]), ("attention_mask", batch["attention_mask"])]:
            trl_batch[f"{side}_{key}"] = value.chunk(2)[half]
        trl_batch[f"{side}_labels"] = labels.chunk(2)[half]
    fake_self = SimpleNamespace(
        concatenated_inputs=orpo.ORPOTrainer.concatenated_inputs,
        get_batch_logps=orpo.ORPOTrainer.get_batch_logps,
        is_encoder_decoder=False,
        padding_value=tiny.tokenizer.pad_token_id,
        aux_loss_enabled=False,
        accelerator=ACCELERATOR,
        beta=lambda_,
    )
    trl_chosen, trl_rejected, _, _, trl_nll = orpo.ORPOTrainer.concatenated_forward(fake_self, model, trl_batch)
    trl_or = orpo.ORPOTrainer.odds_ratio_loss(fake_self, trl_chosen, trl_rejected)[0]

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    pc, pr = sequence_logps(logits, labels, average=True).chunk(2)
    assert_close(pc, trl_chosen, **TIGHT)
    assert_close(pr, trl_rejected, **TIGHT)

    ours = orpo_loss(pc, pr, lambda_=lambda_)
    ours_or = (ours.losses + pc).mean()  # our loss minus our SFT term -pc: lambda_ * mean odds-ratio loss
    assert_close(ours_or, -trl_or.mean(), **TIGHT)
    for a, b in zip(grads(ours_or, params), grads(-trl_or.mean(), params), strict=True):
        assert_close(a, b, **MODEL)

    # The NLL terms differ. TRL's equals the token-weighted NLL of prompt + completion of the chosen rows ...
    full_labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX).chunk(2)[0]
    chosen_logits = logits.chunk(2)[0]
    n_scored = (full_labels[:, 1:] != IGNORE_INDEX).sum()
    assert_close(trl_nll, -sequence_logps(chosen_logits, full_labels).sum() / n_scored, **TIGHT)
    # ... which is not ours, the example-weighted NLL of the completions only (5.892 vs 5.880 here: the tiny
    # policy is near-uniform, so the gap is small, but ~1000x the tolerance).
    assert abs(trl_nll.item() - ours.metrics["sft_loss"].mean().item()) > 1e-3


# --------------------------------------------------------------------------- pitfall guards (no TRL)


def test_label_shift_logit_t_scores_token_t_plus_1():
    """V = 4, labels [0, 1, 2, 3]. Each position t puts logit 10 on token t + 1 and -10 elsewhere, so correctly
    shifted every scored token has log p = -log(1 + 3e-20) ~ 0; scored without the shift (logit t vs label t)
    each would cost ~ -20. Scored positions: labels 1..3, by logits 0..2."""
    labels = torch.tensor([[0, 1, 2, 3]])
    logits = torch.full((1, 4, 4), -10.0)
    for pos in range(3):
        logits[0, pos, pos + 1] = 10.0
    logits[0, 3, 0] = 10.0  # the last position predicts past the end and must not count
    expected = -3 * math.log1p(3 * math.exp(-20.0))
    assert sequence_logps(logits, labels).item() == pytest.approx(expected, abs=1e-6)
    assert sequence_logps(logits, labels, average=True).item() == pytest.approx(expected / 3, abs=1e-6)


def test_eos_stays_labelled_when_pad_is_eos():
    """With pad_token_id == eos_token_id, padding must still be masked by position, not by token id: every
    completion's final EOS is labelled, every pad position is not."""
    from alignlib.train.data import collate

    eos = 7
    examples = [
        {"prompt_ids": [1, 2, 3], "chosen_ids": [4, eos], "rejected_ids": [5, 6, 6, eos]},
        {"prompt_ids": [1], "chosen_ids": [4, 4, 4, eos], "rejected_ids": [eos]},
    ]
    batch = collate(examples, pad_id=eos, paired=True)
    rows = [(e["prompt_ids"], e[k]) for k in ("chosen_ids", "rejected_ids") for e in examples]
    for i, (prompt, completion) in enumerate(rows):
        n = len(prompt) + len(completion)
        assert batch["labels"][i, :n].tolist() == [IGNORE_INDEX] * len(prompt) + completion
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
    assert (batch["input_ids"] == eos).sum() > (batch["labels"] == eos).sum()  # some eos are really padding


def test_long_prompt_is_cut_from_the_left_and_keeps_the_response(model_cache):
    """encode_rows over max_length: the prompt loses its start, the completions (with EOS) stay whole."""
    from alignlib import schema as S
    from alignlib.models import encode_completion, encode_prompt, load_tokenizer
    from alignlib.train.data import encode_rows

    tokenizer = load_tokenizer("builtin:tiny-policy")
    messages = [{"role": "user", "content": " ".join(f"What is {i} + {i}?" for i in range(40))}]
    row = {S.MESSAGES: messages, S.CHOSEN: "the answer is 12", S.REJECTED: "13"}
    full_prompt = encode_prompt(tokenizer, messages)
    chosen, rejected = encode_completion(tokenizer, row[S.CHOSEN]), encode_completion(tokenizer, row[S.REJECTED])
    max_length = 24
    assert len(full_prompt) > max_length
    (example,) = encode_rows(tokenizer, [row], paired=True, max_length=max_length)
    assert example["chosen_ids"] == chosen and example["chosen_ids"][-1] == tokenizer.eos_token_id
    assert example["rejected_ids"] == rejected
    assert example["prompt_ids"] == full_prompt[-(max_length - len(chosen)) :]  # the prompt's end survives
    assert len(example["prompt_ids"]) + max(len(chosen), len(rejected)) == max_length


def test_bf16_logits_get_fp32_log_softmax():
    """sequence_logps on bf16 logits must equal the float32 computation on the same (bf16-exact) values; a
    log-softmax taken in bf16 is visibly off over a 64-token sequence, so the check has teeth."""
    g = torch.Generator().manual_seed(0)
    logits = (8.0 * torch.randn(2, 65, 384, generator=g)).to(torch.bfloat16)
    labels = torch.randint(0, 384, (2, 65), generator=g)
    labels[1, :20] = IGNORE_INDEX
    ours = sequence_logps(logits, labels)
    fp32 = sequence_logps(logits.float(), labels)
    assert ours.dtype == torch.float32
    assert_close(ours, fp32, rtol=0, atol=1e-5)
    in_bf16 = torch.gather(logits.log_softmax(-1)[:, :-1], -1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    in_bf16 = torch.where(labels[:, 1:] != IGNORE_INDEX, in_bf16.float(), 0.0).sum(-1)
    assert (in_bf16 - fp32).abs().max() > 1e-2
