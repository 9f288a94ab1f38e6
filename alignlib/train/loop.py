"""The training loop, run by every Ray Train worker; one loop for SFT, ORPO, DPO, IPO, SimPO and reward models.

Each worker reads its shard (`ray.train.get_dataset_shard("train")`), tokenizes batches, runs
the policy over chosen (and rejected) completions, turns logits into sequence log-probs, and
hands them to the loss from `losses.py`. The loss's flags decide what the loop computes:
`paired` (a rejected side), `needs_reference` (reference log-probs, from the adapter-disabled
policy under LoRA or a frozen copy otherwise), `average_logps` (length-averaged log-probs) and `reward_head`
(a one-label sequence classifier's rewards instead of log-probs: reward-model training).
`Trainer.fit` runs the epochs: at each epoch end every worker saves its part of a checkpoint in the run's
layout (`checkpoints.py`), and a rerun of the same run resumes after the last one. Both launchers call it:
`train_loop` in Ray Train's workers, `single.TrainWorker` in the one-process actor.
"""

from __future__ import annotations

import functools
import inspect
import json
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from alignlib.locations import StorePath
from alignlib.losses import IGNORE_INDEX, get_loss, label_counts, sequence_logps
from alignlib.train import checkpoints


def _loss_kwargs(loss, knobs: dict) -> dict:
    accepted = inspect.signature(loss.fn).parameters
    return {k: v for k, v in knobs.items() if k in accepted}


def model_logps(model, batch, average: bool):
    """Sequence log-probs of every row of a collated batch under `model` (see `losses.sequence_logps`).

    Logits are computed only from the position before the batch's first labelled token on (transformers'
    `logits_to_keep`): the prompt's positions predict nothing that is scored, and the LM head and the
    log-softmax over the vocabulary are a large share of a step for a small model with a large vocabulary."""
    labels = batch["labels"]
    kwargs = {}
    if _keeps_logits(_base_model(model)):
        keep = batch[KEEP] if KEEP in batch else logits_keep(labels)
        if keep < labels.shape[1]:
            kwargs["logits_to_keep"] = keep
            labels = labels[:, -keep:]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs).logits
    return sequence_logps(logits, labels, average=average)


KEEP = "logits_keep"  # a batch's entry: how many positions, from the end, need logits


def logits_keep(labels) -> int:
    """Positions from the one before the first labelled column to the end (all of them if none is labelled).

    Read from the CPU copy of the labels by the training loop, so a GPU step does not wait on it."""
    labelled = (labels != IGNORE_INDEX).any(dim=0)
    return labels.shape[1] - int(labelled.float().argmax()) + 1 if bool(labelled.any()) else labels.shape[1]


def _base_model(model):
    """The Hugging Face model under DDP / DeepSpeed (`.module`) and peft (`get_base_model()`) wrappers."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@functools.cache
def _keeps_logits_of(model_class: type[Any]) -> bool:
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def _keeps_logits(model) -> bool:
    """Whether the model's forward takes `logits_to_keep` (transformers' causal LMs do; custom code may not)."""
    return _keeps_logits_of(type(model))  # type: ignore[arg-type]  # a class is hashable; functools' stub asks Hashable


def _reference_logps(backend, reference, batch, average: bool):
    if "ref_logps" in batch:  # precomputed sums, from the ref_logps stage
        ref = batch["ref_logps"]
        return ref / label_counts(batch["labels"]).clamp(min=1) if average else ref
    with torch.no_grad():
        if reference is not None:
            return model_logps(reference, batch, average)
        with backend.unwrapped.disable_adapter():
            return model_logps(backend.unwrapped, batch, average)


def model_rewards(model, batch):
    """``(2B,)`` float32 rewards of a collated batch's rows under a one-label sequence classifier: its logit at
    each row's last non-pad token (right padding, as `score.ModelScorer` reads them)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits[:, 0].float()


def _forward_loss(loss, knobs: dict, backend, reference, batch, n: int):
    """Policy (and reference) log-probs of one micro-batch -> the loss's per-example output; for a reward
    head, the rewards of the chosen and rejected rows (and the pairs' margins when collated)."""
    if loss.reward_head:
        rewards = model_rewards(backend.model, batch)
        margins = {"margins": batch["margins"]} if "margins" in batch else {}
        return loss.fn(chosen_rewards=rewards[:n], rejected_rewards=rewards[n:], **margins, **knobs)
    logps = model_logps(backend.model, batch, loss.average_logps)
    args = {"policy_chosen_logps": logps[:n]}
    if loss.paired:
        args["policy_rejected_logps"] = logps[n:]
    if loss.needs_reference:
        ref = _reference_logps(backend, reference, batch, loss.average_logps)
        args.update(ref_chosen_logps=ref[:n], ref_rejected_logps=ref[n:])
    return loss.fn(**args, **knobs)


def _say(message: str) -> None:
    # Ray Train patches print() in workers to both log and echo it, so every line came out twice.
    from alignlib.redaction import redact

    out = sys.__stdout__ or sys.stdout  # the process's real stdout; None only in a process started without one
    out.write(redact(f"[alignlib] {message}") + "\n")
    out.flush()


def _peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this worker: CUDA memory allocated on a GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _record(path: str, entry: dict) -> None:
    """Append one metrics line; the file lives in Ray Train's storage, so it survives a resume.

    An object store cannot append: there the file is rewritten whole (a few KB per step)."""
    from alignlib.uri import is_uri

    line = json.dumps(entry) + "\n"
    if is_uri(path):
        from alignlib.store import RemotePath

        remote = RemotePath(path)
        remote.write_text((remote.read_text() if remote.exists() else "") + line)
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(line)


class Trainer:
    """One worker's training state and its epoch body, usable with or without Ray Train.

    `train_loop` (inside Ray Train) builds one per worker, resumes it from a checkpoint and calls
    `train_epoch` on the worker's shard; tests and notebooks call `train_epoch` on rows in this process
    (`distributed=False`: no process group, no DDP wrapper), which is the same arithmetic to the bit.
    Rows are tokenized examples (`train.data.Tokenize`).
    """

    def __init__(
        self,
        spec,
        total_steps: int,
        device: torch.device | None = None,
        rank: int = 0,
        world: int = 1,
        distributed: bool = False,
        metrics_path: str | None = None,
    ):
        from alignlib.models import load_tokenizer
        from alignlib.spec import pair_margins, reference_source
        from alignlib.train.backends import make_backend

        self.spec, self.train = spec, spec.train
        self.rank, self.world = rank, world
        self.device = device or torch.device("cpu")
        self.metrics_path = metrics_path
        self.total_steps = total_steps
        torch.manual_seed(spec.seed + rank)
        self.loss = get_loss(self.train.loss.name)
        self.knobs = _loss_kwargs(self.loss, self.train.loss.model_dump(exclude={"name"}))
        self.margins = pair_margins(spec)  # train.loss.margin: the pairs' margins go to the loss, not a knob
        policy = spec.policy
        self.tokenizer = load_tokenizer(policy.model, policy.chat_template, policy.trust_remote_code)
        self.backend = make_backend(spec, total_steps, self.device, distributed=distributed)
        self.model = self.backend.build()
        self.reference_source = reference_source(spec)
        self.reference = self.backend.reference_model() if self.reference_source == "frozen-copy" else None
        self.started = time.time()

    def train_epoch(self, rows, epoch: int) -> dict[str, float]:
        """One pass over `rows` (epoch counts from 0); returns the epoch's metrics (means over its examples)."""
        from alignlib.train.data import collate, step_batches

        train, backend, loss = self.train, self.backend, self.loss
        self.model.train()
        epoch_started = time.time()
        totals: dict[str, float] = {}  # sums over the epoch
        since_log: dict[str, float] = {}  # sums since the last step line
        count = logged = tokens = padded = 0
        steps = step_batches(
            rows,
            train.batch_size * train.grad_accum,
            train.batch_size,
            train.group_by_length,
            seed=(self.spec.seed * 1_000_003 + epoch) * 1009 + self.rank,
        )
        for micro_batches in steps:
            if backend.step_count >= self.total_steps:  # train.max_steps reached mid-epoch
                break
            stepped = False
            for examples in micro_batches:
                batch = collate(
                    examples,
                    self.tokenizer.pad_token_id,
                    loss.paired,
                    with_reference=self.reference_source == "precomputed",
                    with_margins=self.margins,
                )
                tokens += int(batch["attention_mask"].sum())  # counted on the CPU copy: no device sync
                padded += batch["attention_mask"].numel()
                keep = logits_keep(batch["labels"])
                batch = {k: v.to(self.device) for k, v in batch.items()}
                batch[KEEP] = keep
                out = _forward_loss(loss, self.knobs, backend, self.reference, batch, len(examples))
                backend.backward(out.losses.mean())
                count += len(examples)
                for name, value in {"loss": out.losses.detach(), **out.metrics}.items():
                    value = float(value.float().sum())
                    totals[name] = totals.get(name, 0.0) + value
                    since_log[name] = since_log.get(name, 0.0) + value
                stepped = backend.step()
            if stepped and backend.step_count % train.log_every == 0:
                # The mean over the examples of the steps since the previous line (one step with log_every 1).
                means = {k: v / (count - logged) for k, v in since_log.items()}
                since_log, logged = {}, count
                if self.rank == 0:
                    self._step_line(epoch, tokens, means)
        if self.done(epoch):
            backend.finish()
        metrics = {f"train/{k}": v / max(1, count) for k, v in totals.items()}
        seconds = time.time() - epoch_started
        metrics.update(
            epoch=epoch + 1,
            step=backend.step_count,
            examples=count * self.world,
            tokens=tokens * self.world,
            tokens_per_s=tokens * self.world / max(seconds, 1e-9),
            padding=1.0 - tokens / max(1, padded),
            peak_memory_mb=_peak_memory_mb(self.device),
        )
        if self.rank == 0 and self.metrics_path:
            _record(self.metrics_path, {"kind": "epoch", **metrics})
        return metrics

    def save(self, directory: Path, epoch: int) -> None:
        """This worker's part of a checkpoint after `epoch`: the backend's files, and (rank 0) the epoch and
        the tokenizer beside the model, so the checkpoint's `model/` is a whole HF directory."""
        self.backend.save(directory, self.rank)
        if self.rank == 0:
            (directory / "epoch").write_text(str(epoch))
            self.tokenizer.save_pretrained(directory / "model")

    def resume(self, directory: Path) -> int:
        """Restore weights, optimizer and schedule from a checkpoint; returns the epoch to start from."""
        self.backend.load(directory)
        start = int((directory / "epoch").read_text()) + 1
        if self.rank == 0:
            _say(f"resuming after epoch {start} of {self.train.epochs} (optimizer step {self.backend.step_count})")
        return start

    def say_reference(self) -> None:
        if self.rank == 0 and self.reference_source != "none":
            _say(f"reference log-probs: {self.reference_source}")

    def done(self, epoch: int) -> bool:
        """Training ends with this epoch: the last one, or `train.max_steps` reached in it."""
        return checkpoints.last_epoch(epoch, self.backend.step_count, self.train.epochs, self.total_steps)

    def fit(
        self,
        run: StorePath,
        rows: Callable[[], Iterable[dict]],
        sync: Callable[[], None] | None = None,
        report: Callable[[dict], None] | None = None,
    ) -> None:
        """Every epoch still to train, from after the last checkpoint of `run` (a path or `RemotePath`), with a
        checkpoint after each; `rows()` gives an epoch's rows. `sync` waits for every worker (None: one process)
        and `report` receives each epoch's metrics."""
        start = checkpoints.resume(run, self)
        if start and self.done(start - 1):  # the run had ended; only its stage was not committed
            return
        for epoch in range(start, self.train.epochs):
            metrics = self.train_epoch(rows(), epoch)
            checkpoints.save(run, self, epoch, metrics, sync)
            if report is not None:
                report(metrics)
            if self.done(epoch):
                break

    def _step_line(self, epoch: int, tokens: int, means: dict[str, float]) -> None:
        backend = self.backend
        if self.metrics_path:
            _record(
                self.metrics_path,
                {
                    "kind": "step",
                    "epoch": epoch + 1,
                    "step": backend.step_count,
                    "lr": backend.lr,
                    "tokens": tokens,
                    **means,
                },
            )
        text = "  ".join(f"{k}={v:.4f}" for k, v in means.items())
        _say(
            f"epoch {epoch + 1}/{self.train.epochs}  step {backend.step_count}/{self.total_steps}  {text}"
            f"  lr={backend.lr:.2e}  {time.time() - self.started:.0f}s"
        )


def train_loop(config: dict) -> None:
    """Ray Train's per-worker function: build a `Trainer` and `fit` it on the worker's shard."""
    import ray.train
    import ray.train.collective
    import ray.train.torch

    from alignlib.spec import JobSpec
    from alignlib.store import location

    spec = JobSpec.model_validate(config["spec"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device() if spec.train.backend.use_gpu else torch.device("cpu")
    trainer = Trainer(
        spec, config["total_steps"], device, rank, world, distributed=True, metrics_path=config["metrics_path"]
    )
    trainer.say_reference()
    shard = ray.train.get_dataset_shard("train")
    # Rank 0 holds the whole model (ZeRO-3 gathers it in save); under DeepSpeed every rank also writes its
    # optimizer shard into the same checkpoint, so the ranks wait for each other around the writing.
    sync = ray.train.collective.barrier if world > 1 else None
    trainer.fit(location(config["run_dir"]), shard.iter_rows, sync=sync, report=ray.train.report)
