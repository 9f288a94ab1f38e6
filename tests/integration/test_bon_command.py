"""`alignlib bon JOB.yaml --out FILE`: best-of-N answers for every prompt, for real (Ray Data, tiny policy).

The command runs in its own process, attached to the session's Ray: every prompt of the data file (no
held-out split), 4 samples each from the tiny policy (transformers engine, 4 new tokens: most are cut at the
limit), a length reward (shorter is better, so answers tie on length), then the select stage.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from alignlib import schema as S
from alignlib.store import read_table

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
PROMPTS, SAMPLES = 12, 4


@pytest.fixture(scope="module")
def bon_run(ray_session, model_cache, tmp_path_factory):
    run = tmp_path_factory.mktemp("bon")
    out = run / "best.jsonl"
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    args = [
        sys.executable,
        "-m",
        "alignlib",
        "bon",
        "jobs/demo.yaml",
        f"output_dir={run}",
        "--out",
        str(out),
        f"data.limit={PROMPTS}",
        "generate.engine=transformers",
        f"generate.num_samples={SAMPLES}",
        "generate.max_new_tokens=4",
        "score.reward={type: function, function: 'alignlib.rewards:length_penalty'}",
    ]
    done = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    again = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    return run, out, done.stdout, again


def test_one_best_answer_per_prompt_in_the_data_files_order(bon_run):
    run, out, log, _ = bon_run
    best = read_table(run / "bon" / "select" / "best").to_pylist()
    assert len(best) == PROMPTS, "every prompt: no held-out split in the bon flow"
    lines = [int(b[S.SOURCE].rsplit(":", 1)[1]) for b in best]
    assert lines == sorted(lines) == list(range(1, PROMPTS + 1))
    assert [json.loads(line) for line in out.read_text().splitlines()] == json.loads(json.dumps(best))
    assert f"wrote {PROMPTS} best answers to {out}" in log
    assert f"best-of-N: {PROMPTS} prompts, one best answer each" in log


def test_the_best_is_the_top_ranked_candidate_and_flags_match_the_candidates(bon_run):
    run, _, _, _ = bon_run
    best = {b[S.PROMPT_ID]: b for b in read_table(run / "bon" / "select" / "best").to_pylist()}
    candidates = read_table(run / "bon" / "select" / "candidates").to_pylist()
    assert len(candidates) == PROMPTS * SAMPLES
    for pid, b in best.items():
        mine = sorted((c for c in candidates if c[S.PROMPT_ID] == pid), key=lambda c: c["rank"])
        assert [c["rank"] for c in mine] == list(range(1, SAMPLES + 1))
        assert b[S.REWARD] == max(c[S.REWARD] for c in mine) == mine[0][S.REWARD]
        assert b["best_sample_index"] == mine[0][S.SAMPLE_INDEX] and b[S.COMPLETION] == mine[0][S.COMPLETION]
        cut = all(c[S.FINISH_REASON] == "length" for c in mine)
        assert b["flag"] == ("all_truncated" if cut else None)
        assert b["tied"] == ([c[S.REWARD] for c in mine].count(b[S.REWARD]) > 1)
    assert any(b["flag"] == "all_truncated" for b in best.values()), "4 tokens cut most answers of the tiny policy"


def test_a_second_run_skips_every_stage(bon_run):
    _, _, _, again = bon_run
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("complete, skipped") == 4  # prompts, generate, score, select
