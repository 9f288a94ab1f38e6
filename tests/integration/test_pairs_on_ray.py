"""The pairs stage on Ray Data (`alignlib.pairs_data`, what a scored table over 200,000 rows takes) against the
in-driver build, on the session's small job: the same pairs, best-of-N rows, counts and data-quality figures.

Below `pairs_data.SAMPLE_ROWS` completions the sample is every row, so even the sampled figures (quantiles,
histograms, Spearman) must equal the in-driver ones; the exact ones always must.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from alignlib import schema as S
from alignlib.pipeline import Pipeline
from alignlib.spec import load_spec
from alignlib.store import read_table

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def on_ray(small_job, small_job_file, tmp_path_factory):
    """A copy of the small job's run, its pairs stage redone on Ray Data: (run dir, its log lines)."""
    run = tmp_path_factory.mktemp("pairs-on-ray") / "run"
    shutil.copytree(small_job, run)
    mp = pytest.MonkeyPatch()
    mp.setenv("ALIGNLIB_PAIRS_DRIVER_MAX_ROWS", "0")
    try:
        Pipeline(load_spec(small_job_file, [f"output_dir={run}"]), force=True).run(["pairs"])
    finally:
        mp.undo()
    return run


def manifest(run: Path) -> dict:
    return json.loads((run / "pairs" / "manifest.json").read_text())


def ordered(rows: list[dict], key: tuple[str, ...]) -> list[dict]:
    return sorted(rows, key=lambda r: tuple(r[k] for k in key))


def close(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) or (math.isnan(a) and math.isnan(b))
    return a == b


def test_the_same_pairs_and_best_of_n_rows_as_the_driver_build(on_ray, small_job):
    pair_key = (S.PROMPT_ID, S.STRATEGY, S.CHOSEN, S.REJECTED)
    got, want = read_table(on_ray / "pairs" / "pairs"), read_table(small_job / "pairs" / "pairs")
    assert got.schema == want.schema
    assert ordered(got.to_pylist(), pair_key) == ordered(want.to_pylist(), pair_key) and got.num_rows > 0
    sft_got, sft_want = read_table(on_ray / "pairs" / "sft"), read_table(small_job / "pairs" / "sft")
    assert ordered(sft_got.to_pylist(), (S.PROMPT_ID,)) == ordered(sft_want.to_pylist(), (S.PROMPT_ID,))


def test_the_same_counts_and_quality_figures_as_the_driver_build(on_ray, small_job):
    got, want = manifest(on_ray)["stats"], manifest(small_job)["stats"]
    counts = {k: v for k, v in want.items() if isinstance(v, int)}
    assert {k: got[k] for k in counts} == counts
    quality, expected = got["quality"], want["quality"]
    method = quality.pop("method")
    assert method["sample_rate"] == 1.0 and method["sampled_completions"] == counts["prompts"] * 3
    for stats in [*quality["reward_by_generator"].values(), quality["margin"], *quality["margin_by_strategy"].values()]:
        assert stats.pop("sampled") == stats["count"]
    for corr in quality["reward_length_correlation"].values():
        assert corr.pop("spearman_sampled") == corr["n"]
    assert close(quality, expected), (quality, expected)
    assert (on_ray / "pairs" / "report.html").read_text().count("<svg") >= 2
