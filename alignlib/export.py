"""Stage `export`: the final training checkpoint -> a Hugging Face model directory.

In: the checkpoint named in the `train` manifest (`model/` holds full weights or a LoRA
adapter, plus the tokenizer). Out: `export/model`, loadable by `from_pretrained` and by the vLLM
engine, so the trained policy can generate the next round. LoRA adapters are merged into the base
weights unless `export.merge_lora` is false (then the adapter directory is exported as it is).
Runs as a Ray task, so on a cluster the merge happens on a worker, not on the submitting machine.
"""

from __future__ import annotations

import shutil
from pathlib import Path


def export_model(checkpoint_model: str, target: str, base_model: str, merge_lora: bool) -> str:
    """Returns the kind of model written: `full`, `merged-lora` or `lora-adapter`."""
    source, target_path = Path(checkpoint_model), Path(target)
    is_adapter = (source / "adapter_config.json").exists()
    if not is_adapter or not merge_lora:
        shutil.copytree(source, target_path)
        return "lora-adapter" if is_adapter else "full"

    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoTokenizer

    from alignlib.models import load_causal_lm, resolve_model

    # Merge in float32 on CPU (merging into a 4-bit or bf16 base would round small updates away),
    # then store in the dtype the base checkpoint was published in.
    stored = getattr(AutoConfig.from_pretrained(resolve_model(base_model)), "dtype", None) or torch.float32
    base = load_causal_lm(base_model, dtype="float32", on_gpu=False)
    merged = PeftModel.from_pretrained(base, str(source)).merge_and_unload()
    merged.to(getattr(torch, stored) if isinstance(stored, str) else stored).save_pretrained(target_path)
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(target_path)
    return "merged-lora"
