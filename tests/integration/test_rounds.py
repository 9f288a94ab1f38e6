"""Iterative rounds for real (Ray, the transformers engine, the tiny reward model, Ray Train): two rounds,
a kill in round 2, a changed round-1 setting, and the per-round figures against the tables they come from.

Round 1 on all the prompts is a single pass with the same fingerprints, so the uninterrupted run starts
from the session's `small_job` outputs (conftest), copied into `round-1/`: its generate, score and pairs
are skipped, which is itself checked. The killed run starts from a copy of the uninterrupted run's
round 1 (another directory: round 2's fingerprints take round 1's export by content, not by path), is
SIGKILLed as a process group after round 2's first training checkpoint, and is run again.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from conftest import SMALL_JOB

from alignlib import schema as S
from alignlib.rounds import Rounds
from alignlib.spec import load_spec
from alignlib.store import read_table

sys.path.insert(0, str(Path(__file__).parent))
from processes import assert_same_weights, finish, marked_processes, wait_for_checkpoint, weights_of  # noqa: E402

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ROUNDS_JOB = {
    **SMALL_JOB,
    "train": {**SMALL_JOB["train"], "epochs": 6, "batch_size": 2, "log_every": 5},
    "eval": {"enabled": True, "temperature": 0.0},
    "rounds": {"count": 2},
}
ROUND_STAGES = ["generate", "score", "pairs", "train", "export", "eval"]


@pytest.fixture(scope="module")
def rounds_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("rounds-job") / "job.yaml"
    path.write_text(yaml.safe_dump(ROUNDS_JOB))
    return path


@pytest.fixture(scope="module")
def two_rounds(small_job, rounds_file, tmp_path_factory):
    """Two rounds, uninterrupted, in this process: (run dir, Rounds.run's result, the plan it started with)."""
    run = tmp_path_factory.mktemp("two-rounds") / "run"
    shutil.copytree(small_job / "prompts", run / "prompts")
    for stage in ("generate", "score", "pairs"):
        shutil.copytree(small_job / stage, run / "round-1" / stage)
    rounds = Rounds(load_spec(rounds_file, [f"output_dir={run}"]))
    plan = rounds.plan()
    return run, rounds.run(), plan


def test_round_one_is_the_single_pass_and_round_two_starts_from_its_export(two_rounds):
    run, result, plan = two_rounds
    assert plan == {"shared": ["baseline"], "round-1": ["train", "export", "eval"], "round-2": ROUND_STAGES}
    for k in (1, 2):
        assert sorted(p.name for p in (run / f"round-{k}").iterdir()) == sorted(ROUND_STAGES)
    generated = json.loads((run / "round-2" / "generate" / "manifest.json").read_text())
    assert generated["stats"]["engine_starts"] == 1
    policy = read_table(run / "round-2" / "generate" / "completions").to_pylist()
    assert {r[S.GENERATOR] for r in policy} == {"policy", "gold"}
    # Round 2 samples with round 1's export, on new seeds.
    first = read_table(run / "round-1" / "generate" / "completions").to_pylist()
    seeds = {r[S.SEED] for r in first if r[S.GENERATOR] == "policy"}
    assert seeds.isdisjoint(r[S.SEED] for r in policy if r[S.GENERATOR] == "policy")
    assert (run / "report.html").read_text().count("<svg") >= 5


def test_per_round_figures_match_the_tables(two_rounds):
    run, result, _ = two_rounds
    saved = json.loads((run / "rounds.json").read_text())
    assert saved["rounds"] == json.loads(json.dumps(result["figures"]))
    base = read_table(run / "baseline" / "completions").to_pylist()
    assert saved["start"]["held_out_reward"] == pytest.approx(sum(r[S.REWARD] for r in base) / len(base))
    previous = {r[S.PROMPT_ID]: r[S.REWARD] for r in base}
    start = dict(previous)
    for figures in saved["rounds"]:
        k = figures["round"]
        trained = {r[S.PROMPT_ID]: r[S.REWARD] for r in read_table(run / f"round-{k}" / "eval" / "completions").to_pylist()
                   if r[S.GENERATOR] == "trained"}  # fmt: skip
        assert figures["held_out_reward"] == pytest.approx(sum(trained.values()) / len(trained))
        for key, other in (("win_rate_vs_start", start), ("win_rate_vs_previous", previous)):
            wins = [1.0 if trained[p] > other[p] else 0.5 if trained[p] == other[p] else 0.0 for p in trained]
            assert figures[key] == pytest.approx(sum(wins) / len(wins)), key
        previous = trained
        pairs = read_table(run / f"round-{k}" / "pairs" / "pairs").to_pylist()
        assert figures["pairs"] == {"best_vs_worst": len(pairs)}
        sft = read_table(run / f"round-{k}" / "pairs" / "sft")[S.REWARD].to_pylist()
        assert figures["best_of_n_mean_reward"] == pytest.approx(sum(sft) / len(sft))
        scored = [r for r in read_table(run / f"round-{k}" / "score" / "scored").to_pylist()
                  if r[S.GENERATOR] == "policy"]  # fmt: skip
        assert figures["sample_mean_reward"] == pytest.approx(sum(r[S.REWARD] for r in scored) / len(scored))
        assert figures["sample_max_reward"] == max(r[S.REWARD] for r in scored)


def test_a_changed_round_one_setting_redoes_every_later_round(two_rounds, rounds_file):
    run, _, _ = two_rounds
    assert Rounds(load_spec(rounds_file, [f"output_dir={run}"])).plan() == {
        "shared": [], "round-1": [], "round-2": []
    }, "a finished run has nothing left to do"  # fmt: skip
    changed = Rounds(load_spec(rounds_file, [f"output_dir={run}", "pairs.min_margin=0.01"])).plan()
    assert changed == {"shared": [], "round-1": ["pairs", "train", "export", "eval"], "round-2": ROUND_STAGES}


def run_job(rounds_file: Path, run: Path, marker: str) -> subprocess.Popen:
    env = {**os.environ, "ALIGNLIB_TEST_MARK": marker}
    env.pop("RAY_ADDRESS", None)  # a local Ray of its own, as `alignlib run` on a laptop
    return subprocess.Popen(
        [sys.executable, "-m", "alignlib", "run", str(rounds_file), f"output_dir={run}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip


def test_a_job_killed_in_round_two_resumes_there_and_ends_like_the_uninterrupted_run(two_rounds, rounds_file,
                                                                                       tmp_path):  # fmt: skip
    done, _, _ = two_rounds
    run, marker = tmp_path / "killed", uuid.uuid4().hex
    for part in ("prompts", "baseline", "round-1"):
        shutil.copytree(done / part, run / part)
    proc = run_job(rounds_file, run, marker)
    wait_for_checkpoint(run, proc)  # round 2's training: round 1's Ray Train runs were not copied
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for pid in marked_processes(marker, "ray"):  # Ray processes that left the process group
        os.kill(pid, signal.SIGKILL)
    assert (run / "round-2" / "pairs" / "manifest.json").exists()
    assert not (run / "round-2" / "train" / "manifest.json").exists(), "the kill landed before training finished"

    out = finish(run_job(rounds_file, run, uuid.uuid4().hex))
    assert "round-1: complete" in out and "round-2: to do: train, export, eval" in out, out[-3000:]
    assert "resuming after epoch" in out, out[-3000:]
    for table in ("pairs", "sft"):
        assert (read_table(run / "round-2" / "pairs" / table).to_pylist()
                == read_table(done / "round-2" / "pairs" / table).to_pylist()), table  # fmt: skip
    assert_same_weights(weights_of(run / "round-2" / "train"), weights_of(done / "round-2" / "train"))
    # The command ends with the per-round table.
    assert "== alignlib job 'small': 2 of 2 round(s)" in out
    assert [line.split()[0] for line in out.splitlines() if line.startswith("  ") and line.split()
            and line.split()[0] in ("start", "1", "2")] == ["start", "1", "2"]  # fmt: skip
