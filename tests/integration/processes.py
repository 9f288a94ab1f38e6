"""Helpers for tests that run `alignlib` in its own process group and kill it (or one of its workers) for real."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import torch

from alignlib.train.backends import _read_weights


def _listing(run: Path) -> dict[Path, bool]:
    """Each training run under `run/train-ray` (every round's runs live there): whether it lists a checkpoint.

    Both launchers list a checkpoint in the run's index (`alignlib.train.checkpoints.INDEX`) once it is whole, not
    merely being written."""
    from alignlib.train.checkpoints import INDEX

    found = {}
    for listing in (run / "train-ray").glob(f"*/{INDEX}"):
        try:
            found[listing.parent] = bool(json.loads(listing.read_text()).get("checkpoints"))
        except (OSError, ValueError):
            found[listing.parent] = False  # being written
    return found


def wait_for_checkpoint(run: Path, proc: subprocess.Popen, timeout: float = 600, after: Path | None = None) -> None:
    """Until a training run under `run/train-ray` has listed a checkpoint; with `after`, a checkpoint of a
    training run that started after that file appeared (a later round's)."""
    deadline, earlier = time.time() + timeout, None
    while time.time() < deadline:
        if after is not None and earlier is None:
            if not after.exists():
                _check_alive(proc)
                time.sleep(0.05)
                continue
            earlier = set(_listing(run))
        if any(listed for parent, listed in _listing(run).items() if not (earlier and parent in earlier)):
            return
        _check_alive(proc)
        time.sleep(0.05)
    pytest.fail("no checkpoint appeared")


def _check_alive(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        log = getattr(proc, "log", None)  # the process's output file, when it writes to one
        text = log.read_text() if log is not None else proc.stdout.read() if proc.stdout else ""
        pytest.fail(f"training ended before its first checkpoint:\n{text[-3000:]}")


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


def weights_of(train_stage: Path) -> dict[str, torch.Tensor]:
    """The final weights of a train stage's run (its manifest names the checkpoint)."""
    checkpoint = json.loads((train_stage / "manifest.json").read_text())["stats"]["checkpoint"]
    return _read_weights(Path(checkpoint) / "model")


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-6, f"weights differ by up to {worst}"
