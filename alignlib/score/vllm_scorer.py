"""The `vllm` reward engine: a reward model's classify task through Ray Data's LLM processor."""

from __future__ import annotations

import pyarrow as pa

from alignlib import schema as S
from alignlib.raydata import LIGHT_CPUS, actor_pool
from alignlib.vllm_processor import processor_config, require_vllm, run_processor

# The tokens a reward model reads, added before vLLM's classify step (not a `reward_<name>` column).
REWARD_TOKENS = "scored_token_ids"


class RewardEncoder:
    """Ray Data callable: adds `scored_token_ids`, the tokens the reward model reads (for the vllm engine)."""

    def __init__(self, model: str, max_length: int, trust_remote_code: bool = False):
        from alignlib.models import load_tokenizer

        self.tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
        self.max_length = max_length

    def __call__(self, batch: pa.Table) -> pa.Table:
        from alignlib.models import reward_sequence

        ids = [
            reward_sequence(self.tokenizer, m, c, self.max_length)
            for m, c in zip(batch[S.MESSAGES].to_pylist(), batch[S.COMPLETION].to_pylist(), strict=True)
        ]
        return batch.append_column(REWARD_TOKENS, pa.array(ids, pa.list_(pa.int32())))


def reward_config(reward):
    """ModelRewardSpec -> the classify processor config."""
    return processor_config(
        reward.model,
        dtype=reward.dtype,
        batch_size=reward.batch_size,
        concurrency=reward.concurrency,
        resources=reward.resources,
        engine_kwargs=reward.engine_kwargs,
        task_type="classify",
        trust_remote_code=reward.trust_remote_code,
    )


def vllm_score(completions, reward, column: str):
    """Completions -> the same rows plus `column`, the reward model's logit from vLLM's classify task.

    The model reads exactly the tokens the transformers scorer reads (`models.reward_sequence`);
    the classifier's sigmoid is switched off so both engines return the raw logit.
    """
    require_vllm("score.reward.engine")
    from alignlib.models import check_reward_config

    check_reward_config(reward.model, trust_remote_code=reward.trust_remote_code)
    config = reward_config(reward)
    tokenized = completions.map_batches(
        RewardEncoder,
        fn_constructor_kwargs=dict(
            model=reward.model, max_length=reward.max_length, trust_remote_code=reward.trust_remote_code
        ),
        batch_format="pyarrow",
        compute=actor_pool(1),
        num_cpus=LIGHT_CPUS,
    )

    def preprocess(row):
        return dict(row, tokenized_prompt=row[REWARD_TOKENS], pooling_params={"use_activation": False})

    def postprocess(row):
        # Completion columns and the `reward_<name>` columns of rewards scored before this one.
        out = {k: v for k, v in row.items() if k in S.COMPLETION_COLUMNS or k.startswith("reward_")}
        out[column] = float(row["embeddings"][0])
        return out

    return run_processor(config, tokenized, preprocess, postprocess)
