"""Stage `score`: completions -> scored completions, with a `reward` column.

In: `generate/completions` (COMPLETION_COLUMNS). Out: `score/scored` (SCORED_COLUMNS) with
`reward` (float64) and `reward_source` (the reward model or `module:function`).
Rewards come from a reward-model actor pool (`score.reward.type: model`, an HF
sequence-classification model with one output) or a Python function (`type: function`).
A reward that fails or is not a finite number stops the stage with the row it failed on.
"""

from __future__ import annotations

import math

import pyarrow as pa

from alignlib import schema as S


class RewardError(ValueError):
    pass


class FunctionScorer:
    def __init__(self, function: str):
        from alignlib.spec import resolve_function

        self.name = function
        self.fn = resolve_function(function)

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
        return _with_rewards(batch, rewards, self.name)


class ModelScorer:
    """Scores prompt + completion with a sequence-classification reward model (logit 0 is the reward)."""

    def __init__(self, model: str, dtype: str, max_length: int):
        import torch

        from alignlib.models import load_reward_model, load_tokenizer

        self.on_gpu = torch.cuda.is_available()
        self.name = model
        self.tokenizer = load_tokenizer(model)
        self.model = load_reward_model(model, dtype, self.on_gpu).eval().to("cuda" if self.on_gpu else "cpu")
        self.max_length = max_length

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
        return _with_rewards(batch, logits[:, 0].float().cpu().tolist(), self.name)


def _with_rewards(batch: pa.Table, rewards: list[float], source: str) -> pa.Table:
    out = batch.append_column(S.REWARD, pa.array(rewards, pa.float64()))
    return S.conform(
        out.append_column(S.REWARD_SOURCE, pa.array([source] * batch.num_rows, pa.string())), S.SCORED_COLUMNS
    )


def score(completions, reward):
    """A Ray Dataset of completions -> a Ray Dataset of SCORED_COLUMNS rows. `reward` is a RewardSpec."""
    if reward.type == "function":
        return completions.map_batches(
            FunctionScorer, fn_constructor_kwargs=dict(function=reward.function), batch_format="pyarrow",
            concurrency=1, num_cpus=0.5,
        )  # fmt: skip
    from alignlib.generate.hf_engine import actor_resources

    return completions.map_batches(
        ModelScorer,
        fn_constructor_kwargs=dict(model=reward.model, dtype=reward.dtype, max_length=reward.max_length),
        batch_size=reward.batch_size,
        batch_format="pyarrow",
        concurrency=reward.concurrency,
        **actor_resources(reward.resources),
    )
