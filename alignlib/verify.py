"""Row-level checks a generate or score output passes before its stage is committed.

Ray restarts a killed engine or reward actor and retries its batches; these checks make sure the
retries lost no row and wrote none twice, whatever Ray did. They read only the key columns
(prompt_id, generator, sample_index) and fail naming the table and a key that is missing, repeated
or unexpected, so a bad table is never committed (and so never trusted on rerun).

    check_completions(out_dir, {"policy": (prompt_ids, 4), "gold": (ids_with_answer, 1)})
    check_scored(scored_dir, completions_dir)
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from alignlib import schema as S

KEY = (S.PROMPT_ID, S.GENERATOR, S.SAMPLE_INDEX)
Key = tuple[str, str, int]


class StageOutputError(RuntimeError):
    """A stage's output does not hold exactly the rows its inputs call for; it is not committed."""


def read_keys(directory: Path) -> list[Key]:
    """The (prompt_id, generator, sample_index) of every row of a Parquet dataset directory."""
    from alignlib.store import read_table

    table = read_table(directory, columns=list(KEY))
    return list(zip(*(table[c].to_pylist() for c in KEY), strict=True))


def _describe(key: Key) -> str:
    return f"prompt_id {key[0]} generator {key[1]} sample_index {key[2]}"


def compare_keys(keys: list[Key], wanted: set[Key], where: str) -> None:
    """`keys` must hold every key of `wanted` exactly once and nothing else."""
    counts = Counter(keys)
    twice = sorted(k for k, n in counts.items() if n > 1)
    missing, extra = sorted(wanted - counts.keys()), sorted(counts.keys() - wanted)
    problems = []
    if twice:
        problems.append(f"{len(twice)} written more than once (e.g. {_describe(twice[0])}, {counts[twice[0]]} rows)")
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {_describe(missing[0])})")
    if extra:
        problems.append(f"{len(extra)} not expected (e.g. {_describe(extra[0])})")
    if problems:
        raise StageOutputError(
            f"{where}: {len(keys)} rows where {len(wanted)} were expected: {'; '.join(problems)}; refusing to commit"
        )


def check_completions(directory: Path, expected: dict[str, tuple[list[str], int]]) -> None:
    """One row per prompt and sample index 0..n-1 for each generator: `expected` maps generator -> (prompt ids, n)."""
    wanted = {(p, g, i) for g, (ids, n) in expected.items() for p in ids for i in range(n)}
    compare_keys(read_keys(directory), wanted, f"generate: {directory}")


def _key_strings(directory):
    """Every row's key as one Arrow string, `prompt_id|generator|sample_index` (no Python object per row)."""
    import pyarrow.compute as pc

    from alignlib.store import read_table

    table = read_table(directory, columns=list(KEY))
    index = pc.cast(table[S.SAMPLE_INDEX], "string")
    return pc.binary_join_element_wise(table[S.PROMPT_ID], table[S.GENERATOR], index, "\x1f").combine_chunks()


def _key(text: str) -> Key:
    prompt_id, generator, index = text.split("\x1f")
    return prompt_id, generator, int(index)


def check_scored(scored: Path, completions: Path) -> None:
    """The scored table holds each completion exactly once, and nothing else.

    Compared as Arrow arrays (hash counts and membership), so a table of millions of rows costs tens of bytes
    per row in the driver, not a Python tuple each."""
    import pyarrow.compute as pc

    got, wanted = _key_strings(scored), _key_strings(completions)
    counts = pc.value_counts(got)
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    missing = wanted.filter(pc.invert(pc.is_in(wanted, value_set=got)))
    extra = got.filter(pc.invert(pc.is_in(got, value_set=wanted)))
    problems = []
    if len(repeated):
        first = repeated[0].as_py()
        problems.append(f"{len(repeated)} written more than once (e.g. {_describe(_key(first['values']))}, "
                        f"{first['counts']} rows)")  # fmt: skip
    if len(missing):
        problems.append(f"{len(missing)} missing (e.g. {_describe(_key(missing[0].as_py()))})")
    if len(extra):
        problems.append(f"{len(pc.unique(extra))} not expected (e.g. {_describe(_key(extra[0].as_py()))})")
    if problems:
        raise StageOutputError(
            f"score: {scored}: {len(got)} rows where {len(pc.unique(wanted))} were expected: {'; '.join(problems)}; "
            "refusing to commit"
        )
