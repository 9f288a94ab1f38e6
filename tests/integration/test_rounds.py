"""Iterative rounds for real (Ray, the transformers engine, the tiny reward model, Ray Train): two rounds,
a kill in round 2, a changed round-1 setting, and the per-round figures against the tables they come from.

Round 1 on all the prompts is a single pass with the same fingerprints, so the uninterrupted run starts
from the session's `small_job` outputs (conftest), copied into `round-1/`: its generate, score and pairs
are skipped, which is itself checked. The killed run starts from a copy of the uninterrupted run's
round 1 (another directory: round 2's fingerprints take round 1's export by content, not by path), is
SIGKILLed as a process group after round 2's first training checkpoint (as when a pod is evicted), and
is run again: it resumes training from that checkpoint. Its round 2 was made in another process on
another Ray, so its tables must equal the uninterrupted run's: same spec and seed, same outputs. Then
round 2's training is forced (`alignlib train --round 2 --force`, in this process): it starts again from
epoch 1 instead of resuming, to the same weights.
The held-out figures (eval) are checked on the demo's rounds (test_demo_pipeline).
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
from processes import assert_same_weights, marked_processes, wait_for_checkpoint, weights_of  # noqa: E402

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ROUNDS_JOB = {
    **SMALL_JOB,
    "train": {**SMALL_JOB["train"], "batch_size": 2, "log_every": 5},
    # Round 2 trains long enough for a kill to land between its first checkpoint and its last.
    "rounds": {"count": 2, "later": {"train": {"epochs": 6}}},
}
ROUND_STAGES = ["generate", "score", "pairs", "train", "export"]


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
    assert plan == {"shared": [], "round-1": ["train", "export"], "round-2": ROUND_STAGES}
    for k in (1, 2):
        assert sorted(p.name for p in (run / f"round-{k}").iterdir()) == sorted(ROUND_STAGES)
    generated = json.loads((run / "round-2" / "generate" / "manifest.json").read_text())
    assert generated["stats"]["engine_starts"] == 1
    policy = read_table(run / "round-2" / "generate" / "completions").to_pylist()
    assert {r[S.GENERATOR] for r in policy} == {"policy", "gold"}
    assert generated["stats"]["policy"] == str(run / "round-1" / "export" / "model")
    # Round 2 samples with round 1's export, on new seeds.
    first = read_table(run / "round-1" / "generate" / "completions").to_pylist()
    seeds = {r[S.SEED] for r in first if r[S.GENERATOR] == "policy"}
    assert seeds.isdisjoint(r[S.SEED] for r in policy if r[S.GENERATOR] == "policy")
    assert (run / "report.html").read_text().count("<svg") >= 5


def test_per_round_figures_match_the_tables(two_rounds):
    run, result, _ = two_rounds
    saved = json.loads((run / "rounds.json").read_text())
    assert saved["rounds"] == json.loads(json.dumps(result["figures"]))
    for figures in saved["rounds"]:
        k = figures["round"]
        pairs = read_table(run / f"round-{k}" / "pairs" / "pairs").to_pylist()
        assert figures["pairs"] == {"best_vs_worst": len(pairs)}
        sft = read_table(run / f"round-{k}" / "pairs" / "sft")[S.REWARD].to_pylist()
        assert figures["best_of_n_mean_reward"] == pytest.approx(sum(sft) / len(sft))
        scored = [r for r in read_table(run / f"round-{k}" / "score" / "scored").to_pylist()
                  if r[S.GENERATOR] == "policy"]  # fmt: skip
        assert figures["sample_mean_reward"] == pytest.approx(sum(r[S.REWARD] for r in scored) / len(scored))
        assert figures["sample_max_reward"] == max(r[S.REWARD] for r in scored)
        by_prompt: dict[str, list[float]] = {}
        for r in scored:
            by_prompt.setdefault(r[S.PROMPT_ID], []).append(r[S.REWARD])
        gaps = [max(v) - min(v) for v in by_prompt.values()]
        assert figures["best_worst_gap"] == pytest.approx(sum(gaps) / len(gaps))
        assert figures["tied_share"] == pytest.approx(sum(g == 0 for g in gaps) / len(gaps))
        loss = read_table(run / f"round-{k}" / "train" / "metrics").to_pylist()[-1]["train/loss"]
        assert figures["final_train_loss"] == pytest.approx(loss)


def test_a_changed_round_one_setting_redoes_every_later_round(two_rounds, rounds_file):
    run, _, _ = two_rounds
    assert Rounds(load_spec(rounds_file, [f"output_dir={run}"])).plan() == {
        "shared": [], "round-1": [], "round-2": []
    }, "a finished run has nothing left to do"  # fmt: skip
    changed = Rounds(load_spec(rounds_file, [f"output_dir={run}", "pairs.min_margin=0.01"])).plan()
    assert changed == {"shared": [], "round-1": ["pairs", "train", "export"], "round-2": ROUND_STAGES}


def run_job(rounds_file: Path, run: Path, marker: str, *args: str) -> subprocess.Popen:
    """`alignlib run` (or `args`) in its own process group, its output in a file (a pipe could fill up)."""
    env = {**os.environ, "ALIGNLIB_TEST_MARK": marker}
    env.pop("RAY_ADDRESS", None)  # a local Ray of its own, as `alignlib run` on a laptop
    command = list(args) or ["run", str(rounds_file)]
    log = run.parent / f"{run.name}-{marker}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "alignlib", *command, f"output_dir={run}"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )  # fmt: skip
    proc.log = log
    return proc


def output(proc: subprocess.Popen, timeout: float = 600) -> str:
    proc.wait(timeout=timeout)
    text = proc.log.read_text()
    assert proc.returncode == 0, text[-3000:]
    return text


@pytest.fixture(scope="module")
def killed(two_rounds, rounds_file, tmp_path_factory):
    """A copy of the uninterrupted run's round 1, run with `alignlib run`, SIGKILLed as a process group after
    round 2's first training checkpoint, and run again: (run dir, the second run's output)."""
    done, _, _ = two_rounds
    run, marker = tmp_path_factory.mktemp("killed") / "run", uuid.uuid4().hex
    for part in ("prompts", "round-1"):
        shutil.copytree(done / part, run / part)
    proc = run_job(rounds_file, run, marker)
    wait_for_checkpoint(run, proc)  # round 2's training: round 1's Ray Train runs were not copied
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for pid in marked_processes(marker, "ray"):  # Ray processes that left the process group
        os.kill(pid, signal.SIGKILL)
    assert (run / "round-2" / "pairs" / "manifest.json").exists()
    assert not (run / "round-2" / "train" / "manifest.json").exists(), "the kill landed before training finished"
    return run, output(run_job(rounds_file, run, uuid.uuid4().hex))


def test_a_job_killed_in_round_two_resumes_there_and_ends_like_the_uninterrupted_run(two_rounds, killed):
    done, _, _ = two_rounds
    run, out = killed
    assert "round-1: complete" in out and "round-2: to do: train, export" in out, out[-3000:]
    assert "resuming after epoch" in out, out[-3000:]
    assert_same_weights(weights_of(run / "round-2" / "train"), weights_of(done / "round-2" / "train"))
    # The command ends with the per-round table.
    assert "== alignlib job 'small': 2 of 2 round(s)" in out
    assert [line.split()[0] for line in out.splitlines() if line.startswith("  ") and line.split()
            and line.split()[0] in ("start", "1", "2")] == ["start", "1", "2"]  # fmt: skip


def by_key(rows: list[dict]) -> dict[tuple, dict]:
    keyed = {(r[S.PROMPT_ID], r[S.GENERATOR], r[S.SAMPLE_INDEX]): r for r in rows}
    assert len(keyed) == len(rows), "a (prompt_id, generator, sample_index) key appears twice"
    return keyed


def test_same_spec_and_seed_give_identical_outputs(two_rounds, killed):
    """Round 2 of the killed run was made in another process, on another Ray: completions and scores row for
    row, value for value; pairs and the best-of-N set byte for byte."""
    done, _, _ = two_rounds
    run, _ = killed
    for stage, table in (("generate", "completions"), ("score", "scored")):
        got, want = (read_table(r / "round-2" / stage / table).to_pylist() for r in (run, done))
        assert len(got) == len(want) and by_key(got) == by_key(want), f"{stage}/{table} differs"
    for table in ("pairs", "sft"):
        assert ((run / "round-2" / "pairs" / table / "part-00000.parquet").read_bytes()
                == (done / "round-2" / "pairs" / table / "part-00000.parquet").read_bytes()), table  # fmt: skip


def test_force_trains_from_the_start_instead_of_resuming(two_rounds, killed, rounds_file, capfd):
    """`alignlib train JOB.yaml --round 2 --force`, in this process on the session's Ray: the run it resumed from
    is set aside, training starts at epoch 1, same weights."""
    from alignlib.cli import main

    done, _, _ = two_rounds
    run, _ = killed
    assert main(["train", str(rounds_file), "--round", "2", "--force", f"output_dir={run}"]) == 0
    out = capfd.readouterr().out
    assert "resuming" not in out and "epoch 1/6" in out, out[-3000:]
    assert_same_weights(weights_of(run / "round-2" / "train"), weights_of(done / "round-2" / "train"))
