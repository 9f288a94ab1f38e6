"""Row-level checks a generate or score output passes before its stage is committed.

Ray restarts a killed engine or reward actor and retries its batches; these checks make sure the
retries lost no row and wrote none twice, whatever Ray did. They read only the key columns
(prompt_id, generator, sample_index) and fail naming the table and a key that is missing, repeated
or unexpected, so a bad table is never committed (and so never trusted on rerun).

    check_completions(out_dir, {"policy": (prompt_ids, 4), "gold": (ids_with_answer, 1)})
    check_scored(scored_dir, completions_dir)
"""

from __future__ import annotations

from alignlib import schema as S
from alignlib.store import StorePath

KEY = (S.PROMPT_ID, S.GENERATOR, S.SAMPLE_INDEX)
Key = tuple[str, str, int]


class StageOutputError(RuntimeError):
    """A stage's output does not hold exactly the rows its inputs call for; it is not committed."""


def _describe(key: Key) -> str:
    return f"prompt_id {key[0]} generator {key[1]} sample_index {key[2]}"


SEPARATOR = "\x1f"


def _join(prompt_ids, generators, indices):
    """Keys as one Arrow string each, `prompt_id<US>generator<US>sample_index` (no Python object per row)."""
    import pyarrow.compute as pc

    return pc.binary_join_element_wise(prompt_ids, generators, pc.cast(indices, "string"), SEPARATOR)


def _key_strings(directory):
    """Every row's key in a Parquet dataset directory, as Arrow strings."""
    from alignlib.store import read_table

    table = read_table(directory, columns=list(KEY))
    return _join(table[S.PROMPT_ID], table[S.GENERATOR], table[S.SAMPLE_INDEX]).combine_chunks()


def _expected_keys(expected: dict):
    """generator -> (prompt ids, n) as the Arrow strings of every (prompt, generator, 0..n-1) key."""
    import numpy as np
    import pyarrow as pa

    parts = []
    for generator, (ids, n) in expected.items():
        if isinstance(ids, pa.ChunkedArray):
            ids = ids.combine_chunks()
        elif not isinstance(ids, pa.Array):
            ids = pa.array(ids, pa.string())
        count = len(ids)
        repeated = ids.take(pa.array(np.repeat(np.arange(count, dtype=np.int64), n)))
        indices = pa.array(np.tile(np.arange(n, dtype=np.int32), count))
        parts.append(_join(repeated, pa.scalar(generator, pa.string()), indices))  # the generator broadcast, not a list
    return pa.chunked_array(parts, pa.string()).combine_chunks() if parts else pa.array([], pa.string())


def _key(text: str) -> Key:
    prompt_id, generator, index = text.split(SEPARATOR)
    return prompt_id, generator, int(index)


def _compare(got, wanted, where: str) -> None:
    """`got` must hold every key of `wanted` exactly once and nothing else (hash counts and membership, in Arrow:
    a table of millions of rows costs tens of bytes per row in the driver, not a Python tuple each)."""
    import pyarrow.compute as pc

    counts = pc.value_counts(got)
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    missing = wanted.filter(pc.invert(pc.is_in(wanted, value_set=got)))
    extra = got.filter(pc.invert(pc.is_in(got, value_set=wanted)))
    problems = []
    if len(repeated):
        first = repeated[0].as_py()
        problems.append(
            f"{len(repeated)} written more than once (e.g. {_describe(_key(first['values']))}, {first['counts']} rows)"
        )
    if len(missing):
        problems.append(f"{len(missing)} missing (e.g. {_describe(_key(missing[0].as_py()))})")
    if len(extra):
        problems.append(f"{len(pc.unique(extra))} not expected (e.g. {_describe(_key(extra[0].as_py()))})")
    if problems:
        raise StageOutputError(
            f"{where}: {len(got)} rows where {len(pc.unique(wanted))} were expected: {'; '.join(problems)}; "
            "refusing to commit"
        )


def check_completions(directory: StorePath, expected: dict) -> None:
    """One row per prompt and sample index 0..n-1 for each generator: `expected` maps generator -> (prompt ids, n),
    the ids a list or an Arrow array."""
    _compare(_key_strings(directory), _expected_keys(expected), f"generate: {directory}")


def check_scored(scored: StorePath, completions: StorePath) -> None:
    """The scored table holds each completion exactly once, and nothing else."""
    _compare(_key_strings(scored), _key_strings(completions), f"score: {scored}")
