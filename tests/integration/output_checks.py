"""Checks on a finished run's output directory, shared by the integration tests that make one."""

from __future__ import annotations

from pathlib import Path

from alignlib.stages import NAMES as STAGES

# What a stage directory may hold: tables, manifests and reports, safetensors weights, and the
# tokenizer/config text files a Hugging Face model directory carries. Never a pickle (.bin, .pt, .pkl).
SAFE_SUFFIXES = {".parquet", ".json", ".html", ".safetensors", ".jinja", ".txt", ".model", ".md"}


def unsafe_stage_files(run: Path) -> list[str]:
    """Files under the stage directories of `run` in a format other than SAFE_SUFFIXES.

    Training checkpoints live outside the stage directories (`train-ray/`, both launchers' storage):
    they are the job's own files for resuming, and hold the optimizer state as `state.pt`.
    """
    found = []
    for stage in STAGES:
        for path in sorted((run / stage).rglob("*")):
            if path.is_file() and path.suffix not in SAFE_SUFFIXES:
                found.append(str(path.relative_to(run)))
    return found
