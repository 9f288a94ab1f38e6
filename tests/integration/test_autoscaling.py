"""Autoscaling on one machine: the generate stage asks for more engine actors than the cluster has, and
the Ray autoscaler adds worker nodes for them and removes them once idle (Ray's fake multi-node provider).

This is the property the KubeRay deployment relies on: a stage never refuses to start because the GPUs
(here: nodes with an `engine` resource) are not there yet. The scenario needs a Ray head of its own, so it
runs as a script in a subprocess, apart from the session's `ray.init()`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from local_ray import stop_processes  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SCENARIO = Path(__file__).with_name("autoscaling_scenario.py")
pytestmark = pytest.mark.integration


def test_generate_adds_worker_nodes_and_releases_them(tmp_path):
    temp_dir = tempfile.mkdtemp(prefix="alr-", dir="/tmp")  # short: Ray's socket paths live under it
    env = {
        **os.environ,
        "ALIGNLIB_CACHE": str(tmp_path / "cache"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    try:
        res = subprocess.run(
            [sys.executable, str(SCENARIO), str(tmp_path / "run"), temp_dir],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
    finally:
        stop_processes([temp_dir])  # whatever the scenario left if it failed or timed out
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    result = json.loads(res.stdout.strip().splitlines()[-1])
    # every train prompt got its 2 policy samples: the stage ran to the end
    assert result["train_prompts"] >= 10 and result["completions"] == 2 * result["train_prompts"]
    assert result["workers_before"] == 0, "the cluster starts with the head only (0 CPUs, like the KubeRay head)"
    assert result["max_workers"] == 2 and result["engine_total"] == 2, "two engine nodes at once for 2 actors"
    assert result["workers_after"] == 0, f"idle nodes were not released: {result}"
    # On a cluster nothing is refused, but the user is told once, up front, what waits for the autoscaler.
    waiting = [line for line in res.stdout.splitlines() if "will wait for the autoscaler to add nodes" in line]
    assert len(waiting) == 1, res.stdout[-3000:]
    assert "generate: asks for 1 CPU, 1 engine (generate.resources); the cluster has 0 CPU, 0 engine now" in waiting[0]
    print(f"autoscaling: {result}")
