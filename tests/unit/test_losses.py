"""Unit tests for alignlib.losses: hand-computed values, limit cases and gradients."""

import inspect
import math

import pytest
import torch
from torch.testing import assert_close

from alignlib.losses import (
    IGNORE_INDEX,
    LOSSES,
    LossOutput,
    dpo_loss,
    get_loss,
    ipo_loss,
    orpo_loss,
    reward_loss,
    sequence_logps,
    sft_loss,
    simpo_loss,
)


def t(*values, grad=False):
    return torch.tensor(values, dtype=torch.float32, requires_grad=grad)


# --------------------------------------------------------------------------- sequence_logps


def _hand_logits():
    """(1, 3, 3) logits: position 0 uniform, position 1 softmax = [1/4, 1/2, 1/4],
    position 2 extreme (it predicts nothing, so it must never be read)."""
    return torch.tensor([[[0.0, 0.0, 0.0], [0.0, math.log(2.0), 0.0], [100.0, -100.0, 0.0]]])


def test_sequence_logps_hand_values():
    """labels [2, 0, 1]: logits[0] scores label 0 -> log(1/3); logits[1] scores label 1 -> log(1/2).
    sum = -log 6, mean = -log(6) / 2."""
    logits, labels = _hand_logits(), torch.tensor([[2, 0, 1]])
    assert_close(sequence_logps(logits, labels), t(-math.log(6.0)))
    assert_close(sequence_logps(logits, labels, average=True), t(-math.log(6.0) / 2))


def test_sequence_logps_first_label_never_scored():
    """labels[:, 0] has no preceding logits; changing or ignoring it must not change the result."""
    logits = _hand_logits()
    expected = sequence_logps(logits, torch.tensor([[2, 0, 1]]))
    for first in (0, 1, IGNORE_INDEX):
        assert_close(sequence_logps(logits, torch.tensor([[first, 0, 1]])), expected)


def test_sequence_logps_ignored_positions_do_not_count():
    """Uniform logits over V=4: every scored token has logp -log 4.
    Row 0 scores 3 tokens: sum -3 log 4, mean -log 4. Row 1 scores 1 token: sum = mean = -log 4."""
    logits = torch.zeros(2, 4, 4)
    labels = torch.tensor([[1, 2, 3, 0], [IGNORE_INDEX, IGNORE_INDEX, 1, IGNORE_INDEX]])
    log4 = math.log(4.0)
    assert_close(sequence_logps(logits, labels), t(-3 * log4, -log4))
    assert_close(sequence_logps(logits, labels, average=True), t(-log4, -log4))


def test_sequence_logps_all_ignored_row_is_zero_not_nan():
    """A row with no labelled tokens: sum 0, mean 0 / max(0, 1) = 0."""
    logits = torch.randn(2, 3, 5)
    labels = torch.tensor([[IGNORE_INDEX] * 3, [0, 1, 2]])
    for average in (False, True):
        out = sequence_logps(logits, labels, average=average)
        assert out[0].item() == 0.0
        assert torch.isfinite(out).all()


def test_sequence_logps_bf16_gives_float32():
    """bf16 zeros are exact, so the float32 result must be exactly -log V per token (V=8)."""
    logits = torch.zeros(2, 5, 8, dtype=torch.bfloat16)
    labels = torch.tensor([[0, 1, 2, 3, 4], [IGNORE_INDEX, IGNORE_INDEX, 5, 6, 7]])
    out = sequence_logps(logits, labels)
    assert out.dtype == torch.float32
    assert_close(out, t(-4 * math.log(8.0), -3 * math.log(8.0)))
    out = sequence_logps(logits, labels, average=True)
    assert out.dtype == torch.float32
    assert_close(out, t(-math.log(8.0), -math.log(8.0)))


def test_sequence_logps_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="labels"):
        sequence_logps(torch.zeros(2, 4, 3), torch.zeros(2, 5, dtype=torch.long))


# --------------------------------------------------------------------------- DPO


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
def test_dpo_policy_equals_reference_gives_log2(label_smoothing):
    """h = 0: -(1 - ls) log sigmoid(0) - ls log sigmoid(0) = log 2 for any ls."""
    logps = t(-12.0, -3.5)
    out = dpo_loss(logps, logps - 1, logps, logps - 1, beta=0.3, label_smoothing=label_smoothing)
    assert_close(out.losses, t(math.log(2.0), math.log(2.0)))
    assert_close(out.metrics["reward_margin"], t(0.0, 0.0))


def test_dpo_hand_value_and_rewards():
    """pc=-10, rc=-12, pr=-15, rr=-14, beta=0.5: h = 2 - (-1) = 3, beta*h = 1.5,
    loss = -log sigmoid(1.5) = log(1 + e^-1.5). Rewards: 0.5*2 = 1, 0.5*(-1) = -0.5, margin 1.5."""
    out = dpo_loss(t(-10.0), t(-15.0), t(-12.0), t(-14.0), beta=0.5)
    assert_close(out.losses, t(math.log1p(math.exp(-1.5))))
    assert_close(out.metrics["reward_chosen"], t(1.0))
    assert_close(out.metrics["reward_rejected"], t(-0.5))
    assert_close(out.metrics["reward_margin"], t(1.5))
    assert_close(out.metrics["accuracy"], t(1.0))


def test_dpo_label_smoothing_hand_value():
    """Same inputs (beta*h = 1.5), ls = 0.2:
    loss = 0.8 * log(1 + e^-1.5) + 0.2 * log(1 + e^1.5)."""
    out = dpo_loss(t(-10.0), t(-15.0), t(-12.0), t(-14.0), beta=0.5, label_smoothing=0.2)
    expected = 0.8 * math.log1p(math.exp(-1.5)) + 0.2 * math.log1p(math.exp(1.5))
    assert_close(out.losses, t(expected))


def test_dpo_gradient_direction():
    """dL/dpc = -beta * sigmoid(-beta*h) < 0 and dL/dpr = +beta * sigmoid(-beta*h) > 0;
    at beta*h = 1.5, beta = 0.5 that is -/+ 0.5 / (1 + e^1.5)."""
    pc, pr = t(-10.0, grad=True), t(-15.0, grad=True)
    dpo_loss(pc, pr, t(-12.0), t(-14.0), beta=0.5).losses.sum().backward()
    g = 0.5 / (1.0 + math.exp(1.5))
    assert pc.grad.item() < 0 < pr.grad.item()
    assert_close(pc.grad, t(-g))
    assert_close(pr.grad, t(g))


def test_dpo_accuracy_metric():
    """Rows: chosen ratio above rejected -> 1; below -> 0; tie -> 0 (strictly greater)."""
    zeros = t(0.0, 0.0, 0.0)
    out = dpo_loss(t(1.0, -1.0, 0.5), t(0.0, 0.0, 0.5), zeros, zeros)
    assert_close(out.metrics["accuracy"], t(1.0, 0.0, 0.0))


# --------------------------------------------------------------------------- IPO


def test_ipo_policy_equals_reference():
    """h = 0: loss = (0 - 1/(2*0.1))**2 = 25."""
    logps = t(-1.2, -0.4)
    out = ipo_loss(logps, logps - 0.3, logps, logps - 0.3, tau=0.1)
    assert_close(out.losses, t(25.0, 25.0))


def test_ipo_zero_loss_at_target_margin():
    """tau = 0.25, target 1/(2 tau) = 2: pc - rc = 1.5, pr - rr = -0.5 -> h = 2 -> loss 0.
    Rewards tau*(p - r): 0.375 and -0.125, margin 0.5 (= tau * target, for any tau)."""
    out = ipo_loss(t(-0.5), t(-1.5), t(-2.0), t(-1.0), tau=0.25)
    assert_close(out.losses, t(0.0))
    assert_close(out.metrics["reward_chosen"], t(0.375))
    assert_close(out.metrics["reward_rejected"], t(-0.125))
    assert_close(out.metrics["reward_margin"], t(0.5))
    assert_close(out.metrics["accuracy"], t(1.0))


def test_ipo_hand_value():
    """tau = 0.5, target 1: h = (-1 - -3) - (-2 - -1) = 2 + 1 = 3 -> loss (3 - 1)**2 = 4."""
    out = ipo_loss(t(-1.0), t(-2.0), t(-3.0), t(-1.0), tau=0.5)
    assert_close(out.losses, t(4.0))


@pytest.mark.parametrize("h, sign", [(0.0, -1.0), (10.0, 1.0)])
def test_ipo_gradient_sign(h, sign):
    """dL/dpc = 2 (h - target) = -dL/dpr. Below the target (h=0 < 2) the chosen log-prob is
    pushed up; above it (h=10) IPO, unlike DPO, pulls the margin back down."""
    pc, pr = t(h, grad=True), t(0.0, grad=True)
    ipo_loss(pc, pr, t(0.0), t(0.0), tau=0.25).losses.sum().backward()
    assert_close(pc.grad, t(sign * 2 * abs(h - 2.0)))
    assert_close(pr.grad, -pc.grad)


# --------------------------------------------------------------------------- ORPO


def _log_odds(logp):
    p = math.exp(logp)
    return math.log(p) - math.log1p(-p)


@pytest.mark.parametrize(
    "chosen, rejected",
    # Both sides of the log1mexp branch switch at -log 2, and one near P = 1.
    [(-0.5, -1.5), (-0.69, -0.70), (-1e-4, -3.0)],
)
def test_orpo_hand_value(chosen, rejected):
    """log odds(x) = log P - log(1 - P), P = e^x; r = log odds(c) - log odds(r);
    loss = -c + 0.1 * log(1 + e^-r)."""
    r = _log_odds(chosen) - _log_odds(rejected)
    or_loss = math.log1p(math.exp(-r))
    out = orpo_loss(t(chosen), t(rejected), lambda_=0.1)
    assert_close(out.losses, t(-chosen + 0.1 * or_loss))
    assert_close(out.metrics["sft_loss"], t(-chosen))
    assert_close(out.metrics["or_loss"], t(or_loss))
    assert_close(out.metrics["log_odds_ratio"], t(r))
    assert_close(out.metrics["accuracy"], t(1.0))


def test_orpo_finite_at_extremes():
    """P -> 1 (logp -1e-9 or exactly 0) makes 1 - P vanish; logp -50 makes P underflow.
    Loss, metrics and gradients must all stay finite."""
    chosen = t(-1e-9, 0.0, -50.0, 0.0, -1e-9, grad=True)
    rejected = t(-50.0, -1e-9, 0.0, 0.0, -1e-9, grad=True)
    out = orpo_loss(chosen, rejected, lambda_=1.0)
    out.losses.sum().backward()
    for value in (out.losses, *out.metrics.values(), chosen.grad, rejected.grad):
        assert torch.isfinite(value).all(), value
    # Equal log-probs give equal odds: log odds ratio 0, OR loss log 2.
    assert_close(out.metrics["or_loss"][3:], t(math.log(2.0), math.log(2.0)))
    # Near-certain chosen vs. near-impossible rejected is correctly ordered, and the reverse.
    assert out.metrics["log_odds_ratio"][0] > 0 > out.metrics["log_odds_ratio"][2]


def test_orpo_gradient_direction():
    """Descending the loss raises the chosen log-prob and lowers the rejected one."""
    chosen, rejected = t(-0.8, -2.0, grad=True), t(-1.1, -0.3, grad=True)
    orpo_loss(chosen, rejected, lambda_=0.5).losses.sum().backward()
    assert (chosen.grad < 0).all()
    assert (rejected.grad > 0).all()


def test_orpo_lambda_zero_is_sft():
    """lambda_ = 0: L = -chosen, identical to sft_loss, and the rejected side gets no gradient."""
    chosen, rejected = t(-0.8, -2.0), t(-1.1, -0.3, grad=True)
    out = orpo_loss(chosen, rejected, lambda_=0.0)
    assert_close(out.losses, sft_loss(chosen).losses)
    out.losses.sum().backward()
    assert_close(rejected.grad, t(0.0, 0.0))


# --------------------------------------------------------------------------- SFT


def test_sft_value_and_gradient():
    """L = -logp per example, so dL/dlogp = -1 (descent raises the log-prob)."""
    logps = t(-1.0, -2.5, grad=True)
    out = sft_loss(logps)
    assert_close(out.losses, t(1.0, 2.5))
    assert_close(out.metrics["sft_loss"], t(1.0, 2.5))
    out.losses.sum().backward()
    assert_close(logps.grad, t(-1.0, -1.0))


# --------------------------------------------------------------------------- registry

KNOBS = {
    "sft": {},
    "orpo": {"lambda_": 0.2},
    "dpo": {"beta": 0.2, "label_smoothing": 0.1},
    "ipo": {"tau": 0.2},
    "simpo": {"beta": 2.5, "gamma": 0.5},
}


@pytest.mark.parametrize(
    "name, fn, paired, needs_reference, average_logps",
    [
        ("sft", sft_loss, False, False, True),
        ("orpo", orpo_loss, True, False, True),
        ("dpo", dpo_loss, True, True, False),
        ("ipo", ipo_loss, True, True, True),
        ("simpo", simpo_loss, True, False, True),
    ],
)
def test_get_loss_flags(name, fn, paired, needs_reference, average_logps):
    loss = get_loss(name)
    assert loss.name == name and loss.fn is fn
    assert (loss.paired, loss.needs_reference, loss.average_logps) == (
        paired,
        needs_reference,
        average_logps,
    )
    assert not loss.reward_head  # these read the LM's log-probs


def test_registry_has_exactly_the_six_losses():
    assert set(LOSSES) == {"sft", "orpo", "dpo", "ipo", "simpo", "reward"}


def test_get_loss_unknown_name():
    with pytest.raises(ValueError, match=r"'kto'.*dpo, ipo, orpo, reward, sft, simpo"):
        get_loss("kto")


@pytest.mark.parametrize("name", sorted(KNOBS))
def test_signature_matches_flags(name):
    """The loop passes exactly these keyword names, chosen from the flags."""
    loss = get_loss(name)
    expected = ["policy_chosen_logps"]
    if loss.paired:
        expected.append("policy_rejected_logps")
    if loss.needs_reference:
        expected += ["ref_chosen_logps", "ref_rejected_logps"]
    expected += list(KNOBS[name])
    assert list(inspect.signature(loss.fn).parameters) == expected


@pytest.mark.parametrize(
    "fn, kwargs",
    [
        (dpo_loss, {"beta": 0.0}),
        (dpo_loss, {"label_smoothing": 0.5}),
        (ipo_loss, {"tau": -1.0}),
        (orpo_loss, {"lambda_": -0.1}),
        (simpo_loss, {"beta": 0.0}),
        (simpo_loss, {"gamma": -1.0}),
    ],
)
def test_invalid_knobs_raise(fn, kwargs):
    n = sum(name.endswith("_logps") for name in inspect.signature(fn).parameters)
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        fn(*[t(-1.0)] * n, **kwargs)


# --------------------------------------------------------------------------- simpo


def test_simpo_hand_value():
    """beta 2, gamma 1, averaged log-probs -0.5 vs -1.0: margin 2 * 0.5 - 1 = 0 -> loss log 2."""
    out = simpo_loss(t(-0.5), t(-1.0), beta=2.0, gamma=1.0)
    assert_close(out.losses, t(math.log(2.0)))
    assert_close(out.metrics["reward_chosen"], t(-1.0))
    assert_close(out.metrics["reward_margin"], t(1.0))


def test_simpo_gamma_demands_a_margin():
    """Equal log-probs: gamma 0 gives log 2; a positive gamma makes the same pair cost more."""
    assert_close(simpo_loss(t(-1.0), t(-1.0), gamma=0.0).losses, t(math.log(2.0)))
    assert simpo_loss(t(-1.0), t(-1.0), gamma=1.0).losses.item() > math.log(2.0)


def test_simpo_gradient_direction():
    chosen, rejected = t(-1.0, grad=True), t(-1.0, grad=True)
    simpo_loss(chosen, rejected).losses.sum().backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()


# --------------------------------------------------------------------------- invariants


def _call(loss, batch, **knobs):
    """Call a registry entry the way the training loop does: only the arguments it accepts."""
    kwargs = {"policy_chosen_logps": batch[0]}
    if loss.paired:
        kwargs["policy_rejected_logps"] = batch[1]
    if loss.needs_reference:
        kwargs.update(ref_chosen_logps=batch[2], ref_rejected_logps=batch[3])
    return loss.fn(**kwargs, **knobs)


def _random_batch(loss, size=8):
    gen = torch.Generator().manual_seed(0)
    # Averaged log-probs live in (-3, 0); summed ones are much larger in magnitude.
    scale = 3.0 if loss.average_logps else 60.0
    return [-scale * torch.rand(size, generator=gen) for _ in range(4)]


@pytest.mark.parametrize("name", sorted(KNOBS))
def test_output_contract(name):
    """Every loss returns (B,) losses and (B,) detached metrics."""
    loss = get_loss(name)
    batch = [x.requires_grad_() for x in _random_batch(loss)]
    out = _call(loss, batch, **KNOBS[name])
    assert isinstance(out, LossOutput)
    assert out.losses.shape == (8,) and out.losses.dtype == torch.float32
    assert out.losses.requires_grad
    assert out.metrics
    for metric in out.metrics.values():
        assert metric.shape == (8,) and not metric.requires_grad


@pytest.mark.parametrize("name", ["orpo", "dpo", "ipo", "simpo"])
def test_batch_mean_equals_mean_of_single_calls(name):
    """Losses are per-example: batching 8 examples gives the same mean (and the same
    per-example values) as 8 separate calls."""
    loss = get_loss(name)
    batch = _random_batch(loss)
    batched = _call(loss, batch, **KNOBS[name]).losses
    singles = torch.cat([_call(loss, [x[i : i + 1] for x in batch], **KNOBS[name]).losses for i in range(8)])
    assert_close(batched.mean(), singles.mean())
    assert_close(batched, singles)


def test_spec_knows_which_losses_need_a_reference_and_pairs():
    """The spec refuses `precompute_reference` for reference-free losses and the stages pick the pairs or the
    SFT table without importing torch; its tables must say the same as the registry."""
    from alignlib.spec import LOSSES_NEEDING_PAIRS, LOSSES_NEEDING_REFERENCE

    assert LOSSES_NEEDING_REFERENCE == {name: loss.needs_reference for name, loss in LOSSES.items()}
    assert LOSSES_NEEDING_PAIRS == {name: loss.paired for name, loss in LOSSES.items()}


# --------------------------------------------------------------------------- reward model


def test_reward_flags_and_signature():
    """A paired loss of a score head's rewards: no reference, no log-probs; the loop passes these names."""
    loss = get_loss("reward")
    assert loss.fn is reward_loss and loss.reward_head and loss.paired and not loss.needs_reference
    assert list(inspect.signature(reward_loss).parameters) == [
        "chosen_rewards",
        "rejected_rewards",
        "margins",
        "center_rewards_coefficient",
    ]


def test_reward_hand_values():
    """r_c - r_r = 0 -> log 2; = ln 3 -> -log(3/4) = log(4/3); = -ln 3 -> log 4. Accuracy counts r_c > r_r
    strictly (a tie is not a win)."""
    chosen, rejected = t(1.0, math.log(3.0), 0.0), t(1.0, 0.0, math.log(3.0))
    out = reward_loss(chosen, rejected)
    assert_close(out.losses, t(math.log(2.0), math.log(4.0 / 3.0), math.log(4.0)))
    assert_close(out.metrics["accuracy"], t(0.0, 1.0, 0.0))
    assert_close(out.metrics["reward_margin"], t(0.0, math.log(3.0), -math.log(3.0)))
    assert_close(out.metrics["reward_chosen"], chosen)


def test_reward_margin_hand_value():
    """Margin m is subtracted inside the sigmoid: r_c - r_r = 2, m = 2 -> log 2 (as if tied); m = 0 is plain BT;
    a larger margin costs more for the same rewards."""
    chosen, rejected = t(3.0, 3.0), t(1.0, 1.0)
    assert_close(reward_loss(chosen, rejected, margins=t(2.0, 0.0)).losses[0], torch.tensor(math.log(2.0)))
    assert_close(reward_loss(chosen, rejected, margins=t(0.0, 0.0)).losses, reward_loss(chosen, rejected).losses)
    assert reward_loss(chosen, rejected, margins=t(3.0, 3.0)).losses[0] > reward_loss(chosen, rejected).losses[0]
    # The metrics are the model's rewards, never shifted by the margin.
    assert_close(reward_loss(chosen, rejected, margins=t(2.0, 0.0)).metrics["reward_margin"], t(2.0, 2.0))


def test_reward_centring_hand_value():
    """c (r_c + r_r)^2 added: r = (2, 0), c = 0.01 -> -log sigmoid(2) + 0.04; rewards summing to 0 pay nothing."""
    out = reward_loss(t(2.0, 1.0), t(0.0, -1.0), center_rewards_coefficient=0.01)
    expected = t(-math.log(1.0 / (1.0 + math.exp(-2.0))) + 0.04, -math.log(1.0 / (1.0 + math.exp(-2.0))))
    assert_close(out.losses, expected)


def test_reward_limits_are_finite():
    """A pair ranked right by 1000 costs ~0, ranked wrong by 1000 costs ~1000; no overflow to inf or NaN."""
    out = reward_loss(t(500.0, -500.0), t(-500.0, 500.0))
    assert_close(out.losses, t(0.0, 1000.0))
    assert torch.isfinite(out.losses).all()


def test_reward_gradient():
    """dL/dr_c = -sigmoid(-(r_c - r_r)) = -dL/dr_r (1/2 at a tie: descent pushes them apart), plus 2c(r_c + r_r)
    on both sides with centring."""
    chosen, rejected = t(0.5, grad=True), t(0.5, grad=True)
    reward_loss(chosen, rejected).losses.sum().backward()
    assert_close(chosen.grad, t(-0.5))
    assert_close(rejected.grad, t(0.5))
    chosen, rejected = t(0.5, grad=True), t(0.5, grad=True)
    reward_loss(chosen, rejected, center_rewards_coefficient=0.1).losses.sum().backward()
    assert_close(chosen.grad, t(-0.5 + 0.2))
    assert_close(rejected.grad, t(0.5 + 0.2))


def test_reward_output_contract_and_batching():
    """(B,) float32 losses with a graph, (B,) detached metrics; 8 pairs at once equal 8 single calls."""
    gen = torch.Generator().manual_seed(0)
    chosen, rejected, margins = (4.0 * torch.randn(8, generator=gen) for _ in range(3))
    knobs = {"margins": margins, "center_rewards_coefficient": 0.05}
    out = reward_loss(chosen.requires_grad_(), rejected, **knobs)
    assert out.losses.shape == (8,) and out.losses.dtype == torch.float32 and out.losses.requires_grad
    assert all(m.shape == (8,) and not m.requires_grad for m in out.metrics.values())
    singles = [reward_loss(chosen[i : i + 1], rejected[i : i + 1], margins[i : i + 1], 0.05).losses for i in range(8)]
    assert_close(out.losses, torch.cat(singles))


def test_reward_refuses_negative_centring():
    with pytest.raises(ValueError, match="center_rewards_coefficient"):
        reward_loss(t(1.0), t(0.0), center_rewards_coefficient=-0.1)
