"""Best-of-N answers: for each prompt, the policy's N scored samples ranked, and the best one chosen.

`alignlib bon JOB.yaml` runs the `bon` flow: every prompt of the spec's data (no held-out split), N samples
from `policy` (generate), the spec's reward(s) (score), then `select`, which writes
- `best`: one row per prompt, in the data file's order: the best answer, its reward, how many candidates
  tied with it, and a `flag` when the choice is not a real choice (`all_truncated`: every candidate was cut
  at generate.max_new_tokens; `no_candidates`: nothing was generated for the prompt);
- `candidates`: every sample with its reward, its `rank` (1 = best) and whether it tied with another.

The order is `alignlib.ranking`'s, the one the best-of-N SFT set and `alignlib serve` choose by: the highest
reward wins; among equal rewards, a sample that ended by itself (`finish_reason: stop`) beats one cut at the
token limit, then the lower `sample_index` wins. The order is total, so reruns choose the same answer.
"""

from __future__ import annotations

from typing import Any

from alignlib import schema as S
from alignlib.ranking import ranked

FLAG_ALL_TRUNCATED = "all_truncated"
FLAG_NO_CANDIDATES = "no_candidates"
RANK, TIED, FLAG, CANDIDATES, BEST_INDEX = "rank", "tied", "flag", "num_candidates", "best_sample_index"

BEST_COLUMNS = [
    S.PROMPT_ID,
    S.PROMPT,
    S.MESSAGES,
    S.SOURCE,
    S.COMPLETION,
    S.REWARD,
    BEST_INDEX,
    S.FINISH_REASON,
    S.NUM_TOKENS,
    CANDIDATES,
    TIED,
    FLAG,
]
CANDIDATE_COLUMNS = [S.PROMPT_ID, S.SAMPLE_INDEX, S.COMPLETION, S.REWARD, RANK, S.NUM_TOKENS, S.FINISH_REASON, TIED]


def select(prompts: list[dict[str, Any]], scored: list[dict[str, Any]]):
    """(best rows in prompt order, candidate rows, counts) from the prompts and their scored completions."""
    by_prompt: dict[str, list[dict[str, Any]]] = {}
    for row in scored:
        if row[S.GENERATOR] == S.GENERATOR_POLICY:
            by_prompt.setdefault(row[S.PROMPT_ID], []).append(row)
    best_rows, candidates = [], []
    counts = {"prompts": len(prompts), FLAG_ALL_TRUNCATED: 0, FLAG_NO_CANDIDATES: 0, "tied": 0}
    for prompt in prompts:
        order = ranked(by_prompt.get(prompt[S.PROMPT_ID], []))
        rewards = [r[S.REWARD] for r in order]
        for rank, row in enumerate(order, start=1):
            candidates.append(
                {
                    S.PROMPT_ID: row[S.PROMPT_ID],
                    S.SAMPLE_INDEX: row[S.SAMPLE_INDEX],
                    S.COMPLETION: row[S.COMPLETION],
                    S.REWARD: row[S.REWARD],
                    RANK: rank,
                    S.NUM_TOKENS: row[S.NUM_TOKENS],
                    S.FINISH_REASON: row[S.FINISH_REASON],
                    TIED: rewards.count(row[S.REWARD]) > 1,
                }
            )
        base = {c: prompt[c] for c in (S.PROMPT_ID, S.PROMPT, S.MESSAGES, S.SOURCE)}
        if not order:
            counts[FLAG_NO_CANDIDATES] += 1
            best_rows.append(
                {
                    **base,
                    S.COMPLETION: None,
                    S.REWARD: None,
                    BEST_INDEX: None,
                    S.FINISH_REASON: None,
                    S.NUM_TOKENS: None,
                    CANDIDATES: 0,
                    TIED: False,
                    FLAG: FLAG_NO_CANDIDATES,
                }
            )
            continue
        top = order[0]
        truncated = all(r[S.FINISH_REASON] == "length" for r in order)
        tied = rewards.count(top[S.REWARD]) > 1
        counts[FLAG_ALL_TRUNCATED] += truncated
        counts["tied"] += tied
        best_rows.append(
            {
                **base,
                S.COMPLETION: top[S.COMPLETION],
                S.REWARD: top[S.REWARD],
                BEST_INDEX: top[S.SAMPLE_INDEX],
                S.FINISH_REASON: top[S.FINISH_REASON],
                S.NUM_TOKENS: top[S.NUM_TOKENS],
                CANDIDATES: len(order),
                TIED: tied,
                FLAG: FLAG_ALL_TRUNCATED if truncated else None,
            }
        )
    return best_rows, candidates, counts


def arrow_tables(best_rows: list[dict], candidates: list[dict]):
    import pyarrow as pa

    types = {BEST_INDEX: pa.int32(), CANDIDATES: pa.int32(), TIED: pa.bool_(), FLAG: pa.string(), RANK: pa.int32()}

    def schema(columns):
        return pa.schema([(c, types[c]) if c in types else S.arrow_schema([c]).field(0) for c in columns])

    return (
        pa.Table.from_pylist(best_rows, schema=schema(BEST_COLUMNS)),
        pa.Table.from_pylist(candidates, schema=schema(CANDIDATE_COLUMNS)),
    )


def bon_spec(spec):
    """The spec the `bon` flow runs: every prompt (no held-out split), no weak model, under `<output_dir>/bon`."""
    from pathlib import Path

    return spec.model_copy(
        update={
            "output_dir": str(Path(spec.output_dir) / "bon"),
            "data": spec.data.model_copy(update={"eval_fraction": 0.0}),
            "generate": spec.generate.model_copy(update={"weak_model": None}),
            "eval": spec.eval.model_copy(update={"enabled": False}),
        }
    )


def write_out(table, path) -> None:
    """`--out`: JSONL (`.jsonl`) or Parquet (`.parquet`), by the file's extension."""
    import json
    from pathlib import Path

    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, path)
    else:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in table.to_pylist()))
