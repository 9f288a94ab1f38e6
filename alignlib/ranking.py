"""The one order of a prompt's answers, best first: what the best-of-N SFT set and each pair's chosen answer (`pairs`),
`alignlib bon` (`bon.select`) and `alignlib serve` (`serving.rank`) choose by.

- the higher reward first; an answer without one (None or NaN: not scored, or its reward failed) after every
  scored answer;
- among equal rewards, an answer that stopped by itself (`finish_reason: stop`) before one cut at the token limit
  (`length`); a row without `finish_reason` (an imported preference) counts as not cut;
- then the lower `sample_index`.

A prompt's samples have distinct sample indices, so the order is total: a rerun, or the same rows read in another
order, choose the same answer. Pure: rows are dicts; no Ray, no Arrow.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from alignlib import schema as S

Row = TypeVar("Row", bound=Mapping[str, Any])

# The rule in words, in the fingerprint of the stages that rank: `select` always, `pairs` only where cut answers
# take part (`pairs.include_truncated`), the one case where today's rule picks differently from plain "reward, then
# lower sample_index". A rule that changes picks among uncut answers must enter pairs' fingerprint always
# (`alignlib.stages.pairs.sections`), or finished pairs sets would be reused with the old picks.
RULE = "reward, stop before length, lower sample_index"


def best_first(row: Mapping[str, Any]) -> tuple[bool, float, bool, int]:
    """The sort key of one answer: sorting by it puts the best first."""
    reward, cut = row.get(S.REWARD), row.get(S.FINISH_REASON) == "length"
    if reward is None or math.isnan(reward):
        return (True, 0.0, cut, row[S.SAMPLE_INDEX])
    return (False, -reward, cut, row[S.SAMPLE_INDEX])


def ranked(rows: Iterable[Row]) -> list[Row]:
    """The rows best first."""
    return sorted(rows, key=best_first)
