"""Kill training for real and run it again: the result equals an uninterrupted run.

The pairs are the session's small job (conftest: the real pipeline, transformers engine, tiny reward model).
Training then runs as `alignlib train JOB.yaml` in its own process group, three ways on the same pairs:

- the whole job killed (SIGKILL to its process group, as when a pod is evicted) after its first
  checkpoint, then the same command run again: it resumes after the last finished epoch;
- one Ray Train worker killed after the first checkpoint: Ray Train restarts the worker group from
  that checkpoint (`train.max_failures: 1`) and the same command finishes;
- then `alignlib train --force` on that finished run: it trains again from the start instead of resuming,
  uninterrupted, and is the reference the two interrupted runs are compared with.

All of them must end on the same weights.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from alignlib.train.backends import _read_weights

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ["train.epochs=8", "train.batch_size=2", "train.log_every=5", "train.max_failures=1"]


@pytest.fixture(scope="module")
def pairs_run(small_job):
    return small_job


@pytest.fixture(scope="module")
def job_file(small_job_file):
    return small_job_file


def copy_pairs(source: Path, target: Path) -> Path:
    for stage in ("prompts", "generate", "score", "pairs"):
        shutil.copytree(source / stage, target / stage)
    return target


def start_training(job_file: Path, run: Path, marker: str, *options: str) -> subprocess.Popen:
    env = {**os.environ, "ALIGNLIB_TEST_MARK": marker}
    env.pop("RAY_ADDRESS", None)  # a local Ray of its own, as `alignlib train` on a laptop
    return subprocess.Popen(
        [sys.executable, "-m", "alignlib", "train", str(job_file), f"output_dir={run}", *TRAIN, *options],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip


def finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def wait_for_checkpoint(run: Path, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        # Registered, not merely being written: Ray Train lists a checkpoint in its snapshot once it is whole.
        for snapshot in (run / "train-ray").glob("*/checkpoint_manager_snapshot.json"):
            try:
                if json.loads(snapshot.read_text()).get("checkpoint_results"):
                    return
            except (OSError, ValueError):
                pass  # being written
        if proc.poll() is not None:
            pytest.fail(f"training ended before its first checkpoint:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.05)
    pytest.fail("no checkpoint appeared")


def marked_processes(marker: str, title: str) -> list[int]:
    """Pids of live processes started for this test (by environment marker) whose command line has `title`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if f"ALIGNLIB_TEST_MARK={marker}".encode() in environ and title in cmdline:
            found.append(int(entry.name))
    return found


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    checkpoint = json.loads((run / "train" / "manifest.json").read_text())["stats"]["checkpoint"]
    return _read_weights(Path(checkpoint) / "model")


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-6, f"weights differ by up to {worst}"


@pytest.fixture(scope="module")
def worker_killed(pairs_run, job_file, tmp_path_factory):
    """A run whose one Ray Train worker is SIGKILLed after the first checkpoint: (run dir, its output)."""
    run, marker = copy_pairs(pairs_run, tmp_path_factory.mktemp("worker") / "run"), uuid.uuid4().hex
    proc = start_training(job_file, run, marker)
    wait_for_checkpoint(run, proc)
    workers = marked_processes(marker, "RayTrainWorker")
    assert len(workers) == 1, workers
    os.kill(workers[0], signal.SIGKILL)
    return run, finish(proc), final_weights(run)


@pytest.fixture(scope="module")
def uninterrupted(worker_killed, job_file):
    """`alignlib train --force` on that finished run: training again from the start, uninterrupted."""
    run, _, _ = worker_killed
    out = finish(start_training(job_file, run, uuid.uuid4().hex, "--force"))
    return out, final_weights(run)


def test_force_trains_from_the_start_instead_of_resuming(uninterrupted):
    out, _ = uninterrupted
    assert "resuming" not in out and "epoch 1/8" in out, out[-3000:]


def test_killed_worker_is_restarted_from_the_last_checkpoint(worker_killed, uninterrupted):
    _, out, weights = worker_killed
    assert "resuming after epoch" in out, out[-3000:]
    assert_same_weights(weights, uninterrupted[1])


def test_killed_job_resumes_and_ends_like_an_uninterrupted_run(pairs_run, job_file, uninterrupted, tmp_path):
    run, marker = copy_pairs(pairs_run, tmp_path / "killed"), uuid.uuid4().hex
    proc = start_training(job_file, run, marker)
    wait_for_checkpoint(run, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for pid in marked_processes(marker, "ray"):  # Ray processes that left the process group
        os.kill(pid, signal.SIGKILL)
    assert not (run / "train" / "manifest.json").exists(), "the kill landed before training finished"

    out = finish(start_training(job_file, run, uuid.uuid4().hex))
    assert "resuming after epoch" in out, out[-3000:]
    assert_same_weights(final_weights(run), uninterrupted[1])
