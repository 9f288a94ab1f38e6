"""Preference-optimisation and SFT losses on sequence log-probabilities, and the reward-model loss.

Each loss is pure math on ``(B,)`` tensors of sequence log-probs (or, for the reward model, of per-sequence
rewards from a one-label score head) and returns per-example losses plus per-example metrics. Getting those
log-probs out of a model is :func:`sequence_logps`'s job; which model outputs a loss needs (a
reference model? length-averaged log-probs? a score head?) is declared on its :class:`Loss`
entry so the training loop can read it instead of special-casing names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

# Largest average log-prob ORPO will feed to log(1 - P). log P == 0 would give
# log(0); capping at -1e-6 bounds the log odds near 13.8 and their slope near 1e6.
_MAX_AVERAGE_LOGP = -1e-6


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Log-probability of each labelled sequence under a causal LM.

    Args:
        logits: ``(B, T, V)`` logits computed over ``input_ids`` of shape ``(B, T)``;
            any float dtype (bf16 is upcast).
        labels: ``(B, T)`` copy of ``input_ids`` with :data:`IGNORE_INDEX` at prompt
            and padding positions. Logits at position ``t`` predict ``labels[:, t + 1]``,
            so ``labels[:, 0]`` is never scored.
        average: return the per-token mean instead of the sum.

    Returns:
        ``(B,)`` float32: ``sum_t log p(labels[t] | <t)`` over labelled positions,
        or that sum divided by the number of labelled positions. A row with no
        labelled positions gives 0 either way.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits (B, T, V) and labels (B, T), got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    logits = logits[:, :-1]
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    # Ignored positions hold -100, which is not a valid index; gather at 0 and mask out.
    safe_labels = torch.where(mask, labels, torch.zeros_like(labels))
    # bf16 log_softmax loses ~2-3 significant digits per token; do it in float32.
    token_logps = torch.gather(logits.float().log_softmax(dim=-1), dim=-1, index=safe_labels.unsqueeze(-1)).squeeze(-1)
    # where, not multiply: a -inf logp at an ignored position times 0 would be NaN.
    total = torch.where(mask, token_logps, torch.zeros_like(token_logps)).sum(dim=-1)
    if not average:
        return total
    return total / mask.sum(dim=-1).clamp(min=1)


def label_counts(labels: torch.Tensor) -> torch.Tensor:
    """``(B,)`` number of positions :func:`sequence_logps` scores in each row of ``labels``."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(dim=-1)


@dataclass(frozen=True)
class LossOutput:
    """Per-example losses and metrics.

    Attributes:
        losses: ``(B,)`` loss of each example; the training loop takes the mean.
        metrics: name -> ``(B,)`` detached per-example value, averaged for logging.
    """

    losses: torch.Tensor
    metrics: dict[str, torch.Tensor]


def _as_float32(x: torch.Tensor) -> torch.Tensor:
    # Promote half precision to float32 but keep float64 (used by gradient checks).
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, shape-preserving.

    Uses ``log(-expm1(x))`` near 0 and ``log1p(-exp(x))`` further out, switching
    at ``-log 2``, the standard split that keeps both branches accurate
    (Maechler 2012, "Accurately computing log(1 - exp(-|a|))").
    """
    near_zero = x > -0.6931471805599453
    return torch.where(near_zero, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def sft_loss(policy_chosen_logps: torch.Tensor) -> LossOutput:
    """Supervised fine-tuning: per-token negative log-likelihood of the completion.

    Args:
        policy_chosen_logps: ``(B,)`` length-averaged log-probs of the target completion.

    Returns:
        ``losses = -policy_chosen_logps``; metric ``"sft_loss"`` (same value, detached).
    """
    losses = -_as_float32(policy_chosen_logps)
    return LossOutput(losses=losses, metrics={"sft_loss": losses.detach()})


def orpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    lambda_: float = 0.1,
) -> LossOutput:
    """Odds-ratio preference optimisation (Hong et al. 2024, "ORPO", eq. 6-7).

    ``L = L_SFT + lambda_ * L_OR`` with ``L_SFT = -log P(y_w)`` and
    ``L_OR = -log sigmoid(log odds(y_w) - log odds(y_l))``, where
    ``odds(y) = P(y) / (1 - P(y))`` and ``log P`` is the length-averaged log-prob,
    so ``log odds = log P - log(1 - exp(log P))``. No reference model is needed.

    Args:
        policy_chosen_logps: ``(B,)`` length-averaged log-probs of the chosen completions.
        policy_rejected_logps: ``(B,)`` length-averaged log-probs of the rejected ones.
        lambda_: weight of the odds-ratio term (``lambda_ = 0`` is plain SFT).

    Returns:
        ``(B,)`` losses; metrics ``"sft_loss"``, ``"or_loss"``, ``"log_odds_ratio"``
        and ``"accuracy"`` (1.0 where the chosen log odds exceed the rejected).
    """
    if lambda_ < 0:
        raise ValueError(f"lambda_ must be >= 0, got {lambda_}")
    chosen = _as_float32(policy_chosen_logps)
    rejected = _as_float32(policy_rejected_logps)

    def log_odds(logps: torch.Tensor) -> torch.Tensor:
        # P -> 1 makes 1 - P vanish; cap log P just below 0 so log(1 - P) stays finite.
        logps = logps.clamp(max=_MAX_AVERAGE_LOGP)
        return logps - _log1mexp(logps)

    log_odds_ratio = log_odds(chosen) - log_odds(rejected)
    or_losses = -F.logsigmoid(log_odds_ratio)
    sft_losses = -chosen
    losses = sft_losses + lambda_ * or_losses
    metrics = {
        "sft_loss": sft_losses.detach(),
        "or_loss": or_losses.detach(),
        "log_odds_ratio": log_odds_ratio.detach(),
        "accuracy": (log_odds_ratio > 0).float().detach(),
    }
    return LossOutput(losses=losses, metrics=metrics)


def _reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    chosen_rewards = chosen_rewards.detach()
    rejected_rewards = rejected_rewards.detach()
    return {
        "reward_chosen": chosen_rewards,
        "reward_rejected": rejected_rewards,
        "reward_margin": chosen_rewards - rejected_rewards,
        "accuracy": (chosen_rewards > rejected_rewards).float(),
    }


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """Direct preference optimisation (Rafailov et al. 2023, eq. 7).

    With ``h = (pc - rc) - (pr - rr)`` on *summed* log-probs,
    ``L = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)``.
    ``eps = label_smoothing > 0`` is conservative DPO: it assumes a fraction
    ``eps`` of the preference labels are flipped, so the loss stops rewarding
    ever-larger margins.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``(B,)`` summed log-probs under the policy.
        ref_chosen_logps, ref_rejected_logps: ``(B,)`` summed log-probs under the frozen reference.
        beta: inverse temperature, the strength of the implicit KL penalty.
        label_smoothing: assumed label-noise rate, in ``[0, 0.5)``.

    Returns:
        ``(B,)`` losses; metrics ``"reward_chosen" = beta * (pc - rc)``,
        ``"reward_rejected" = beta * (pr - rr)``, ``"reward_margin"`` and
        ``"accuracy"`` (1.0 where the chosen reward is higher).
    """
    _check_positive("beta", beta)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_logratios = _as_float32(policy_chosen_logps) - _as_float32(ref_chosen_logps)
    rejected_logratios = _as_float32(policy_rejected_logps) - _as_float32(ref_rejected_logps)
    logits = beta * (chosen_logratios - rejected_logratios)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    metrics = _reward_metrics(beta * chosen_logratios, beta * rejected_logratios)
    return LossOutput(losses=losses, metrics=metrics)


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    tau: float = 0.1,
) -> LossOutput:
    """Identity preference optimisation (Azar et al. 2023, eq. 17).

    ``L = (h - 1 / (2 * tau))**2`` with ``h = (pc - rc) - (pr - rr)`` as in DPO.
    The log-probs are *length-averaged*: IPO regresses ``h`` onto a fixed target
    rather than pushing it to infinity, and with summed log-probs that target
    would mean a per-token margin shrinking with completion length.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``(B,)`` length-averaged policy log-probs.
        ref_chosen_logps, ref_rejected_logps: ``(B,)`` length-averaged reference log-probs.
        tau: regularisation strength; the target margin is ``1 / (2 * tau)``.

    Returns:
        ``(B,)`` losses; metrics ``"reward_chosen" = tau * (pc - rc)``,
        ``"reward_rejected" = tau * (pr - rr)``, ``"reward_margin"`` and
        ``"accuracy"``. ``tau`` plays the role of DPO's ``beta``, so the rewards are
        on the same scale as DPO's, and at the optimum ``reward_margin == 0.5``
        whatever ``tau`` is.
    """
    _check_positive("tau", tau)
    chosen_logratios = _as_float32(policy_chosen_logps) - _as_float32(ref_chosen_logps)
    rejected_logratios = _as_float32(policy_rejected_logps) - _as_float32(ref_rejected_logps)
    logits = chosen_logratios - rejected_logratios
    losses = (logits - 1.0 / (2.0 * tau)) ** 2
    metrics = _reward_metrics(tau * chosen_logratios, tau * rejected_logratios)
    return LossOutput(losses=losses, metrics=metrics)


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    beta: float = 2.0,
    gamma: float = 1.0,
) -> LossOutput:
    """Simple preference optimisation (Meng et al. 2024, "SimPO", eq. 6).

    ``L = -log sigmoid(beta * (pc - pr) - gamma)`` on *length-averaged* policy log-probs: the
    implicit reward ``beta * log P(y) / |y|`` needs no reference model, and averaging per token
    keeps long answers from being preferred for their length alone. ``gamma`` is the target
    reward margin the chosen answer must clear.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``(B,)`` length-averaged policy log-probs.
        beta: reward scale.
        gamma: target reward margin (SimPO's gamma; the paper's gamma/beta ratio is ``gamma / beta``).

    Returns:
        ``(B,)`` losses; metrics ``"reward_chosen" = beta * pc``, ``"reward_rejected" = beta * pr``,
        ``"reward_margin"`` and ``"accuracy"``.
    """
    _check_positive("beta", beta)
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    chosen = beta * _as_float32(policy_chosen_logps)
    rejected = beta * _as_float32(policy_rejected_logps)
    losses = -F.logsigmoid(chosen - rejected - gamma)
    return LossOutput(losses=losses, metrics=_reward_metrics(chosen, rejected))


def reward_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margins: torch.Tensor | None = None,
    center_rewards_coefficient: float | None = None,
) -> LossOutput:
    """Reward-model loss: Bradley-Terry on a scalar reward head (Ouyang et al. 2022, "InstructGPT", eq. 1).

    ``L = -log sigmoid(r_c - r_r - m) + c * (r_c + r_r)**2``, where ``r`` is the one-label score head's
    output on prompt + answer, ``m`` the pair's reward margin when given (Llama 2, Touvron et al. 2023, eq. 2:
    pairs labelled further apart must be separated by more), and ``c`` the centring coefficient (Eisenstein et
    al. 2023, "Helping or Herding?"): the Bradley-Terry loss only sees ``r_c - r_r``, so the rewards' common
    offset drifts freely; the small penalty keeps rewards near 0. As TRL's ``RewardTrainer`` computes it.

    Args:
        chosen_rewards, rejected_rewards: ``(B,)`` rewards (the score head's logit) of the chosen and rejected
            answers.
        margins: ``(B,)`` the pairs' reward margins (``m``), or None for plain Bradley-Terry.
        center_rewards_coefficient: ``c`` >= 0, or None for no centring term.

    Returns:
        ``(B,)`` losses; metrics ``"accuracy"`` (1.0 where ``r_c > r_r``), ``"reward_margin"`` (``r_c - r_r``),
        ``"reward_chosen"`` and ``"reward_rejected"``.
    """
    if center_rewards_coefficient is not None and center_rewards_coefficient < 0:
        raise ValueError(f"center_rewards_coefficient must be >= 0, got {center_rewards_coefficient}")
    chosen = _as_float32(chosen_rewards)
    rejected = _as_float32(rejected_rewards)
    logits = chosen - rejected
    if margins is not None:
        logits = logits - _as_float32(margins)
    losses = -F.logsigmoid(logits)
    if center_rewards_coefficient is not None:
        losses = losses + center_rewards_coefficient * (chosen + rejected) ** 2
    return LossOutput(losses=losses, metrics=_reward_metrics(chosen, rejected))


@dataclass(frozen=True)
class Loss:
    """A loss function plus what the training loop must feed it.

    Attributes:
        name: registry key.
        fn: the loss; called with keyword arguments only.
        paired: needs ``policy_rejected_logps`` as well as the chosen ones.
        needs_reference: needs ``ref_chosen_logps`` / ``ref_rejected_logps``.
        average_logps: expects length-averaged rather than summed log-probs
            (``sequence_logps(..., average=True)``).
        reward_head: trains a one-label sequence classifier (a reward model) and takes its per-sequence
            rewards, ``chosen_rewards`` / ``rejected_rewards``, instead of LM log-probs.
    """

    name: str
    fn: Callable[..., LossOutput]
    paired: bool
    needs_reference: bool
    average_logps: bool
    reward_head: bool = False


LOSSES: dict[str, Loss] = {
    "sft": Loss("sft", sft_loss, paired=False, needs_reference=False, average_logps=True),
    "orpo": Loss("orpo", orpo_loss, paired=True, needs_reference=False, average_logps=True),
    "dpo": Loss("dpo", dpo_loss, paired=True, needs_reference=True, average_logps=False),
    "ipo": Loss("ipo", ipo_loss, paired=True, needs_reference=True, average_logps=True),
    "simpo": Loss("simpo", simpo_loss, paired=True, needs_reference=False, average_logps=True),
    "reward": Loss("reward", reward_loss, paired=True, needs_reference=False, average_logps=False, reward_head=True),
}


def get_loss(name: str) -> Loss:
    """Look up a loss by name; raises ``ValueError`` listing the known names."""
    try:
        return LOSSES[name]
    except KeyError:
        known = ", ".join(sorted(LOSSES))
        raise ValueError(f"unknown loss {name!r}; known losses: {known}") from None
