"""Rows -> token ids (in Ray Data, before training) -> padded batches (in each worker).

Tokenizing happens once, as a Ray Data step ahead of the trainer, not in every training step:
`tokenize_dataset` turns pairs (or SFT rows) into `prompt_ids`, `chosen_ids`, `rejected_ids`
columns. Each example is prompt tokens + completion tokens + EOS. Over `max_length`, the prompt
loses tokens from its left first (the end of a prompt matters most to the answer), then the
completion loses tokens from its end; a completion is never cut to nothing, and both completions
of a pair share one truncated prompt. Labels are built from lengths, not by comparing ids with the
pad id, so an EOS that doubles as the pad token is still trained on.

`step_batches` groups the rows a worker reads into optimizer steps of similar length (less
padding) without changing what a step contains when only the micro-batch split changes.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

from alignlib import schema as S
from alignlib.losses import IGNORE_INDEX
from alignlib.models import encode_completion, encode_prompt

PROMPT_IDS, CHOSEN_IDS, REJECTED_IDS, LENGTH = "prompt_ids", "chosen_ids", "rejected_ids", "length"
REF_COLUMNS = (S.REF_CHOSEN_LOGPS, S.REF_REJECTED_LOGPS)

# Optimizer steps whose rows are sorted by length together; larger windows pad less, smaller ones
# keep the order closer to the data's own.
GROUP_WINDOW_STEPS = 16


def fit(
    prompt: list[int], completions: list[list[int]], max_length: int, max_prompt_length: int | None = None
) -> tuple[list[int], list[list[int]]]:
    """Truncate a prompt and its completions so the longest pair fits in `max_length` tokens."""
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        prompt = prompt[-max_prompt_length:]
    completions = [c[: max_length - 1] for c in completions]
    room = max_length - max(len(c) for c in completions)
    return prompt[-room:] if len(prompt) > room else prompt, completions


def encode_rows(
    tokenizer, rows: list[dict[str, Any]], paired: bool, max_length: int, max_prompt_length: int | None = None
) -> list[dict[str, list[int]]]:
    """One dict per row with `prompt_ids`, `chosen_ids` and (paired) `rejected_ids`."""
    out = []
    for row in rows:
        prompt = encode_prompt(tokenizer, S.messages_of(row))
        texts = [row[S.CHOSEN], row[S.REJECTED]] if paired else [row[S.COMPLETION]]
        completions = [encode_completion(tokenizer, t) for t in texts]
        prompt, completions = fit(prompt, completions, max_length, max_prompt_length)
        example = {PROMPT_IDS: prompt, CHOSEN_IDS: completions[0]}
        if paired:
            example[REJECTED_IDS] = completions[1]
        out.append(example)
    return out


class Tokenize:
    """Ray Data callable class: a batch of pairs / SFT rows -> token-id columns (+ reference log-probs)."""

    def __init__(
        self,
        model: str,
        chat_template: str | None,
        paired: bool,
        max_length: int,
        max_prompt_length,
        trust_remote_code: bool = False,
        margins: bool = False,
    ):
        from alignlib.models import load_tokenizer

        self.tokenizer = load_tokenizer(model, chat_template, trust_remote_code)
        self.paired, self.max_length, self.max_prompt_length = paired, max_length, max_prompt_length
        self.margins = margins  # keep each pair's reward margin (train.loss.margin)

    def __call__(self, batch):
        import pyarrow as pa

        rows = batch.to_pylist()
        examples = encode_rows(self.tokenizer, rows, self.paired, self.max_length, self.max_prompt_length)
        ids = pa.list_(pa.int32())
        columns = {S.PROMPT_ID: batch[S.PROMPT_ID]}
        names = [PROMPT_IDS, CHOSEN_IDS] + ([REJECTED_IDS] if self.paired else [])
        for name in names:
            columns[name] = pa.array([e[name] for e in examples], ids)
        columns[LENGTH] = pa.array([example_length(e) for e in examples], pa.int32())
        for name in REF_COLUMNS:
            if name in batch.column_names:
                columns[name] = batch[name]
        if self.margins:
            missing = [r[S.PROMPT_ID] for r in rows if r[S.MARGIN] is None]
            if missing:
                raise ValueError(
                    f"train.loss.margin: {len(missing)} pairs have no reward margin (e.g. prompt {missing[0]}: an "
                    "imported pair without chosen and rejected scores); set train.loss.margin=false or give every "
                    "pair its scores"
                )
            columns[S.MARGIN] = batch[S.MARGIN]
        return pa.table(columns)


def example_length(example: dict) -> int:
    """Tokens of the longest sequence the example puts in a batch (prompt + its longest completion)."""
    completions = [len(example[CHOSEN_IDS])] + ([len(example[REJECTED_IDS])] if REJECTED_IDS in example else [])
    return len(example[PROMPT_IDS]) + max(completions)


def require_training_columns(spec, present, paired: bool) -> None:
    """The columns training reads: the pairs (or SFT rows), and the reference log-probs when precomputed."""
    from alignlib.spec import pair_margins, reference_source

    needed = [S.PROMPT_ID, S.MESSAGES] + ([S.CHOSEN, S.REJECTED] if paired else [S.COMPLETION])
    if reference_source(spec) == "precomputed":
        needed += list(REF_COLUMNS)
    if pair_margins(spec):
        needed.append(S.MARGIN)
    S.require_columns(present, needed, f"train ({'pairs' if paired else 'sft'} for loss {spec.train.loss.name!r})")


# Up to this many examples are tokenized in the driver: a tokenizer there costs well under a second, an actor
# process to hold it several (its start-up, imports and tokenizer load), which on a small job was a fifth of
# the wait before the first training step. Larger sets are tokenized in a Ray Data actor, off the driver.
DRIVER_TOKENIZE_ROWS = 20_000


def tokenizes_in_driver(dataset) -> bool:
    return dataset.count() <= DRIVER_TOKENIZE_ROWS


def _tokenize_args(spec, paired: bool) -> tuple:
    from alignlib.spec import pair_margins

    policy, train = spec.policy, spec.train
    return (
        policy.model,
        policy.chat_template,
        paired,
        train.max_length,
        train.max_prompt_length,
        policy.trust_remote_code,
        pair_margins(spec),
    )


def driver_table(dataset, spec, paired: bool):
    """A small materialized Ray Dataset of pairs (or SFT rows) as one Arrow table in this process, its columns
    checked; `tokenize_table` then tokenizes it here."""
    import pyarrow as pa
    import ray

    require_training_columns(spec, dataset.schema().names, paired)
    return pa.concat_tables(ray.get(dataset.to_arrow_refs()))


def tokenize_table(table, spec, paired: bool):
    """Pairs (or SFT rows) as an Arrow table -> token-id columns, in this process."""
    return Tokenize(*_tokenize_args(spec, paired))(table)


def tokenize_dataset(dataset, spec, paired: bool):
    """A Ray Dataset of pairs (or SFT rows) -> token-id columns, materialized.

    Materialized before the trainer starts: once training workers hold their CPUs, a pending
    tokenize task could wait for ever on a small machine.
    """
    import ray

    from alignlib.raydata import LIGHT_CPUS, actor_pool

    if tokenizes_in_driver(dataset):
        return ray.data.from_arrow(tokenize_table(driver_table(dataset, spec, paired), spec, paired)).materialize()
    require_training_columns(spec, dataset.schema().names, paired)
    return dataset.map_batches(
        Tokenize,
        fn_constructor_args=_tokenize_args(spec, paired),
        batch_format="pyarrow",
        batch_size=256,
        compute=actor_pool(1),
        num_cpus=LIGHT_CPUS,
    ).materialize()


def tokenize_rows(spec, rows: list[dict[str, Any]], paired: bool) -> list[dict[str, Any]]:
    """The same as `tokenize_dataset`, in this process: rows in, tokenized examples out (tests, notebooks)."""
    import pyarrow as pa

    require_training_columns(spec, rows[0].keys() if rows else [], paired)
    return Tokenize(*_tokenize_args(spec, paired))(pa.Table.from_pylist(rows)).to_pylist()


def step_batches(
    rows: Iterator[dict[str, Any]], step_size: int, micro_size: int, group_by_length: bool, seed: int
) -> Iterator[list[list[dict[str, Any]]]]:
    """Yield optimizer steps, each a list of micro-batches of examples.

    With `group_by_length`, each window of `GROUP_WINDOW_STEPS` steps is sorted by length, cut into
    steps, and the steps are shuffled (seeded), so every step holds examples of similar length and
    short and long steps alternate. A step is formed before it is split into micro-batches, so
    batch 4 x accumulation 1 and batch 1 x accumulation 4 train on the same examples per step.
    """
    rng = random.Random(seed)
    window = step_size * (GROUP_WINDOW_STEPS if group_by_length else 1)
    buffer: list[dict[str, Any]] = []

    def flush(items):
        if group_by_length:
            items = sorted(items, key=lambda e: e[LENGTH])
        steps = [items[i : i + step_size] for i in range(0, len(items), step_size)]
        if group_by_length:
            rng.shuffle(steps)
        for step in steps:
            yield [step[i : i + micro_size] for i in range(0, len(step), micro_size)]

    for row in rows:
        buffer.append(row)
        if len(buffer) == window:
            yield from flush(buffer)
            buffer = []
    if buffer:
        yield from flush(buffer)


def collate(
    examples: list[dict[str, Any]], pad_id: int, paired: bool, with_reference: bool = False, with_margins: bool = False
):
    """-> input_ids, attention_mask, labels, each (B, T) or (2B, T) with chosen rows then rejected rows.

    `with_reference` (train.precompute_reference): also `ref_logps`, the precomputed reference log-probs of
    chosen then rejected rows, from the ref_logps stage's columns. `with_margins` (train.loss.margin): also
    `margins`, (B,) the pairs' reward margins."""
    import numpy as np
    import torch

    # Filled in NumPy and handed to torch once: per-row torch.tensor() and tensor slicing cost ~10x more
    # on small batches (ids may be lists or the NumPy arrays Ray Data's iter_rows yields).
    sequences = [(e[PROMPT_IDS], e[CHOSEN_IDS]) for e in examples]
    if paired:
        sequences += [(e[PROMPT_IDS], e[REJECTED_IDS]) for e in examples]
    width = max(len(p) + len(c) for p, c in sequences)
    input_ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    labels = np.full((len(sequences), width), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((len(sequences), width), dtype=np.int64)
    for i, (p, c) in enumerate(sequences):
        start, n = len(p), len(p) + len(c)
        input_ids[i, :start] = p
        input_ids[i, start:n] = c
        labels[i, start:n] = c
        mask[i, :n] = 1
    batch = {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(mask),
        "labels": torch.from_numpy(labels),
    }
    if with_reference:
        batch["ref_logps"] = torch.tensor(
            [e[S.REF_CHOSEN_LOGPS] for e in examples] + [e[S.REF_REJECTED_LOGPS] for e in examples],
            dtype=torch.float32,
        )
    if with_margins:
        batch["margins"] = torch.tensor([e[S.MARGIN] for e in examples], dtype=torch.float32)
    return batch
