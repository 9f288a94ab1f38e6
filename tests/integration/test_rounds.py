"""Iterative rounds for real (Ray, the transformers engine, the tiny reward model, Ray Train): two rounds run
with `alignlib run`, killed in round 2 and run again, a forced retraining, a changed round-1 setting, and the
per-round figures against the tables they come from.

Round 1 on all the prompts is a single pass with the same fingerprints, so the run starts from the session's
`small_job` outputs (conftest), copied into `round-1/`: its generate, score and pairs are skipped, which is
itself checked. `alignlib run` (its own process group and Ray, as on a laptop) trains round 1, samples and
scores round 2 with round 1's export, and is SIGKILLed after round 2's first training checkpoint (as when a
pod is evicted); run again, it resumes round 2's training from that checkpoint. Then
`alignlib train --round 2 --force` (in this process) trains round 2 again from epoch 1, uninterrupted: the
same weights as the resumed run. A rerun of a stage in another process giving the same tables is checked on
a single pass in test_faults; the held-out figures (eval) on the demo's rounds (test_demo_pipeline).
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


def run_job(rounds_file: Path, run: Path, marker: str, *args: str) -> subprocess.Popen:
    """`alignlib run` (or `args`) in its own process group, its output in a file (a pipe could fill up)."""
    env = {**os.environ, "ALIGNLIB_TEST_MARK": marker}
    env.pop("RAY_ADDRESS", None)  # a local Ray of its own, as `alignlib run` on a laptop
    command = list(args) or ["run", str(rounds_file)]
    log = run.parent / f"{run.name}-{marker}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "alignlib", *command, f"output_dir={run}"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    proc.log = log
    return proc


def output(proc: subprocess.Popen, timeout: float = 600) -> str:
    proc.wait(timeout=timeout)
    text = proc.log.read_text()
    assert proc.returncode == 0, text[-3000:]
    return text


@pytest.fixture(scope="module")
def killed(small_job, rounds_file, tmp_path_factory):
    """The small job's single pass as round 1, then `alignlib run` of two rounds, SIGKILLed as a process group
    after round 2's first training checkpoint, and run again: (run dir, plan before, first log, second log)."""
    run, marker = tmp_path_factory.mktemp("rounds") / "run", uuid.uuid4().hex
    shutil.copytree(small_job / "prompts", run / "prompts")
    for stage in ("generate", "score", "pairs"):
        shutil.copytree(small_job / stage, run / "round-1" / stage)
    plan = Rounds(load_spec(rounds_file, [f"output_dir={run}"])).plan()
    proc = run_job(rounds_file, run, marker)
    wait_for_checkpoint(run, proc, after=run / "round-2" / "pairs" / "manifest.json")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for pid in marked_processes(marker, "ray"):  # Ray processes that left the process group
        os.kill(pid, signal.SIGKILL)
    assert (run / "round-1" / "export" / "manifest.json").exists()
    assert not (run / "round-2" / "train" / "manifest.json").exists(), "the kill landed before training finished"
    return run, plan, proc.log.read_text(), output(run_job(rounds_file, run, uuid.uuid4().hex))


def test_round_one_is_the_single_pass_and_round_two_starts_from_its_export(killed):
    run, plan, first, _ = killed
    assert plan == {"shared": [], "round-1": ["train", "export"], "round-2": ROUND_STAGES}
    assert "round-1: to do: train, export" in first, first[-3000:]
    for k in (1, 2):
        assert sorted(p.name for p in (run / f"round-{k}").iterdir()) == sorted(ROUND_STAGES)
    generated = json.loads((run / "round-2" / "generate" / "manifest.json").read_text())
    assert generated["stats"]["engine_starts"] == 1
    policy = read_table(run / "round-2" / "generate" / "completions").to_pylist()
    assert {r[S.GENERATOR] for r in policy} == {"policy", "gold"}
    assert generated["stats"]["policy"] == str(run / "round-1" / "export" / "model")
    # Round 2 samples with round 1's export, on new seeds.
    first_round = read_table(run / "round-1" / "generate" / "completions").to_pylist()
    seeds = {r[S.SEED] for r in first_round if r[S.GENERATOR] == "policy"}
    assert seeds.isdisjoint(r[S.SEED] for r in policy if r[S.GENERATOR] == "policy")
    assert (run / "report.html").read_text().count("<svg") >= 5


def test_a_job_killed_in_round_two_resumes_there(killed):
    run, _, _, out = killed
    assert "round-1: complete" in out and "round-2: to do: train, export" in out, out[-3000:]
    assert "resuming after epoch" in out, out[-3000:]
    # The command ends with the per-round table.
    assert "== alignlib job 'small': 2 of 2 round(s)" in out
    assert [
        line.split()[0]
        for line in out.splitlines()
        if line.startswith("  ") and line.split() and line.split()[0] in ("start", "1", "2")
    ] == ["start", "1", "2"]


def test_per_round_figures_match_the_tables(killed):
    run = killed[0]
    saved = json.loads((run / "rounds.json").read_text())
    assert [f["round"] for f in saved["rounds"]] == [1, 2]
    for figures in saved["rounds"]:
        k = figures["round"]
        pairs = read_table(run / f"round-{k}" / "pairs" / "pairs").to_pylist()
        assert figures["pairs"] == {"best_vs_worst": len(pairs)}
        sft = read_table(run / f"round-{k}" / "pairs" / "sft")[S.REWARD].to_pylist()
        assert figures["best_of_n_mean_reward"] == pytest.approx(sum(sft) / len(sft))
        scored = [
            r for r in read_table(run / f"round-{k}" / "score" / "scored").to_pylist() if r[S.GENERATOR] == "policy"
        ]
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
        seconds = [json.loads((run / f"round-{k}" / s / "manifest.json").read_text())["seconds"] for s in ROUND_STAGES]
        assert figures["seconds"] == pytest.approx(sum(seconds), abs=0.1)


def test_a_changed_round_one_setting_redoes_every_later_round(killed, rounds_file):
    run = killed[0]
    assert Rounds(load_spec(rounds_file, [f"output_dir={run}"])).plan() == {
        "shared": [],
        "round-1": [],
        "round-2": [],
    }, "a finished run has nothing left to do"
    changed = Rounds(load_spec(rounds_file, [f"output_dir={run}", "pairs.min_margin=0.01"])).plan()
    assert changed == {"shared": [], "round-1": ["pairs", "train", "export"], "round-2": ROUND_STAGES}


def test_force_trains_from_the_start_to_the_weights_of_the_resumed_run(killed, rounds_file, capfd):
    """`alignlib train JOB.yaml --round 2 --force`, in this process on the session's Ray: the run it resumed is
    set aside and training starts at epoch 1; uninterrupted, it ends on the killed and resumed run's weights."""
    from alignlib.cli import main

    run = killed[0]
    resumed = weights_of(run / "round-2" / "train")
    capfd.readouterr()
    assert main(["train", str(rounds_file), "--round", "2", "--force", f"output_dir={run}"]) == 0
    out = capfd.readouterr().out
    assert "resuming" not in out and "epoch 1/6" in out, out[-3000:]
    assert_same_weights(weights_of(run / "round-2" / "train"), resumed)
