"""Kill training for real and run it again: the result equals an uninterrupted run.

The pairs are the session's small job (conftest: the real pipeline, transformers engine, tiny reward model).
Training then runs as `alignlib train JOB.yaml` in its own process group, two ways on the same pairs:

- one Ray Train worker killed after the first checkpoint: Ray Train restarts the worker group from
  that checkpoint (`train.max_failures: 1`) and the same command finishes;
- then `alignlib train --force` on that finished run: it trains again from the start instead of resuming,
  uninterrupted, and is the reference the interrupted run is compared with.

Both must end on the same weights. The whole job killed (SIGKILL to its process group, as when a pod is
evicted) after its first checkpoint and run again is test_rounds' kill, in round 2 of a two-round job.
"""

import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from processes import assert_same_weights, finish, marked_processes, wait_for_checkpoint, weights_of  # noqa: E402

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


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return weights_of(run / "train")


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
