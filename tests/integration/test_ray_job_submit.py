"""`ray job submit` to a real Ray head on this machine, the way a cluster user runs alignlib.

cluster/local.sh-style head (token auth on, dashboard on 127.0.0.1, free ports, its own temp dir), then
`ray job submit --working-dir <repo> -- python -m alignlib run jobs/demo.yaml ...` with a smaller demo
(fewer prompts, one epoch, the transformers engine), waits for it, and checks what the job left in output_dir. The head is
always stopped, by pid, so other Ray instances on the machine are untouched.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as pads
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from local_ray import LocalHead, ray_executable  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration
PROMPTS = 40  # data.limit: a smaller demo; the split between train and eval comes from the seed


def rows(path: Path) -> int:
    return pads.dataset(str(path), format="parquet").count_rows()


def test_demo_runs_as_a_ray_job(tmp_path):
    out = tmp_path / "demo"
    env = {"ALIGNLIB_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1",
           # the job's `python` is the one that runs these tests
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}  # fmt: skip
    head = LocalHead(num_cpus=2, dashboard=True, env=env)
    try:
        head.start()
        head.wait_for_dashboard()
        submit = [
            ray_executable(), "job", "submit", "--address", head.dashboard_url, "--working-dir", str(ROOT),
            "--runtime-env-json", json.dumps({"excludes": [".venv/", "runs/", ".git/", "**/__pycache__/"]}),
            "--", "python", "-m", "alignlib", "run", "jobs/demo.yaml", f"output_dir={out}",
            # transformers engine: 4 vLLM engine starts (policy, weak, eval x2) would double the test's time
            f"data.limit={PROMPTS}", "train.epochs=1", "generate.engine=transformers",
        ]  # fmt: skip
        res = subprocess.run(submit, env=head.env, capture_output=True, text=True, timeout=1200)
        log = res.stdout + res.stderr
        assert res.returncode == 0, log[-5000:]
        assert re.search(r"Job 'raysubmit_\w+' succeeded", log), log[-3000:]
    finally:
        head.stop()
    # the job's own output, streamed back by `ray job submit`
    assert f"== alignlib job 'demo': outputs under {out}" in log
    # every stage wrote its manifest, and the tables hold the rows the manifests count
    manifests = {s: json.loads((out / s / "manifest.json").read_text()) for s in
                 ("prompts", "generate", "score", "pairs", "train", "export", "eval")}  # fmt: skip
    train, held = manifests["prompts"]["tables"]["train"], manifests["prompts"]["tables"]["eval"]
    assert train + held == PROMPTS and held >= 1
    assert manifests["generate"]["tables"]["completions"] == train * (4 + 1 + 1)  # 4 policy, 1 weak, gold
    assert rows(out / "generate" / "completions") == train * 6
    pairs = manifests["pairs"]["tables"]["pairs"]
    assert 0 < pairs <= 2 * train and rows(out / "pairs" / "pairs") == pairs  # <= 1 per prompt and strategy
    assert manifests["train"]["tables"]["metrics"] == 1  # one epoch
    model = out / "export" / "model"
    assert (model / "config.json").is_file() and list(model.glob("*.safetensors"))
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert summary["prompts"] == held and 0 <= summary["win_rate"] <= 1
    assert manifests["train"]["versions"]["ray"].startswith("2.60")
