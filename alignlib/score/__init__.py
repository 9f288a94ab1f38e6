"""Scoring: completions -> scored completions, with a `reward` column (run by the stage `alignlib.stages.score`,
the held-out answers of `alignlib.stages.eval`, and `alignlib serve`).

In: `generate/completions` (COMPLETION_COLUMNS). Out: `score/scored` (SCORED_COLUMNS) with
`reward` (float64) and `reward_source` (the reward model or `module:function`).
Rewards come from a reward model (`score.reward.type: model`, a sequence-classification model
with one output: an HF actor pool scoring length-grouped micro-batches, or vLLM's classify task
with `engine: vllm`) or a Python function (`type: function`).
With `score.rewards`, each reward writes its own `reward_<name>` column and `reward` is their
weighted sum; `reward_source` then spells the sum out, e.g. `1*a:f + 0.5*builtin:tiny-reward`.
A reward function that fails or returns no finite number stops the stage with the row it failed on.
`alignlib serve` scores with these same classes and `combine`, on an Arrow table of a request's candidates.
"""

from __future__ import annotations

import math

import pyarrow as pa

from alignlib import schema as S
from alignlib.raydata import (
    LIGHT_CPUS,
    actor_pool,
    actor_resources,
    count_batch_starts,
    fixed_batches,
    one_batch_per_block,
)


class RewardError(ValueError):
    pass


class FunctionScorer:
    """A reward function (`module:function`) over a batch: `scored(batch)` adds its column, or raises RewardError
    naming the first row it failed on (the function raised, or returned no finite number)."""

    def __init__(self, function: str, column: str = S.REWARD):
        from alignlib.spec import resolve_reward

        self.name = function
        self.fn = resolve_reward(function)
        self.column = column

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.scored(batch)

    def scored(self, batch: pa.Table) -> pa.Table:
        rewards = []
        for row in batch.select([S.PROMPT_ID, S.PROMPT, S.COMPLETION, S.GOLD, S.SOURCE]).to_pylist():
            try:
                value = float(self.fn(prompt=row[S.PROMPT], completion=row[S.COMPLETION], gold=row[S.GOLD]))
            except Exception as err:
                raise RewardError(f"reward {self.name} failed on prompt {row[S.SOURCE]}: {err}") from err
            if not math.isfinite(value):
                raise RewardError(f"reward {self.name} returned {value} for prompt {row[S.SOURCE]}")
            rewards.append(value)
        return batch.append_column(self.column, pa.array(rewards, pa.float64()))


def _function_scores(batch: pa.Table, function: str, column: str) -> pa.Table:
    from alignlib.raydata import counted_batch

    with counted_batch(batch, f"reward {function}"):
        return FunctionScorer(function, column)(batch)


# A micro-batch grows while its padded tokens stay within this factor of its real tokens.
PAD_SLACK = 1.25


def length_groups(lengths: list[int], slack: float = PAD_SLACK) -> list[list[int]]:
    """Row indices sorted by length, cut into runs of similar length.

    A run ends when adding the next (longer) row would make rows * longest exceed `slack` times
    the run's real tokens: a short answer is never padded to a long one, and uniform lengths stay
    one micro-batch (the Ray Data batch).
    """
    groups: list[list[int]] = []
    real = 0
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if groups and (len(groups[-1]) + 1) * lengths[i] <= slack * (real + lengths[i]):
            groups[-1].append(i)
            real += lengths[i]
        else:
            groups.append([i])
            real = lengths[i]
    return groups


class ModelScorer:
    """Scores prompt + completion with a sequence-classification reward model (logit 0 is the reward).

    Each Ray Data batch is sorted by token length and run as micro-batches of similar length
    (`length_groups`); rewards are scattered back to the rows' order. `group_by_length=False`
    pads the whole batch to its longest row (the benchmark's baseline). Called by Ray Data, it counts
    each batch's starts (`counted_batch`); `scored(batch)` is the same work without the counting.
    """

    def __init__(
        self,
        model: str,
        dtype: str,
        max_length: int,
        column: str = S.REWARD,
        group_by_length: bool = True,
        trust_remote_code: bool = False,
    ):
        import torch

        from alignlib.models import load_reward_model, load_tokenizer

        self.on_gpu = torch.cuda.is_available()
        self.name = model
        self.tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
        self.model = (
            load_reward_model(model, dtype, self.on_gpu, trust_remote_code).eval().to("cuda" if self.on_gpu else "cpu")
        )
        self.max_length = max_length
        self.column = column
        self.group_by_length = group_by_length

    def __call__(self, batch: pa.Table) -> pa.Table:
        from alignlib.raydata import counted_batch

        with counted_batch(batch, f"reward model {self.name}"):
            return self.scored(batch)

    def scored(self, batch: pa.Table) -> pa.Table:
        """`batch` (MESSAGES and COMPLETION columns) plus this reward's column."""
        from alignlib.models import reward_sequence

        sequences = [
            reward_sequence(self.tokenizer, m, c, self.max_length)
            for m, c in zip(batch[S.MESSAGES].to_pylist(), batch[S.COMPLETION].to_pylist(), strict=True)
        ]
        return batch.append_column(self.column, pa.array(self.rewards(sequences), pa.float64()))

    def rewards(self, sequences: list[list[int]]) -> list[float]:
        if not sequences:
            return []
        groups = length_groups([len(s) for s in sequences]) if self.group_by_length else [range(len(sequences))]
        out = [0.0] * len(sequences)
        for group in groups:
            for i, value in zip(group, self._forward([sequences[i] for i in group]), strict=True):
                out[i] = value
        return out

    def _forward(self, sequences: list[list[int]]) -> list[float]:
        import torch

        width = max(len(s) for s in sequences)
        pad = self.tokenizer.pad_token_id
        # Right padding: the model reads its score at the last non-pad token of each row.
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
        device = next(self.model.parameters()).device
        with torch.no_grad():
            logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        return logits[:, 0].float().cpu().tolist()


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


def score(completions, score_spec, num_rows: int | None = None):
    """A Ray Dataset of completions -> a Ray Dataset of SCORED_COLUMNS rows (+ `reward_<name>` columns).

    `score_spec` is the ScoreSpec; each reward is one map_batches step adding its column. With
    `num_rows` (the dataset's row count), a reward model's batches are cut by row position
    (`fixed_batches`), so an input in a fixed order always gives the same batches.
    """
    components = score_spec.components()
    for column, reward, _ in components:
        completions = _scored_by(completions, reward, column, num_rows)
    plan = [(column, source_of(reward), weight) for column, reward, weight in components]
    return completions.map_batches(combine, fn_args=(plan,), batch_format="pyarrow", num_cpus=LIGHT_CPUS)


def _scored_by(completions, reward, column: str, num_rows: int | None = None):
    if reward.type == "function":
        # Plain tasks in Ray's warm workers: a function needs no model loaded once per actor.
        count_batch_starts()
        return completions.map_batches(
            _function_scores, fn_args=(reward.function, column), batch_format="pyarrow", num_cpus=0.5
        )
    if reward.engine == "vllm":
        from alignlib.score.vllm_scorer import vllm_score

        return vllm_score(completions, reward, column)
    count_batch_starts()
    batched = (
        one_batch_per_block(completions, reward.batch_size)
        if num_rows is None
        else fixed_batches(completions, reward.batch_size, num_rows)
    )
    return batched.map_batches(
        ModelScorer,
        fn_constructor_kwargs=dict(
            model=reward.model,
            dtype=reward.dtype,
            max_length=reward.max_length,
            column=column,
            trust_remote_code=reward.trust_remote_code,
        ),
        batch_size=reward.batch_size,
        batch_format="pyarrow",
        compute=actor_pool(reward.concurrency),
        **actor_resources(reward.resources),
    )
