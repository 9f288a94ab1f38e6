"""Runs shared by several integration modules, made once per test session.

`small_job`: a small job (43 training prompts, 2 policy samples each plus the gold answer, the transformers
engine, the builtin:tiny-reward model) run in this process up to `pairs`. test_faults compares every kill and
rerun with it; test_rounds starts its two rounds from it (round 1 on all prompts is this single pass).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
UPSTREAM = ["prompts", "generate", "score", "pairs"]
TRAIN_PROMPTS, SAMPLES = 43, 2  # data.limit 48, 10% held out
SMALL_JOB = {
    "name": "small",
    "seed": 0,
    "data": {
        "path": str(ROOT / "jobs/data/addition.jsonl"),
        "prompt_field": "question",
        "gold_field": "answer",
        "eval_fraction": 0.1,
        "limit": 48,
    },
    "policy": {"model": "builtin:tiny-policy"},
    "generate": {
        "engine": "transformers",
        "num_samples": SAMPLES,
        "max_new_tokens": 16,
        "batch_size": 4,
        "resources": {"CPU": 1},
    },
    "score": {"reward": {"type": "model", "model": "builtin:tiny-reward", "batch_size": 4, "resources": {"CPU": 1}}},
    "pairs": {"strategy": ["best_vs_worst"], "min_margin": 0.0, "include_truncated": True},
    "train": {"backend": {"name": "ddp", "num_workers": 1, "use_gpu": False}},
    "eval": {"enabled": False},
}


@pytest.fixture(scope="session")
def small_job_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("small-job") / "job.yaml"
    path.write_text(yaml.safe_dump(SMALL_JOB))
    return path


def run_in_process(spec_file: Path, run: Path) -> Path:
    from alignlib.pipeline import Pipeline
    from alignlib.spec import load_spec

    Pipeline(load_spec(spec_file, [f"output_dir={run}"])).run(UPSTREAM)
    return run


@pytest.fixture(scope="session")
def small_job(ray_session, small_job_file, tmp_path_factory) -> Path:
    """The small job's output directory, prompts to pairs, uninterrupted."""
    return run_in_process(small_job_file, tmp_path_factory.mktemp("small-job-run"))
