"""How a request is sampled: the settings, and the per-row columns that carry them (read by every engine)."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float
    top_p: float


# Request columns carrying each row's sampling settings, so one engine can serve requests sampled two ways
# (`sample_parts`: held-out answers at the eval temperature and the next round's candidates). Dropped from
# the output by `S.conform`.
MAX_TOKENS, TEMPERATURE, TOP_P = "sampling_max_tokens", "sampling_temperature", "sampling_top_p"


def row_sampling(batch: pa.Table, default: Sampling) -> list[Sampling]:
    """Each request row's sampling settings (its columns where present, else `default`)."""
    if MAX_TOKENS not in batch.column_names:
        return [default] * batch.num_rows
    columns = zip(batch[MAX_TOKENS].to_pylist(), batch[TEMPERATURE].to_pylist(), batch[TOP_P].to_pylist(), strict=True)
    return [Sampling(int(m), float(t), float(p)) for m, t, p in columns]
