"""Rows -> token tensors for the loop: prompt tokens are masked out of the labels.

Each example is prompt tokens + completion tokens + EOS. Over `max_length`, the prompt loses
tokens from its left first (the end of a prompt matters most to the answer), then the completion
loses tokens from its end. Both completions of a pair share one truncated prompt.
"""

from __future__ import annotations

from typing import Any

from alignlib import schema as S
from alignlib.losses import IGNORE_INDEX
from alignlib.models import encode_completion, encode_prompt


def _fit(prompt: list[int], completions: list[list[int]], max_length: int) -> tuple[list[int], list[list[int]]]:
    completions = [c[: max_length - 1] for c in completions]
    room = max_length - max(len(c) for c in completions)
    return prompt[-room:] if len(prompt) > room else prompt, completions


def encode_rows(tokenizer, rows: list[dict[str, Any]], paired: bool, max_length: int) -> list[dict[str, list[int]]]:
    """One dict per row with `prompt`, `chosen` and (paired) `rejected` token ids."""
    out = []
    for row in rows:
        prompt = encode_prompt(tokenizer, S.messages_of(row))
        texts = [row[S.CHOSEN], row[S.REJECTED]] if paired else [row[S.COMPLETION]]
        prompt, completions = _fit(prompt, [encode_completion(tokenizer, t) for t in texts], max_length)
        example = {"prompt": prompt, "chosen": completions[0]}
        if paired:
            example["rejected"] = completions[1]
        out.append(example)
    return out


def collate(examples: list[dict[str, list[int]]], pad_id: int, paired: bool):
    """-> input_ids, attention_mask, labels, each (B, T) or (2B, T) with chosen rows then rejected rows."""
    import torch

    sequences = [(e["prompt"], e["chosen"]) for e in examples]
    if paired:
        sequences += [(e["prompt"], e["rejected"]) for e in examples]
    width = max(len(p) + len(c) for p, c in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, (p, c) in enumerate(sequences):
        n = len(p) + len(c)
        input_ids[i, :n] = torch.tensor(p + c)
        labels[i, len(p) : n] = torch.tensor(c)
        mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
