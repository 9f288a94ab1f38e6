"""Training backends: each owns model loading and wrapping, backward, optimizer step and saving.

- ddp: the whole model (or LoRA adapters) under PyTorch DDP via `ray.train.torch.prepare_model`,
  gloo on CPU, NCCL on GPU.
- deepspeed: DeepSpeed ZeRO stage 0-3 with optional optimizer/parameter offload; a torch AdamW is
  handed to DeepSpeed so no fused-Adam extension has to be JIT-built.
- qlora: one worker; the base model is loaded 4-bit with bitsandbytes and only LoRA adapters train.

The loop calls `backward(loss)` and `step()` once per micro-batch; the backend applies the
optimizer every `grad_accum` micro-batches (and `finish()` applies a trailing partial one).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from alignlib.losses import get_loss
from alignlib.models import load_causal_lm, load_reward_head, resolve_model, torch_dtype


def lr_lambda(total_steps: int, warmup_ratio: float, schedule: str):
    warmup = int(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _lora_config(lora, reward_head: bool = False):
    """LoRA on the policy; on a reward model (`reward_head`) peft's SEQ_CLS task also trains the new score
    head whole (`modules_to_save`: it starts random, so adapters alone could not fit it)."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="SEQ_CLS" if reward_head else "CAUSAL_LM",
    )


class Backend:
    """DDP (and the base of the others): plain PyTorch optimizer and gradient accumulation."""

    def __init__(self, spec, total_steps: int, device: torch.device, distributed: bool = True):
        self.spec, self.train, self.device = spec, spec.train, device
        self.distributed = distributed  # inside a Ray Train worker group (else: one process, no wrapper)
        self.total_steps = total_steps
        self.micro = 0
        self.step_count = 0
        self.reward_head = get_loss(self.train.loss.name).reward_head  # train a reward model, not a policy

    # -- model ------------------------------------------------------------------------------
    def load_base(self):
        on_gpu = self.device.type == "cuda"
        policy = self.spec.policy
        load = load_reward_head if self.reward_head else load_causal_lm
        return load(policy.model, policy.dtype, on_gpu, policy.trust_remote_code)

    def build(self):
        model = self.load_base()
        if self.train.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        if self.train.lora is not None:
            from peft import get_peft_model

            model = get_peft_model(model, _lora_config(self.train.lora, self.reward_head))
        self.model = self.wrap(model)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=self.train.lr, weight_decay=self.train.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(self.total_steps, self.train.warmup_ratio, self.train.schedule)
        )
        return self.model

    def wrap(self, model):
        if not self.distributed:
            return model.to(self.device)
        import ray.train.torch

        return ray.train.torch.prepare_model(model, move_to_device=self.device)

    @property
    def unwrapped(self):
        return getattr(self.model, "module", self.model)

    def reference_model(self):
        """A frozen copy of the reference policy (`train.reference_model`, by default the starting policy)."""
        from alignlib.spec import reference_model

        policy = self.spec.policy
        if reference_model(self.spec) == policy.model and self.train.lora is None:
            ref = self.load_base()
        else:  # another model (an earlier round's), or the base under LoRA adapters trained from elsewhere
            on_gpu = self.device.type == "cuda"
            ref = load_causal_lm(reference_model(self.spec), policy.dtype, on_gpu, policy.trust_remote_code)
        ref = ref.to(self.device).eval()
        ref.requires_grad_(False)
        return ref

    # -- optimisation -----------------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.train.grad_accum).backward()
        self.micro += 1

    def step(self) -> bool:
        """Apply the optimizer at accumulation boundaries; True when it stepped."""
        if self.micro % self.train.grad_accum != 0:
            return False
        self._apply()
        return True

    def finish(self) -> None:
        if self.micro % self.train.grad_accum != 0:
            self._apply()

    def _apply(self) -> None:
        if self.train.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.train.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # -- checkpoints ------------------------------------------------------------------------
    def save(self, directory: Path, rank: int) -> None:
        """HF model (or adapter) in `directory/model`, optimizer state in `directory/state.pt` (rank 0)."""
        if rank == 0:
            self.unwrapped.save_pretrained(directory / "model")
            torch.save(
                {
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "micro": self.micro,
                    "step": self.step_count,
                },
                directory / "state.pt",
            )

    def load(self, directory: Path) -> None:
        state = _read_weights(directory / "model")
        if self.train.lora is not None:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.unwrapped, state)
        else:
            _load_full(self.unwrapped, state)
        # weights_only: tensors and plain containers only; a tampered state.pt cannot run code when read.
        saved = torch.load(directory / "state.pt", map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.micro, self.step_count = saved["micro"], saved["step"]


def _read_weights(model_dir: Path) -> dict:
    """All tensors of a saved HF model (or adapter) directory, shards merged."""
    from safetensors.torch import load_file

    state = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(f))
    return state


def _load_full(model, state: dict) -> None:
    """Load saved weights; only tied weights (left out by save_pretrained) may be missing."""
    result = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in result.missing_keys if k not in tied]
    if result.unexpected_keys or missing:
        raise RuntimeError(
            f"checkpoint does not match the model: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )


class QLoRABackend(Backend):
    def load_base(self):
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        backend = self.train.backend
        compute = torch_dtype(self.spec.policy.dtype, self.device.type == "cuda")
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=backend.quant_type,
            bnb_4bit_use_double_quant=backend.double_quant,
            bnb_4bit_compute_dtype=compute,
        )
        model = AutoModelForCausalLM.from_pretrained(
            resolve_model(self.spec.policy.model),
            quantization_config=quant,
            dtype=compute,
            device_map={"": self.device.index or 0} if self.device.type == "cuda" else {"": "cpu"},
            trust_remote_code=self.spec.policy.trust_remote_code,
        )
        return model

    def build(self):
        from peft import prepare_model_for_kbit_training

        base = self.load_base
        self.load_base = lambda: prepare_model_for_kbit_training(
            base(), use_gradient_checkpointing=self.train.gradient_checkpointing
        )
        try:
            return super().build()
        finally:
            self.load_base = base

    def wrap(self, model):
        return model  # one worker: nothing to synchronise, and a 4-bit model cannot be moved


class DeepSpeedBackend(Backend):
    def ds_config(self) -> dict:
        backend = self.train.backend
        zero = {"stage": backend.zero_stage}
        if backend.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu"}
        if backend.offload_params:
            zero["offload_param"] = {"device": "cpu"}
        on_gpu = self.device.type == "cuda"
        return {
            "train_micro_batch_size_per_gpu": self.train.batch_size,
            "gradient_accumulation_steps": self.train.grad_accum,
            "gradient_clipping": self.train.max_grad_norm or 0.0,
            "zero_optimization": zero,
            "bf16": {"enabled": on_gpu and self.spec.policy.dtype in ("auto", "bfloat16")},
            "zero_allow_untested_optimizer": True,
            # Offloaded steps then run torch's AdamW on the CPU copy instead of DeepSpeedCPUAdam,
            # which would need a C++ extension JIT-built on every node; slower per step, no build.
            "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": 10**9,
        }

    def wrap(self, model):
        import deepspeed

        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.train.lr, weight_decay=self.train.weight_decay)
        schedule = lr_lambda(self.total_steps, self.train.warmup_ratio, self.train.schedule)
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model.to(self.device),
            optimizer=optimizer,
            config=self.ds_config(),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
        )
        self.engine = engine
        return engine

    def build(self):
        model = super().build()
        # DeepSpeed owns the optimizer and scheduler it wrapped; use those, not the ones made above.
        self.optimizer, self.scheduler = self.engine.optimizer, self.engine.lr_scheduler
        return model

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # scales by 1/grad_accum itself
        self.micro += 1

    def step(self) -> bool:
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        self.step_count += int(boundary)
        return boundary

    def finish(self) -> None:
        if self.micro % self.train.grad_accum != 0:
            self.engine.set_gradient_accumulation_boundary(True)
            self.engine.step()
            self.step_count += 1

    def save(self, directory: Path, rank: int) -> None:
        """HF weights in `model/` (rank 0, gathered under ZeRO-3) and DeepSpeed's own checkpoint in `deepspeed/`.

        Every rank writes its optimizer-state shard under a rank-specific file name; Ray Train merges the
        workers' checkpoint directories into one, so a resume restores weights, optimizer and schedule.
        """
        # ZeRO-3 shards parameters across ranks: every rank takes part in gathering them.
        state = self.engine._zero3_consolidated_16bit_state_dict() if self.train.backend.zero_stage == 3 else None
        self.engine.save_checkpoint(
            str(directory / "deepspeed"), tag="state", client_state={"micro": self.micro, "step": self.step_count}
        )
        if rank == 0:
            self.engine.module.save_pretrained(directory / "model", state_dict=state)

    def load(self, directory: Path) -> None:
        # DeepSpeed reads its own optimizer shards with torch.load(weights_only=False) (a pickle); these are
        # files this job wrote under output_dir/train-ray, never a stage output or a user-supplied file.
        _, client = self.engine.load_checkpoint(
            str(directory / "deepspeed"), tag="state", load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if client is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {directory / 'deepspeed'}")
        self.micro, self.step_count = client["micro"], client["step"]


BACKENDS = {"ddp": Backend, "deepspeed": DeepSpeedBackend, "qlora": QLoRABackend}


def make_backend(spec, total_steps: int, device: torch.device, distributed: bool = True) -> Backend:
    return BACKENDS[spec.train.backend.name](spec, total_steps, device, distributed)
