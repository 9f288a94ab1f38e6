"""A real job run with secrets in its environment leaves them nowhere: not on stdout/stderr, not on disk.

The CLI runs prompts to export (transformers engine, 16 prompts, SFT; eval off to keep it near 2 minutes
on a busy 2-core machine) in its own process with
HF_TOKEN, AWS_SECRET_ACCESS_KEY, WANDB_API_KEY and a password set, as a cluster job would have them;
then every byte it printed and every file under its output directory is searched for the values.
The same run's stage directories must hold no pickle-format file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from output_checks import unsafe_stage_files  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration

SECRETS = {
    "HF_TOKEN": "hf_integrationFAKEtoken0042",
    "AWS_SECRET_ACCESS_KEY": "aws-integration-FAKE-secret-0042",
    "WANDB_API_KEY": "wandb-integration-FAKE-key-0042",
    "ALIGNLIB_DB_PASSWORD": "integration-FAKE-password-0042",
}

JOB = {
    "name": "secrets",
    "seed": 0,
    "data": {
        "path": str(ROOT / "jobs/data/addition.jsonl"),
        "prompt_field": "question",
        "reference_field": "answer",
        "eval_fraction": 0.25,
        "limit": 16,
    },
    "policy": {"model": "builtin:tiny-policy"},
    "generate": {
        "engine": "transformers",
        "num_samples": 2,
        "max_new_tokens": 4,
        "batch_size": 64,
        "concurrency": 1,
        "resources": {"CPU": 1},
    },
    "score": {"reward": {"type": "function", "function": "alignlib.rewards:numeric_closeness"}},
    "pairs": {"strategy": "best_vs_worst", "include_truncated": True},
    "train": {
        "loss": {"name": "sft"},
        "backend": {"name": "ddp", "num_workers": 1, "use_gpu": False},
        "epochs": 1,
        "batch_size": 8,
        "max_length": 32,
    },
    "eval": {"enabled": False},
}


def test_a_run_writes_no_secret_and_no_pickle(model_cache, tmp_path):
    run = tmp_path / "run"
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({**JOB, "output_dir": str(run)}))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, as a user starts it
    env.update(SECRETS, PYTHONPATH=str(ROOT), ALIGNLIB_CACHE=str(model_cache), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "alignlib", "run", str(spec)], capture_output=True, cwd=tmp_path,
                          env=env, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-4000:]
    assert b"trained model (full)" in done.stdout, "the run went through export"

    leaks = [(name, where) for name, value in SECRETS.items()
             for where, data in (("stdout", done.stdout), ("stderr", done.stderr)) if value.encode() in data]  # fmt: skip
    files = [p for p in run.rglob("*") if p.is_file()]
    assert len(files) > 20, "the scan covers the stage outputs and Ray Train's checkpoints"
    leaks += [
        (name, str(p.relative_to(run))) for p in files for name, v in SECRETS.items() if v.encode() in p.read_bytes()
    ]
    assert not leaks, f"secret values found: {leaks}"

    assert unsafe_stage_files(run) == []
    assert list((run / "export" / "model").glob("*.safetensors"))
