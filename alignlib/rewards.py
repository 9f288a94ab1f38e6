"""Function rewards, addressable from a spec as `alignlib.rewards:NAME`.

A function reward is called once per completion as `fn(prompt=..., completion=..., gold=...)`
(`gold`: the dataset's gold answer, or None) and returns a float; any function of that shape in any
importable module works the same way.
A function that cannot score without the gold answer says so with `fn.needs_gold = True`; the spec
then refuses jobs whose data has none where the reward runs (eval on an imported preference set).
"""

from __future__ import annotations

import re
from typing import Protocol, cast

_INTEGER = re.compile(r"-?\d+")


def exact_match(prompt: str, completion: str, gold: str | None) -> float:
    """1.0 when the stripped completion equals the gold answer, else 0.0."""
    if gold is None:
        raise ValueError("exact_match needs a gold answer (set data.gold_field)")
    return float(completion.strip() == gold.strip())


def numeric_closeness(prompt: str, completion: str, gold: str | None) -> float:
    """Graded credit for a numeric answer: 1 when exact, falling linearly to 0 as it strays.

    reward = max(0, 1 - |answer - gold| / (|gold| + 1)); 0 when the completion is not a
    plain integer. Partial credit gives best-of-N a signal to rank by, unlike exact match.
    """
    if gold is None:
        raise ValueError("numeric_closeness needs a gold answer (set data.gold_field)")
    text = completion.strip()
    if not _INTEGER.fullmatch(text):
        return 0.0
    target = int(gold)
    return max(0.0, 1.0 - abs(int(text) - target) / (abs(target) + 1))


def stated_number(prompt: str, completion: str, gold: str | None) -> float:
    """1.0 when the answer states the gold number, else 0.0: an instruct model's answer to an arithmetic question.

    The stated number is the last integer on the completion's first non-empty line, so "73", "41 + 32 = 73"
    and "41 + 32 is 73." all state 73, while "41 + 32 = 74\n\nSo the sum is 73" states 74 (an answer is its
    first line; what follows is explanation), and a completion with no integer there states nothing.
    """
    if gold is None:
        raise ValueError("stated_number needs a gold answer (set data.gold_field)")
    line = next((part for part in completion.splitlines() if part.strip()), "")
    numbers = _INTEGER.findall(line.replace(",", ""))
    return float(bool(numbers) and int(numbers[-1]) == int(gold))


def length_penalty(prompt: str, completion: str, gold: str | None) -> float:
    """-(characters / 100): prefers short answers; an example reward that needs no gold answer."""
    return -len(completion) / 100.0


class _NeedsGold(Protocol):
    """A reward function as the spec reads it (`needs_gold`); a `def`'s own type has no such attribute."""

    needs_gold: bool


cast(_NeedsGold, exact_match).needs_gold = True
cast(_NeedsGold, numeric_closeness).needs_gold = True
cast(_NeedsGold, stated_number).needs_gold = True
cast(_NeedsGold, length_penalty).needs_gold = False
