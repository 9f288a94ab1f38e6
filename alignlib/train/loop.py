"""The training loop, run by every Ray Train worker; one loop for SFT, ORPO, DPO and IPO.

Each worker reads its shard (`ray.train.get_dataset_shard("train")`), tokenizes batches, runs
the policy over chosen (and rejected) completions, turns logits into sequence log-probs, and
hands them to the loss from `losses.py`. The loss's flags decide what the loop computes:
`paired` (a rejected side), `needs_reference` (reference log-probs, from the adapter-disabled
policy under LoRA or a frozen copy otherwise) and `average_logps` (length-averaged log-probs).
At each epoch end the backend saves a checkpoint and every worker reports it to Ray Train;
a rerun of the same run resumes from the last one.
"""

from __future__ import annotations

import inspect
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from alignlib.losses import get_loss, label_counts, sequence_logps


def _loss_kwargs(loss, knobs: dict) -> dict:
    accepted = inspect.signature(loss.fn).parameters
    return {k: v for k, v in knobs.items() if k in accepted}


def model_logps(model, batch, average: bool):
    """Sequence log-probs of every row of a collated batch under `model` (see `losses.sequence_logps`)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return sequence_logps(logits, batch["labels"], average=average)


def _reference_logps(backend, reference, batch, average: bool):
    if "ref_logps" in batch:  # precomputed sums, from the ref_logps stage or imported pairs
        ref = batch["ref_logps"]
        return ref / label_counts(batch["labels"]).clamp(min=1) if average else ref
    with torch.no_grad():
        if reference is not None:
            return model_logps(reference, batch, average)
        with backend.unwrapped.disable_adapter():
            return model_logps(backend.unwrapped, batch, average)


def _forward_loss(loss, knobs: dict, backend, reference, batch, n: int):
    """Policy (and reference) log-probs of one micro-batch -> the loss's per-example output."""
    logps = model_logps(backend.model, batch, loss.average_logps)
    args = {"policy_chosen_logps": logps[:n]}
    if loss.paired:
        args["policy_rejected_logps"] = logps[n:]
    if loss.needs_reference:
        ref = _reference_logps(backend, reference, batch, loss.average_logps)
        args.update(ref_chosen_logps=ref[:n], ref_rejected_logps=ref[n:])
    return loss.fn(**args, **knobs)


def reference_source(loss, lora: bool, precomputed: bool) -> str:
    """Where reference log-probs come from: precomputed columns, else the adapter-disabled policy, else a copy."""
    if not loss.needs_reference:
        return "none"
    if precomputed:
        return "precomputed"
    return "adapter-disabled" if lora else "frozen-copy"


def _say(message: str) -> None:
    # Ray Train patches print() in workers to both log and echo it, so every line came out twice.
    from alignlib.redaction import redact

    sys.__stdout__.write(redact(f"[alignlib] {message}") + "\n")
    sys.__stdout__.flush()


def _peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this worker: CUDA memory allocated on a GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _record(path: str, entry: dict) -> None:
    """Append one metrics line; the file lives in Ray Train's storage, so it survives a resume."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")


def train_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch

    from alignlib.models import load_tokenizer
    from alignlib.spec import JobSpec
    from alignlib.train.backends import make_backend
    from alignlib.train.data import collate, step_batches

    spec = JobSpec.model_validate(config["spec"])
    train = spec.train
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(spec.seed + rank)
    device = ray.train.torch.get_device() if train.backend.use_gpu else torch.device("cpu")

    loss = get_loss(train.loss.name)
    knobs = _loss_kwargs(loss, train.loss.model_dump(exclude={"name"}))
    tokenizer = load_tokenizer(spec.policy.model, spec.policy.chat_template, spec.policy.trust_remote_code)
    backend = make_backend(spec, config["total_steps"], device)
    model = backend.build()
    source = reference_source(loss, train.lora is not None, config.get("precomputed_reference", False))
    reference = backend.reference_model() if source == "frozen-copy" else None
    if rank == 0 and source != "none":
        _say(f"reference log-probs: {source}")

    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            backend.load(Path(directory))
            start_epoch = int((Path(directory) / "epoch").read_text()) + 1
        if rank == 0:
            _say(f"resuming after epoch {start_epoch} of {train.epochs} (optimizer step {backend.step_count})")

    shard = ray.train.get_dataset_shard("train")
    step_size = train.batch_size * train.grad_accum
    started = time.time()
    for epoch in range(start_epoch, train.epochs):
        model.train()
        epoch_started = time.time()
        totals: dict[str, float] = {}
        count = tokens = padded = 0
        steps = step_batches(shard.iter_rows(), step_size, train.batch_size, train.group_by_length,
                             seed=(spec.seed * 1_000_003 + epoch) * 1009 + rank)  # fmt: skip
        for micro_batches in steps:
            for examples in micro_batches:
                batch = collate(examples, tokenizer.pad_token_id, loss.paired)
                tokens += int(batch["attention_mask"].sum())  # counted on the CPU copy: no device sync
                padded += batch["attention_mask"].numel()
                batch = {k: v.to(device) for k, v in batch.items()}
                out = _forward_loss(loss, knobs, backend, reference, batch, len(examples))
                backend.backward(out.losses.mean())
                count += len(examples)
                for name, value in {"loss": out.losses.detach(), **out.metrics}.items():
                    totals[name] = totals.get(name, 0.0) + float(value.float().sum())
                stepped = backend.step()
            if stepped and rank == 0 and backend.step_count % train.log_every == 0:
                _record(config["metrics_path"], {"kind": "step", "epoch": epoch + 1, "step": backend.step_count,
                                                 "lr": backend.lr, "tokens": tokens,
                                                 **{k: v / count for k, v in totals.items()}})  # fmt: skip
                means = "  ".join(f"{k}={v / count:.4f}" for k, v in totals.items())
                _say(
                    f"epoch {epoch + 1}/{train.epochs}  step {backend.step_count}/{config['total_steps']}"
                    f"  {means}  lr={backend.lr:.2e}  {time.time() - started:.0f}s"
                )
        if epoch == train.epochs - 1:
            backend.finish()
        metrics = {f"train/{k}": v / max(1, count) for k, v in totals.items()}
        seconds = time.time() - epoch_started
        metrics.update(epoch=epoch + 1, step=backend.step_count, examples=count * world, tokens=tokens * world,
                       tokens_per_s=tokens * world / max(seconds, 1e-9), padding=1.0 - tokens / max(1, padded),
                       peak_memory_mb=_peak_memory_mb(device))  # fmt: skip
        if rank == 0:
            _record(config["metrics_path"], {"kind": "epoch", **metrics})
        with tempfile.TemporaryDirectory() as directory:
            backend.save(Path(directory), rank)
            if rank == 0:
                (Path(directory) / "epoch").write_text(str(epoch))
                tokenizer.save_pretrained(Path(directory) / "model")
            # Rank 0 holds the whole model (ZeRO-3 gathers it in save); under DeepSpeed every rank also has its
            # optimizer shard, and Ray Train merges the ranks' directories into one checkpoint.
            has_files = any(Path(directory).iterdir())
            checkpoint = ray.train.Checkpoint.from_directory(directory) if has_files else None
            ray.train.report(metrics, checkpoint=checkpoint)
