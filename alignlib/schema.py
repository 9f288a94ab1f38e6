"""Column names of every stage's table: the data contracts between stages live here and only here.

Each stage checks the columns it needs on entry (`require_columns`) and fails naming the missing
ones and the file they should have come from, instead of a KeyError deep inside a Ray task.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pyarrow as pa

PROMPT_ID = "prompt_id"
PROMPT = "prompt"  # the prompt text (for a chat: its last user turn); what function rewards see
MESSAGES = "messages"  # the whole chat as {role, content}; a plain prompt is one user message
GOLD = "gold"  # the gold answer, nullable
SOURCE = "source"  # "file:line" (jsonl) or "file#row" (parquet) the prompt came from

COMPLETION = "completion"
GENERATOR = "generator"  # policy | weak | gold
SAMPLE_INDEX = "sample_index"
SEED = "seed"
FINISH_REASON = "finish_reason"  # stop | length
NUM_TOKENS = "num_tokens"

REWARD = "reward"
REWARD_SOURCE = "reward_source"

CHOSEN = "chosen"
REJECTED = "rejected"
CHOSEN_REWARD = "chosen_reward"
REJECTED_REWARD = "rejected_reward"
MARGIN = "margin"
STRATEGY = "strategy"
CHOSEN_GENERATOR = "chosen_generator"
REJECTED_GENERATOR = "rejected_generator"
# Summed log-probs of chosen / rejected completion tokens under the reference (the starting policy),
# written by the ref_logps stage; training uses them when present and divides by the token
# count itself when its loss wants length-averaged log-probs.
REF_CHOSEN_LOGPS = "ref_chosen_logps"
REF_REJECTED_LOGPS = "ref_rejected_logps"

GENERATOR_POLICY = "policy"
GENERATOR_WEAK = "weak"
GENERATOR_GOLD = "gold"
GENERATOR_BASE = "base"  # eval: the starting policy
GENERATOR_TRAINED = "trained"  # eval: the exported policy

PROMPT_COLUMNS = [PROMPT_ID, PROMPT, MESSAGES, GOLD, SOURCE]
COMPLETION_COLUMNS = PROMPT_COLUMNS + [COMPLETION, GENERATOR, SAMPLE_INDEX, SEED, FINISH_REASON, NUM_TOKENS]
SCORED_COLUMNS = COMPLETION_COLUMNS + [REWARD, REWARD_SOURCE]
PAIR_COLUMNS = [
    PROMPT_ID,
    PROMPT,
    MESSAGES,
    CHOSEN,
    REJECTED,
    CHOSEN_REWARD,
    REJECTED_REWARD,
    MARGIN,
    STRATEGY,
    CHOSEN_GENERATOR,
    REJECTED_GENERATOR,
]
REF_PAIR_COLUMNS = PAIR_COLUMNS + [REF_CHOSEN_LOGPS, REF_REJECTED_LOGPS]
SFT_COLUMNS = [PROMPT_ID, PROMPT, MESSAGES, COMPLETION, REWARD]
# An imported preference set (data.kind: preferences), as the prompts stage stores it.
PREFERENCE_COLUMNS = [PROMPT_ID, PROMPT, MESSAGES, CHOSEN, REJECTED, CHOSEN_REWARD, REJECTED_REWARD, SOURCE]
# Input rows the prompts stage set aside (data.on_bad_rows: reject): where, which field, a reason code
# (prompts.REASONS), the human message, and the row as read (truncated).
FIELD, REASON, MESSAGE, RAW = "field", "reason", "message", "raw"
REJECTED_ROW_COLUMNS = [SOURCE, FIELD, REASON, MESSAGE, RAW]
# The conversational preference layout of TRL and the alignment-handbook (optional scores as in UltraFeedback).
TRL_PROMPT, TRL_CHOSEN, TRL_REJECTED = "prompt", "chosen", "rejected"
TRL_SCORE_CHOSEN, TRL_SCORE_REJECTED = "score_chosen", "score_rejected"


MESSAGES_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
_TYPES = {
    PROMPT_ID: pa.string(),
    PROMPT: pa.string(),
    MESSAGES: MESSAGES_TYPE,
    GOLD: pa.string(),
    SOURCE: pa.string(),
    COMPLETION: pa.string(),
    GENERATOR: pa.string(),
    SAMPLE_INDEX: pa.int32(),
    SEED: pa.int64(),
    FINISH_REASON: pa.string(),
    NUM_TOKENS: pa.int32(),
    REWARD: pa.float64(),
    REWARD_SOURCE: pa.string(),
    CHOSEN: pa.string(),
    REJECTED: pa.string(),
    CHOSEN_REWARD: pa.float64(),
    REJECTED_REWARD: pa.float64(),
    MARGIN: pa.float64(),
    STRATEGY: pa.string(),
    CHOSEN_GENERATOR: pa.string(),
    REJECTED_GENERATOR: pa.string(),
    REF_CHOSEN_LOGPS: pa.float64(),
    REF_REJECTED_LOGPS: pa.float64(),
    FIELD: pa.string(),
    REASON: pa.string(),
    MESSAGE: pa.string(),
    RAW: pa.string(),
}


def arrow_schema(columns: list[str]) -> pa.Schema:
    return pa.schema([(c, _TYPES[c]) for c in columns])


def conform(table: pa.Table, columns: list[str], extra: Sequence[str] = ()) -> pa.Table:
    """Select `columns` in order with their canonical types, then the `extra` reward columns (float64).

    Engines infer Arrow types per block, so a block whose `gold` is all null comes back typed
    `null`; casting every block to one schema keeps the Parquet files of a dataset readable together.
    """
    require_columns(table.column_names, [*columns, *extra], "conform")
    schema = pa.schema([*arrow_schema(columns), *[(c, pa.float64()) for c in extra]])
    return pa.table([table[c].cast(schema.field(c).type) for c in schema.names], schema=schema)


class ColumnError(ValueError):
    pass


def require_columns(present: Iterable[str], needed: Iterable[str], where: str) -> None:
    present = set(present)
    missing = [c for c in needed if c not in present]
    if missing:
        raise ColumnError(f"{where}: missing column(s) {missing}; found {sorted(present)}")


def messages_of(row: dict) -> list[dict]:
    return [{"role": m["role"], "content": m["content"]} for m in row[MESSAGES]]


def to_conversational(pairs_rows: list[dict]) -> list[dict]:
    """alignlib pairs -> the prompt/chosen/rejected chat layout TRL and the alignment-handbook read.

    Rewards, where a pair has them, go along as `score_chosen`/`score_rejected` (UltraFeedback's
    names), so importing the file again (`data.kind: preferences`) gives back the same pairs.
    """
    out = []
    for row in pairs_rows:
        record = {
            TRL_PROMPT: messages_of(row),
            TRL_CHOSEN: [{"role": "assistant", "content": row[CHOSEN]}],
            TRL_REJECTED: [{"role": "assistant", "content": row[REJECTED]}],
        }
        if row.get(CHOSEN_REWARD) is not None and row.get(REJECTED_REWARD) is not None:
            record |= {TRL_SCORE_CHOSEN: row[CHOSEN_REWARD], TRL_SCORE_REJECTED: row[REJECTED_REWARD]}
        out.append(record)
    return out


def to_sft_conversational(sft_rows: list[dict]) -> list[dict]:
    """alignlib's best-of-N (SFT) rows -> the prompt/completion chat layout TRL's SFTTrainer reads, with the reward."""
    return [
        {
            TRL_PROMPT: messages_of(row),
            "completion": [{"role": "assistant", "content": row[COMPLETION]}],
            REWARD: row[REWARD],
        }
        for row in sft_rows
    ]
