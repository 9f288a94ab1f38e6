"""Stage `score`: completions -> scored completions, with a `reward` column.

In: `generate/completions` (COMPLETION_COLUMNS). Out: `score/scored` (SCORED_COLUMNS) with
`reward` (float64) and `reward_source` (the reward model or `module:function`).
Rewards come from a reward-model actor pool (`score.reward.type: model`, an HF
sequence-classification model with one output) or a Python function (`type: function`).
With `score.rewards`, each reward writes its own `reward_<name>` column and `reward` is their
weighted sum; `reward_source` then spells the sum out, e.g. `1*a:f + 0.5*builtin:tiny-reward`.
A reward that fails or is not a finite number stops the stage with the row it failed on.
"""

from __future__ import annotations

import math

import pyarrow as pa

from alignlib import schema as S


class RewardError(ValueError):
    pass


class FunctionScorer:
    def __init__(self, function: str, column: str = S.REWARD):
        from alignlib.spec import resolve_function

        self.name = function
        self.fn = resolve_function(function)
        self.column = column

    def __call__(self, batch: pa.Table) -> pa.Table:
        rewards = []
        for row in batch.select([S.PROMPT_ID, S.PROMPT, S.COMPLETION, S.REFERENCE, S.SOURCE]).to_pylist():
            try:
                value = float(self.fn(prompt=row[S.PROMPT], completion=row[S.COMPLETION], reference=row[S.REFERENCE]))
            except Exception as err:
                raise RewardError(f"reward {self.name} failed on prompt {row[S.SOURCE]}: {err}") from err
            if not math.isfinite(value):
                raise RewardError(f"reward {self.name} returned {value} for prompt {row[S.SOURCE]}")
            rewards.append(value)
        return batch.append_column(self.column, pa.array(rewards, pa.float64()))


class ModelScorer:
    """Scores prompt + completion with a sequence-classification reward model (logit 0 is the reward)."""

    def __init__(self, model: str, dtype: str, max_length: int, column: str = S.REWARD):
        import torch

        from alignlib.models import load_reward_model, load_tokenizer

        self.on_gpu = torch.cuda.is_available()
        self.name = model
        self.tokenizer = load_tokenizer(model)
        self.model = load_reward_model(model, dtype, self.on_gpu).eval().to("cuda" if self.on_gpu else "cpu")
        self.max_length = max_length
        self.column = column

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        from alignlib.models import encode_completion, encode_prompt

        sequences = []
        for messages, completion in zip(batch[S.MESSAGES].to_pylist(), batch[S.COMPLETION].to_pylist(), strict=True):
            prompt = encode_prompt(self.tokenizer, messages)
            answer = encode_completion(self.tokenizer, completion)[-self.max_length :]
            sequences.append(prompt[max(0, len(prompt) + len(answer) - self.max_length) :] + answer)
        width = max(len(s) for s in sequences)
        pad = self.tokenizer.pad_token_id
        # Right padding: the model reads its score at the last non-pad token of each row.
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
        device = next(self.model.parameters()).device
        with torch.no_grad():
            logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        return batch.append_column(self.column, pa.array(logits[:, 0].float().cpu().tolist(), pa.float64()))


def source_of(reward) -> str:
    return reward.function if reward.type == "function" else reward.model


def combine(batch: pa.Table, components: list[tuple[str, str, float | None]]) -> pa.Table:
    """Add `reward` (the weighted sum of the component columns) and `reward_source`.

    `components` is (column, source, weight) per reward; a single unweighted reward has already
    written `reward` and only gets its source.
    """
    if len(components) == 1 and components[0][2] is None:
        source, columns = components[0][1], []
    else:
        columns = [column for column, _, _ in components]
        total = [0.0] * batch.num_rows
        for column, _, weight in components:
            total = [t + weight * v for t, v in zip(total, batch[column].to_pylist(), strict=True)]
        batch = batch.append_column(S.REWARD, pa.array(total, pa.float64()))
        source = " + ".join(f"{weight:g}*{source}" for _, source, weight in components)
    batch = batch.append_column(S.REWARD_SOURCE, pa.array([source] * batch.num_rows, pa.string()))
    return S.conform(batch, S.SCORED_COLUMNS, extra=columns)


def score(completions, score_spec):
    """A Ray Dataset of completions -> a Ray Dataset of SCORED_COLUMNS rows (+ `reward_<name>` columns).

    `score_spec` is the ScoreSpec; each reward is one map_batches step adding its column.
    """
    from alignlib.generate import LIGHT_CPUS

    components = score_spec.components()
    for column, reward, _ in components:
        completions = _scored_by(completions, reward, column)
    plan = [(column, source_of(reward), weight) for column, reward, weight in components]
    return completions.map_batches(combine, fn_args=(plan,), batch_format="pyarrow", num_cpus=LIGHT_CPUS)


def _scored_by(completions, reward, column: str):
    if reward.type == "function":
        return completions.map_batches(
            FunctionScorer, fn_constructor_kwargs=dict(function=reward.function, column=column),
            batch_format="pyarrow", concurrency=1, num_cpus=0.5,
        )  # fmt: skip
    from alignlib.generate.hf_engine import actor_resources

    return completions.map_batches(
        ModelScorer,
        fn_constructor_kwargs=dict(model=reward.model, dtype=reward.dtype, max_length=reward.max_length, column=column),
        batch_size=reward.batch_size,
        batch_format="pyarrow",
        concurrency=reward.concurrency,
        **actor_resources(reward.resources),
    )
