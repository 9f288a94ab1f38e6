"""ORPO training throughput, loss and memory: alignlib (Ray Train, DDP backend) vs TRL's ORPOTrainer.

What is measured
    One run trains ORPO twice with the same model, data and hyperparameters and prints a markdown
    table with alignlib/TRL ratios:

    (a) alignlib: `alignlib.train.launch.run_training` with backend ddp, 1 worker, use_gpu false,
        loss orpo (lambda_), full fine-tuning (no LoRA), torch AdamW, constant lr, no warmup,
        weight decay 0, grad-norm clip 1.0, grad_accum 1, fp32 on CPU.
    (b) TRL: `trl.experimental.orpo.ORPOTrainer` (ORPOConfig.beta is ORPO's lambda) with the same
        settings: `optim="adamw_torch"`, `lr_scheduler_type="constant"`, same lr, batch size,
        epochs and max_length, no gradient accumulation, no gradient checkpointing, fp32 on CPU,
        sequential sampler, no eval, no intermediate saving, `report_to="none"`.

    Both start from the same built-in tiny policy directory (`builtin:tiny-policy`, built fresh
    under a temporary ALIGNLIB_CACHE) and see the same synthetic arithmetic pairs
    ("What is a + b?" -> chosen: the right sum, rejected: a wrong sum), in the same order. TRL is
    given string data: the prompt pre-rendered with the policy's chat template (exactly the text
    alignlib renders), chosen/rejected as plain answers; both then append EOS. TRL also prepends
    the tokenizer's BOS token to every prompt, which alignlib does not do, so by default the TRL
    tokenizer copy has `bos_token = None`: both libraries then train on identical token ids (the
    cross-check verifies this). `--trl-bos` keeps TRL's BOS behaviour.

    For each side:
      - wall-clock of the whole training call. alignlib: `run_training(...)`, i.e. Ray Train
        controller and worker start-up, process group, model load, per-batch tokenization,
        training, a checkpoint per epoch and teardown (Ray itself is started before, untimed).
        TRL: model load + `ORPOTrainer(...)` (which tokenizes the dataset) + `train()` +
        `save_model()`; imports are not timed on either side (the Ray worker's are).
      - steady state: time from the end of the first optimizer step to the end of the last one
        (alignlib: arrival time of each per-step line of its metrics file, `log_every=1`, polled
        every 5 ms by the driver; TRL: a `TrainerCallback.on_step_end`), and examples/s over it.
      - final training loss, the mean over the examples of the last epoch, under alignlib's ORPO
        definition L = NLL + lambda * L_OR, NLL = -(mean log-prob of the chosen *completion*
        tokens), averaged per example. TRL's own loss uses a different NLL: cross-entropy over
        *prompt and completion* tokens of the chosen sequence, averaged over all tokens of the
        batch. Both numbers are shown for TRL (the alignlib-definition value is rebuilt from TRL's
        per-step metrics `logps/chosen` and `log_odds_ratio`). The odds-ratio term is the same in
        both (length-averaged completion log-probs; alignlib caps log P at -1e-6, TRL does not).
      - peak RSS (ru_maxrss) of the training process: alignlib's Ray Train worker (reported by a
        Ray `worker_process_setup_hook` thread), TRL's training subprocess.
    A correctness cross-check runs both losses on the first batch with the initial weights and
    decomposes the gap into the NLL definitions. A diagnostic also times alignlib's per-batch work
    (tokenize, collate, forward, loss, backward, clip, AdamW) in-process without Ray, to separate
    compute from Ray Train / Ray Data overhead in the worker's step time.

Threads
    Each training process uses 1 torch thread: OMP_NUM_THREADS=MKL_NUM_THREADS=1 is set in this
    process before `ray.init` and in Ray's runtime_env env_vars (torch reads it at import, so the
    Ray Train worker runs with 1 intra-op thread; the setup hook reports `torch.get_num_threads()`
    from inside the worker), and the TRL subprocess gets the same environment and also calls
    `torch.set_num_threads(1)`. The table prints the thread count each training process saw.

Run (about 1-2 minutes on a 2-core CPU at the defaults)
    cd /work/main && .venv/bin/python benchmarks/train_orpo_vs_trl.py
    cd /work/main && .venv/bin/python benchmarks/train_orpo_vs_trl.py --pairs 400 --epochs 3 --batch-size 8
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
THREADS = 1
THREAD_ENV = {"OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)}


# --------------------------------------------------------------------------------------------
# data and shared settings
# --------------------------------------------------------------------------------------------
def make_rows(n: int, seed: int) -> list[dict]:
    """alignlib pairs rows: "What is a + b?" with the right sum chosen and a near miss rejected."""
    from alignlib import schema as S

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randrange(50), rng.randrange(50)
        wrong = a + b + rng.choice([d for d in (-3, -2, -1, 1, 2, 3) if a + b + d >= 0])
        prompt = f"What is {a} + {b}?"
        rows.append({
            S.PROMPT_ID: f"p{i}", S.PROMPT: prompt, S.MESSAGES: [{"role": "user", "content": prompt}],
            S.CHOSEN: str(a + b), S.REJECTED: str(wrong), S.CHOSEN_REWARD: 1.0, S.REJECTED_REWARD: 0.0,
            S.MARGIN: 1.0, S.STRATEGY: "gold_vs_weak", S.CHOSEN_GENERATOR: "reference",
            S.REJECTED_GENERATOR: "weak",
        })  # fmt: skip
    return rows


def steps_per_epoch(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)


def batch_sizes(n: int, batch_size: int, epochs: int) -> list[int]:
    """Examples in each optimizer step, in order (the last batch of an epoch may be short)."""
    per_epoch = [min(batch_size, n - i) for i in range(0, n, batch_size)]
    return per_epoch * epochs


def trl_tokenizer(model_dir: str, keep_bos: bool):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not keep_bos:
        # alignlib never prepends BOS (the chat template does not emit one); TRL's ORPO tokenization
        # prepends `bos_token_id` whenever it is set. Unsetting it gives both the same token ids.
        tokenizer.bos_token = None
    return tokenizer


def trl_string_rows(tokenizer, rows: list[dict]) -> list[dict]:
    """Prompt rendered with the chat template (the text alignlib tokenizes); plain answers."""
    return [
        {
            "prompt": tokenizer.apply_chat_template(
                [{"role": m["role"], "content": m["content"]} for m in row["messages"]],
                add_generation_prompt=True,
                tokenize=False,
            ),
            "chosen": row["chosen"],
            "rejected": row["rejected"],
        }
        for row in rows
    ]


def make_trl_trainer(model, tokenizer, string_rows: list[dict], cfg: dict, output_dir: str, callbacks=None):
    from datasets import Dataset
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    config = ORPOConfig(
        output_dir=output_dir,
        beta=cfg["lambda_"],
        learning_rate=cfg["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        per_device_train_batch_size=cfg["batch_size"],
        gradient_accumulation_steps=1,
        num_train_epochs=cfg["epochs"],
        max_length=cfg["max_length"],
        gradient_checkpointing=False,
        bf16=False,
        fp16=False,
        use_cpu=True,
        seed=cfg["seed"],
        data_seed=cfg["seed"],
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        dataloader_drop_last=False,
        remove_unused_columns=False,
        logging_steps=1,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    return ORPOTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(string_rows),
        processing_class=tokenizer,
        callbacks=callbacks,
    )


# --------------------------------------------------------------------------------------------
# (b) TRL, in its own process so its peak RSS and thread settings are its own
# --------------------------------------------------------------------------------------------
def trl_child(cfg_path: str) -> None:
    cfg = json.loads(Path(cfg_path).read_text())
    import torch

    torch.set_num_threads(THREADS)
    from transformers import AutoModelForCausalLM, TrainerCallback

    step_ends: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step_ends.append(time.perf_counter())

    rows = json.loads(Path(cfg["rows_path"]).read_text())
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(cfg["model_dir"], dtype=torch.float32)
    tokenizer = trl_tokenizer(cfg["model_dir"], cfg["trl_bos"])
    trainer = make_trl_trainer(
        model, tokenizer, trl_string_rows(tokenizer, rows), cfg, cfg["output_dir"], callbacks=[StepTimes()]
    )
    t_built = time.perf_counter()
    trainer.train()
    t_trained = time.perf_counter()
    trainer.save_model(str(Path(cfg["output_dir"]) / "final"))
    t_end = time.perf_counter()
    result = {
        "total_s": t_end - t0,
        "build_s": t_built - t0,
        "train_s": t_trained - t_built,
        "step_ends": [t - t0 for t in step_ends],
        "log_history": trainer.state.log_history,
        "global_step": trainer.state.global_step,
        "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "torch_threads": torch.get_num_threads(),
    }
    Path(cfg["result_path"]).write_text(json.dumps(result))


def run_trl(cfg: dict, workdir: Path) -> dict:
    cfg_path = workdir / "trl-config.json"
    cfg_path.write_text(json.dumps(cfg))
    env = {**os.environ, **THREAD_ENV, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    log = workdir / "trl-child.log"
    with open(log, "w") as out:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--_trl-child", str(cfg_path)],
            env=env, stdout=out, stderr=subprocess.STDOUT, cwd=str(REPO),
        )  # fmt: skip
    if proc.returncode != 0:
        sys.stderr.write(log.read_text()[-6000:])
        raise SystemExit(f"TRL training subprocess failed (rc={proc.returncode}); log: {log}")
    return json.loads(Path(cfg["result_path"]).read_text())


# --------------------------------------------------------------------------------------------
# (a) alignlib through Ray Train
# --------------------------------------------------------------------------------------------
def _ray_worker_probe() -> None:
    """Ray worker_process_setup_hook: a thread reporting this process's title, peak RSS and torch threads."""
    import os
    import resource
    import sys
    import threading
    import time

    out_dir = os.environ.get("ALIGNLIB_BENCH_PROBE_DIR")
    if not out_dir:
        return

    def report():
        while True:
            try:
                with open("/proc/self/cmdline", "rb") as f:
                    title = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
                torch = sys.modules.get("torch")
                info = {
                    "pid": os.getpid(),
                    "title": title,
                    "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                    "torch_threads": torch.get_num_threads() if torch is not None else None,
                    "omp": os.environ.get("OMP_NUM_THREADS"),
                }
                tmp = os.path.join(out_dir, f".{os.getpid()}.tmp")
                with open(tmp, "w") as f:
                    f.write(__import__("json").dumps(info))
                os.replace(tmp, os.path.join(out_dir, f"{os.getpid()}.json"))
            except Exception:
                pass
            time.sleep(0.25)

    threading.Thread(target=report, name="alignlib-bench-probe", daemon=True).start()


class FileTail(threading.Thread):
    """Polls a JSONL file and stamps each new line with its arrival time (perf_counter)."""

    def __init__(self, path: Path, interval: float = 0.005):
        super().__init__(daemon=True)
        self.path, self.interval = path, interval
        self.lines: list[tuple[float, dict]] = []
        self._stop_event = threading.Event()
        self._offset = 0
        self._partial = ""

    def _poll(self) -> None:
        try:
            with open(self.path) as f:
                f.seek(self._offset)
                chunk = f.read()
                self._offset = f.tell()
        except FileNotFoundError:
            return
        if not chunk:
            return
        now = time.perf_counter()
        text = self._partial + chunk
        *complete, self._partial = text.split("\n")
        for line in complete:
            if line.strip():
                self.lines.append((now, json.loads(line)))

    def run(self) -> None:
        while not self._stop_event.is_set():
            self._poll()
            time.sleep(self.interval)
        self._poll()

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def run_alignlib(cfg: dict, rows: list[dict], workdir: Path) -> dict:
    import ray

    from alignlib.spec import parse_spec
    from alignlib.train.launch import metrics_path, read_metrics, run_training

    probe_dir = workdir / "ray-probes"
    probe_dir.mkdir()
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={
            "env_vars": {**THREAD_ENV, "ALIGNLIB_CACHE": os.environ["ALIGNLIB_CACHE"],
                         "ALIGNLIB_BENCH_PROBE_DIR": str(probe_dir), "TOKENIZERS_PARALLELISM": "false"},
            "worker_process_setup_hook": _ray_worker_probe,
        },
    )  # fmt: skip
    try:
        ray.data.DataContext.get_current().execution_options.preserve_order = True
        dataset = ray.data.from_items(rows).materialize()
        run_name = "orpo-bench"
        spec = parse_spec({
            "name": run_name, "output_dir": str(workdir / "alignlib-out"), "seed": cfg["seed"],
            "data": {"path": "unused.jsonl"}, "eval": {"enabled": False},
            "policy": {"model": "builtin:tiny-policy", "dtype": "float32"},
            "train": {
                "loss": {"name": "orpo", "lambda_": cfg["lambda_"]},
                "backend": {"name": "ddp", "num_workers": 1, "use_gpu": False},
                "lora": None, "epochs": cfg["epochs"], "lr": cfg["lr"], "schedule": "constant",
                "warmup_ratio": 0.0, "weight_decay": 0.0, "max_grad_norm": 1.0,
                "batch_size": cfg["batch_size"], "grad_accum": 1, "max_length": cfg["max_length"],
                "gradient_checkpointing": False, "log_every": 1,
            },
        })  # fmt: skip
        path = metrics_path(spec, run_name)
        tail = FileTail(path)
        tail.start()
        t0 = time.perf_counter()
        result = run_training(spec, dataset, len(rows), run_name=run_name)
        t_end = time.perf_counter()
        tail.stop()
        if result.error is not None:
            raise SystemExit(f"alignlib training failed: {result.error}")
        epochs, steps = read_metrics(path)
        time.sleep(0.6)  # let the probe threads write their last sample
        probes = [json.loads(p.read_text()) for p in probe_dir.glob("*.json")]
    finally:
        ray.shutdown()
    step_times = {e["step"]: t - t0 for t, e in tail.lines if e.get("kind") == "step"}
    workers = [p for p in probes if "RayTrainWorker" in p["title"]]
    return {
        "total_s": t_end - t0,
        "step_ends": [step_times[s] for s in sorted(step_times)],
        "epochs": epochs,
        "steps": steps,
        "num_steps": steps[-1]["step"] if steps else 0,
        "worker_maxrss_kb": max((p["maxrss_kb"] for p in workers), default=None),
        "worker_threads": sorted({p["torch_threads"] for p in workers if p["torch_threads"] is not None}),
        "worker_titles": sorted({p["title"] for p in workers}),
        "all_ray_workers_maxrss_kb": sum(p["maxrss_kb"] for p in probes),
        "num_ray_workers": len(probes),
    }


# --------------------------------------------------------------------------------------------
# correctness cross-check: both losses on the first batch with the initial weights
# --------------------------------------------------------------------------------------------
def cross_check(cfg: dict, rows: list[dict], workdir: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from alignlib.losses import IGNORE_INDEX, orpo_loss, sequence_logps
    from alignlib.models import load_tokenizer
    from alignlib.train.data import collate, encode_rows

    torch.set_num_threads(THREADS)
    model_dir, lam, bsz = cfg["model_dir"], cfg["lambda_"], cfg["batch_size"]
    batch_rows = rows[:bsz]

    # alignlib: exactly what its training loop computes for this batch
    tok = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    examples = encode_rows(tok, batch_rows, paired=True, max_length=cfg["max_length"])
    batch = collate(examples, tok.pad_token_id, paired=True)
    n = len(examples)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        avg = sequence_logps(logits, batch["labels"], average=True)
        out = orpo_loss(avg[:n], avg[n:], lambda_=lam)
        labels_c = batch["labels"][:n]
        completion_tokens = int((labels_c[:, 1:] != IGNORE_INDEX).sum())
        nll_completion_pooled = -float(sequence_logps(logits[:n], labels_c).sum()) / completion_tokens
        full = torch.where(batch["attention_mask"][:n] == 1, batch["input_ids"][:n], IGNORE_INDEX)
        full_tokens = int((full[:, 1:] != IGNORE_INDEX).sum())
        nll_full_pooled = -float(sequence_logps(logits[:n], full).sum()) / full_tokens

    # TRL: its own tokenization, collator and loss, through ORPOTrainer's public methods
    trl_tok = trl_tokenizer(model_dir, cfg["trl_bos"])
    trl_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = make_trl_trainer(
        trl_model, trl_tok, trl_string_rows(trl_tok, batch_rows), cfg, str(workdir / "trl-crosscheck")
    )
    trl_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(n)])
    trainer.model.eval()
    with torch.no_grad():
        trl_loss, trl_metrics = trainer.get_batch_loss_metrics(trainer.model, trl_batch, train_eval="train")

    def ids(tensor, mask):
        return [row[m.bool()].tolist() for row, m in zip(tensor, mask, strict=True)]

    a_chosen = [e["prompt"] + e["chosen"] for e in examples]
    a_rejected = [e["prompt"] + e["rejected"] for e in examples]
    t_chosen = ids(trl_batch["chosen_input_ids"], trl_batch["chosen_attention_mask"])
    t_rejected = ids(trl_batch["rejected_input_ids"], trl_batch["rejected_attention_mask"])
    a_scored = [len(e["chosen"]) for e in examples]
    t_scored = [int((lab != -100).sum()) for lab in trl_batch["chosen_labels"]]
    return {
        "batch_size": n,
        "same_token_ids": a_chosen == t_chosen and a_rejected == t_rejected,
        "same_completion_lengths": a_scored == t_scored,
        "example_alignlib_ids": a_chosen[0],
        "example_trl_ids": t_chosen[0],
        "alignlib_loss": float(out.losses.mean()),
        "alignlib_nll": float(out.metrics["sft_loss"].mean()),
        "alignlib_or": float(out.metrics["or_loss"].mean()),
        "nll_completion_token_pooled": nll_completion_pooled,
        "nll_prompt_and_completion_token_pooled": nll_full_pooled,
        "trl_loss": float(trl_loss),
        "trl_nll": trl_metrics["nll_loss"],
        "trl_or": -trl_metrics["log_odds_ratio"],  # TRL logs mean(logsigmoid(log odds ratio))
        "trl_nll_alignlib_definition": -trl_metrics["logps/chosen"],
        "trl_loss_alignlib_definition": -trl_metrics["logps/chosen"] - lam * trl_metrics["log_odds_ratio"],
        "prompt_tokens_in_trl_nll": full_tokens - completion_tokens,
        "completion_tokens": completion_tokens,
    }


def loop_body_ms(cfg: dict, rows: list[dict]) -> float:
    """Median ms of alignlib's per-batch work for one epoch in this process, without Ray (a diagnostic)."""
    import torch
    from transformers import AutoModelForCausalLM

    from alignlib.losses import orpo_loss, sequence_logps
    from alignlib.models import load_tokenizer
    from alignlib.train.data import collate, encode_rows

    torch.set_num_threads(THREADS)
    torch.manual_seed(cfg["seed"])
    tok = load_tokenizer(cfg["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(cfg["model_dir"], dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.0)
    times = []
    for i in range(0, len(rows), cfg["batch_size"]):
        t0 = time.perf_counter()
        examples = encode_rows(tok, rows[i : i + cfg["batch_size"]], paired=True, max_length=cfg["max_length"])
        batch = collate(examples, tok.pad_token_id, paired=True)
        n = len(examples)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logps = sequence_logps(logits, batch["labels"], average=True)
        orpo_loss(logps[:n], logps[n:], lambda_=cfg["lambda_"]).losses.mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


# --------------------------------------------------------------------------------------------
# summaries and report
# --------------------------------------------------------------------------------------------
def steady_state(step_ends: list[float], sizes: list[int]) -> tuple[float | None, float | None]:
    """(seconds from the end of step 1 to the end of the last step, examples/s over them)."""
    if len(step_ends) < 2 or len(step_ends) != len(sizes):
        return None, None
    seconds = step_ends[-1] - step_ends[0]
    return seconds, sum(sizes[1:]) / seconds if seconds > 0 else None


def median_step_ms(step_ends: list[float], per_epoch: int) -> float | None:
    """Median time between consecutive steps of the same epoch (epoch boundaries left out), in ms."""
    gaps = [step_ends[i] - step_ends[i - 1] for i in range(1, len(step_ends)) if i % per_epoch != 0]
    return statistics.median(gaps) * 1000 if gaps else None


def boundary_ms(step_ends: list[float], per_epoch: int) -> float | None:
    """Mean time between the last step of an epoch and the first of the next, in ms."""
    gaps = [step_ends[i] - step_ends[i - 1] for i in range(per_epoch, len(step_ends), per_epoch)]
    return sum(gaps) / len(gaps) * 1000 if gaps else None


def trl_epoch_means(log_history: list[dict], sizes: list[int], per_epoch: int, lam: float) -> dict:
    steps = [h for h in log_history if "nll_loss" in h and "loss" in h]
    last = steps[-per_epoch:]
    weights = sizes[-per_epoch:]
    total = sum(weights)

    def mean(fn):
        return sum(fn(h) * w for h, w in zip(last, weights, strict=True)) / total

    return {
        "loss_alignlib_def": mean(lambda h: -h["logps/chosen"] - lam * h["log_odds_ratio"]),
        "nll_alignlib_def": mean(lambda h: -h["logps/chosen"]),
        "or": mean(lambda h: -h["log_odds_ratio"]),
        "loss_own": mean(lambda h: h["nll_loss"] - lam * h["log_odds_ratio"]),
        "loss_own_logged": mean(lambda h: h["loss"]),
        "nll_own": mean(lambda h: h["nll_loss"]),
        "first_step_loss_own": steps[0]["nll_loss"] - lam * steps[0]["log_odds_ratio"] if steps else None,
        "first_step_loss_alignlib_def": (
            -steps[0]["logps/chosen"] - lam * steps[0]["log_odds_ratio"] if steps else None
        ),
    }


def fmt(x, digits=3):
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def ratio(a, b, digits=2):
    if a is None or b is None or b == 0:
        return "n/a"
    return f"{a / b:.{digits}f}"


def report(args, cfg, a, t, check, body, n_examples, wall_total, command) -> None:
    sizes = batch_sizes(args.pairs, args.batch_size, args.epochs)
    per_epoch = steps_per_epoch(args.pairs, args.batch_size)
    a_ss, a_ss_rate = steady_state(a["step_ends"], sizes)
    t_ss, t_ss_rate = steady_state(t["step_ends"], sizes)
    last_epoch = a["epochs"][-1]
    tm = trl_epoch_means(t["log_history"], sizes, per_epoch, args.lambda_)
    mib = 1024.0
    a_rss = a["worker_maxrss_kb"] / mib if a["worker_maxrss_kb"] else None
    t_rss = t["maxrss_kb"] / mib

    rows = [
        ("optimizer steps", a["num_steps"], t["global_step"], None),
        ("wall-clock, whole training call (s)", a["total_s"], t["total_s"], "lower is better"),
        ("examples/s, whole call", n_examples / a["total_s"], n_examples / t["total_s"], "higher is better"),
        ("steady state, end of step 1 -> last step (s)", a_ss, t_ss, "lower is better"),
        ("examples/s, steady state", a_ss_rate, t_ss_rate, "higher is better"),
        ("ms per optimizer step, steady state",
         a_ss * 1000 / (len(sizes) - 1) if a_ss else None, t_ss * 1000 / (len(sizes) - 1) if t_ss else None, None),
        ("median ms per step within an epoch", median_step_ms(a["step_ends"], per_epoch),
         median_step_ms(t["step_ends"], per_epoch), "epoch boundaries left out"),
        ("mean ms across an epoch boundary", boundary_ms(a["step_ends"], per_epoch),
         boundary_ms(t["step_ends"], per_epoch), "alignlib: checkpoint + report there"),
        ("start-up: call start -> end of step 1 (s)", a["step_ends"][0] if a["step_ends"] else None,
         t["step_ends"][0] if t["step_ends"] else None, None),
        ("teardown: end of last step -> call returns (s)",
         a["total_s"] - a["step_ends"][-1] if a["step_ends"] else None,
         t["total_s"] - t["step_ends"][-1] if t["step_ends"] else None, None),
        ("last-epoch mean loss, alignlib definition", last_epoch["train/loss"], tm["loss_alignlib_def"],
         "same quantity on both sides"),
        ("  NLL part: completion tokens, per-example mean", last_epoch["train/sft_loss"], tm["nll_alignlib_def"], None),
        ("  odds-ratio part L_OR (before lambda)", last_epoch["train/or_loss"], tm["or"], None),
        ("last-epoch mean loss, TRL's own definition", None, tm["loss_own"], "NLL over prompt+completion tokens"),
        ("peak RSS of the training process (MiB)", a_rss, t_rss, "alignlib: Ray Train worker"),
        ("torch intra-op threads in the training process",
         ",".join(map(str, a["worker_threads"])) or "n/a", t["torch_threads"], None),
    ]  # fmt: skip
    print()
    print(f"## ORPO training: alignlib vs TRL {cfg['trl_version']} (CPU, fp32)")
    print()
    print(f"{args.pairs} pairs x {args.epochs} epochs = {n_examples} examples, batch {args.batch_size}, "
          f"lr {args.lr}, lambda {args.lambda_}, max_length {args.max_length}, constant lr, AdamW, clip 1.0, "
          f"model builtin:tiny-policy ({cfg['num_params']:,} params)")  # fmt: skip
    print(f"machine: {cfg['machine']}")
    print()
    print("| metric | alignlib (Ray Train ddp, 1 worker) | TRL ORPOTrainer | alignlib / TRL | note |")
    print("|---|---:|---:|---:|---|")
    for name, av, tv, note in rows:
        numeric = isinstance(av, (int, float)) and isinstance(tv, (int, float)) and not isinstance(av, bool)
        digits = 4 if "loss" in name or "part" in name else 2
        r = ratio(float(av), float(tv), 3 if digits == 4 else 2) if numeric else ""
        print(f"| {name} | {fmt(av, digits)} | {fmt(tv, digits)} | {r} | {note or ''} |")
    print()
    print(
        f"TRL breakdown: model load + ORPOTrainer() incl. dataset tokenization {t['build_s']:.2f} s, "
        f"train() {t['train_s']:.2f} s, save_model {t['total_s'] - t['build_s'] - t['train_s']:.2f} s."
    )
    first_a = a["steps"][0]["loss"] if a["steps"] else None
    if body is not None:
        print(
            f"Diagnostic: alignlib's loop body (encode_rows + collate + forward + sequence_logps + orpo_loss + "
            f"backward + clip + AdamW) run in this process without Ray Train/Data: {body:.2f} ms per step "
            f"(median over one epoch), vs {fmt(median_step_ms(a['step_ends'], per_epoch), 2)} ms in the Ray "
            f"Train worker."
        )
    print(
        f"Ray worker processes seen: {a['num_ray_workers']} (sum of their peak RSS "
        f"{a['all_ray_workers_maxrss_kb'] / mib:.0f} MiB; the raylet, GCS and this driver are not counted)."
    )
    print()
    print("### Cross-check: first batch, initial weights, no gradient")
    print()
    c = check
    print(
        f"- batch of {c['batch_size']} pairs; identical token ids on both sides: {c['same_token_ids']}; "
        f"same scored completion lengths: {c['same_completion_lengths']}"
    )
    if not c["same_token_ids"]:
        print(f"  - first chosen sequence, alignlib: {c['example_alignlib_ids']}")
        print(f"  - first chosen sequence, TRL:      {c['example_trl_ids']}")
    print(
        f"- alignlib orpo loss = NLL {c['alignlib_nll']:.6f} + {args.lambda_} * L_OR {c['alignlib_or']:.6f} "
        f"= **{c['alignlib_loss']:.6f}**"
    )
    print(
        f"- TRL ORPO loss      = NLL {c['trl_nll']:.6f} + {args.lambda_} * L_OR {c['trl_or']:.6f} "
        f"= **{c['trl_loss']:.6f}**"
    )
    print(
        f"- odds-ratio terms agree to {abs(c['alignlib_or'] - c['trl_or']):.2e}; "
        f"TRL's metrics rebuilt into alignlib's definition give {c['trl_loss_alignlib_definition']:.6f} "
        f"(diff {abs(c['trl_loss_alignlib_definition'] - c['alignlib_loss']):.2e})"
    )
    if not c["same_token_ids"]:
        print(
            "- the token ids differ (TRL prepended BOS, `--trl-bos`), so the log-probs themselves differ and "
            "the decomposition below is only approximate; run without --trl-bos for an exact comparison"
        )
    lead = "the gap is" if c["same_token_ids"] else "most of the gap is"
    print(
        f"- {lead} the NLL term: alignlib averages -log p over each chosen completion's tokens, then over "
        f"examples ({c['alignlib_nll']:.6f}); pooling those completion tokens over the batch gives "
        f"{c['nll_completion_token_pooled']:.6f}; pooling prompt + completion tokens (what TRL does: "
        f"{c['prompt_tokens_in_trl_nll']} prompt + {c['completion_tokens']} completion predictions) gives "
        f"{c['nll_prompt_and_completion_token_pooled']:.6f} vs TRL's {c['trl_nll']:.6f} "
        f"(diff {abs(c['nll_prompt_and_completion_token_pooled'] - c['trl_nll']):.2e})"
    )
    print(
        f"- the first training step of each run saw this batch at these weights: alignlib logged "
        f"{first_a:.6f}, TRL logged {tm['first_step_loss_own']:.6f} (own definition)"
    )
    print()
    print(f"total benchmark wall-clock {wall_total:.0f} s")
    print(f"reproduce: {command}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=400, help="number of preference pairs (default 400)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs (default 3)")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per optimizer step (default 8)")
    parser.add_argument("--lr", type=float, default=1e-3, help="constant learning rate (default 1e-3)")
    parser.add_argument("--lambda", dest="lambda_", type=float, default=0.1, help="ORPO lambda / TRL beta")
    parser.add_argument("--max-length", type=int, default=64, help="prompt + completion tokens (default 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trl-bos", action="store_true", help="let TRL prepend BOS as it does by default")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    parser.add_argument("--json", help="also write the raw measurements to this JSON file")
    parser.add_argument("--_trl-child", dest="trl_child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_child:
        trl_child(args.trl_child)
        return

    started = time.perf_counter()
    flags = " ".join(shlex.quote(a) for a in sys.argv[1:])
    command = f"cd {shlex.quote(str(REPO))} && .venv/bin/python benchmarks/train_orpo_vs_trl.py {flags}".rstrip()
    workdir = Path(tempfile.mkdtemp(prefix="alignlib-orpo-bench-"))
    # Before anything imports torch or starts Ray: fresh built-in models, one thread per process.
    os.environ["ALIGNLIB_CACHE"] = str(workdir / "cache")
    os.environ.update(THREAD_ENV)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

    import torch
    import trl

    from alignlib.models import resolve_model

    torch.set_num_threads(THREADS)
    __import__("transformers").utils.logging.disable_progress_bar()
    model_dir = resolve_model("builtin:tiny-policy")
    num_params = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(
        model_dir).parameters())  # fmt: skip
    rows = make_rows(args.pairs, args.seed)
    rows_path = workdir / "rows.json"
    rows_path.write_text(json.dumps(rows))
    cfg = {
        "model_dir": model_dir, "rows_path": str(rows_path), "lambda_": args.lambda_, "lr": args.lr,
        "batch_size": args.batch_size, "epochs": args.epochs, "max_length": args.max_length, "seed": args.seed,
        "trl_bos": args.trl_bos, "output_dir": str(workdir / "trl-out"), "result_path": str(workdir / "trl.json"),
        "trl_version": trl.__version__, "num_params": num_params,
        "machine": f"{os.cpu_count()} CPU cores ({_cpu_name()}), no GPU, torch {torch.__version__}, "
                   f"load average before start {os.getloadavg()[0]:.2f}",
    }  # fmt: skip
    n_examples = args.pairs * args.epochs

    print(f"[bench] work dir {workdir}", flush=True)
    print("[bench] (a) alignlib run_training (Ray Train, ddp, 1 CPU worker) ...", flush=True)
    a = run_alignlib(cfg, rows, workdir)
    print(f"[bench]     done in {a['total_s']:.1f} s", flush=True)
    print("[bench] (b) TRL ORPOTrainer (subprocess) ...", flush=True)
    t = run_trl(cfg, workdir)
    print(f"[bench]     done in {t['total_s']:.1f} s", flush=True)
    print("[bench] cross-check on the first batch ...", flush=True)
    check = cross_check(cfg, rows, workdir)
    body = loop_body_ms(cfg, rows)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"args": vars(args), "config": cfg, "alignlib": a, "trl": t, "cross_check": check,
             "loop_body_ms": body}, indent=1, default=str))  # fmt: skip
    report(args, cfg, a, t, check, body, n_examples, time.perf_counter() - started, command)
    if not args.keep:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    main()
