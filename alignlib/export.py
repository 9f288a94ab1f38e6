"""Exporting a model: a training checkpoint -> a Hugging Face model directory (run by the stage
`alignlib.stages.export`).

In: the checkpoint named in the `train` manifest (`model/` holds full weights or a LoRA
adapter, plus the tokenizer). Out: `export/model`, loadable by `from_pretrained` and by the vLLM
engine, so the trained policy can generate the next round; a reward model (loss reward) as a one-label
`AutoModelForSequenceClassification` directory, which `score.reward: {type: model}` loads. LoRA adapters are
merged into the base weights unless `export.merge_lora` is false (then the adapter directory is exported as it is).
Runs as a Ray task, so on a cluster the merge happens on a worker, not on the submitting machine.
"""

from __future__ import annotations

import shutil
from pathlib import Path

# Weight files in pickle formats: loading one can run code, so an export never contains them.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def export_model(
    checkpoint_model: str, target: str, base_model: str, merge_lora: bool, trust_remote_code: bool = False
) -> str:
    """Returns the kind of model written: `full`, `merged-lora` or `lora-adapter`, prefixed `reward-model-` for a
    reward model (a sequence classifier); weights are safetensors.

    Either side may be in an object store (a URI): the checkpoint is read from a local copy, and the model
    is written on local disk, checked, then uploaded.
    """
    import tempfile

    from alignlib.store import RemotePath, copytree, location

    source, destination = location(checkpoint_model), location(target)
    with tempfile.TemporaryDirectory(prefix="alignlib-export-") as tmp:
        if isinstance(source, RemotePath):
            copytree(source, Path(tmp) / "checkpoint")
            source = Path(tmp) / "checkpoint"
        if not isinstance(destination, RemotePath):
            return _export(source, destination, base_model, merge_lora, trust_remote_code)
        kind = _export(source, Path(tmp) / "model", base_model, merge_lora, trust_remote_code)
        copytree(Path(tmp) / "model", destination)
    return kind


def _export(source: Path, target_path: Path, base_model: str, merge_lora: bool, trust_remote_code: bool) -> str:
    is_adapter = (source / "adapter_config.json").exists()
    reward = is_reward_model(source)
    if not is_adapter or not merge_lora:
        shutil.copytree(source, target_path)
        kind = "lora-adapter" if is_adapter else "full"
    else:
        _merge(source, target_path, base_model, trust_remote_code, reward)
        kind = "merged-lora"
    require_safetensors(target_path)
    return f"reward-model-{kind}" if reward else kind


def is_reward_model(checkpoint_model: Path) -> bool:
    """Whether a checkpoint's `model/` is a sequence classifier (a LoRA adapter of task SEQ_CLS, or full weights
    whose config names a `...ForSequenceClassification` class), as training a reward model saves it."""
    import json

    adapter = checkpoint_model / "adapter_config.json"
    if adapter.exists():
        return json.loads(adapter.read_text()).get("task_type") == "SEQ_CLS"
    config = json.loads((checkpoint_model / "config.json").read_text())
    return any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or [])


def _merge(source: Path, target_path: Path, base_model: str, trust_remote_code: bool, reward: bool = False) -> None:
    import torch
    from peft import PeftModel

    from alignlib.models import load_causal_lm, load_config, load_reward_head, load_tokenizer

    # Merge in float32 on CPU (merging into a 4-bit or bf16 base would round small updates away),
    # then store in the dtype the base checkpoint was published in.
    stored = getattr(load_config(base_model, trust_remote_code), "dtype", None) or torch.float32
    if reward:  # the base with a score head, padded as training padded (the checkpoint's tokenizer)
        base = load_reward_head(base_model, "float32", False, trust_remote_code, tokenizer_source=str(source))
    else:
        base = load_causal_lm(base_model, dtype="float32", on_gpu=False, trust_remote_code=trust_remote_code)
    merged = PeftModel.from_pretrained(base, str(source)).merge_and_unload()
    merged.to(getattr(torch, stored) if isinstance(stored, str) else stored).save_pretrained(target_path)
    load_tokenizer(str(source), trust_remote_code=trust_remote_code).save_pretrained(target_path)


def require_safetensors(model_dir: Path) -> None:
    """RuntimeError if an exported model holds pickle-format weights or no safetensors at all."""
    pickled = sorted(p.name for p in model_dir.rglob("*") if p.suffix in PICKLE_SUFFIXES)
    if pickled or not any(model_dir.rglob("*.safetensors")):
        raise RuntimeError(
            f"export: {model_dir} must hold its weights as safetensors only (found pickle files {pickled} "
            "or no .safetensors); refusing to publish a model whose loading could run code"
        )
