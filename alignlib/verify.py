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


def check_scored(scored: Path, completions: Path) -> None:
    """The scored table holds each completion exactly once, and nothing else."""
    compare_keys(read_keys(scored), set(read_keys(completions)), f"score: {scored}")
