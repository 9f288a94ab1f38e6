"""One ranking rule: from the same scored rows, the best-of-N SFT set (`pairs`, in the driver and on Ray Data),
`alignlib bon` (`bon.select`) and `alignlib serve` (`serving.rank`) pick the same answer for every prompt.

The rule (`alignlib.ranking`): the higher reward; among equal rewards an answer that stopped by itself before one
cut at the token limit; then the lower sample index. Token counts play no part.
"""

from __future__ import annotations

import math
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignlib import schema as S
from alignlib.bon import select
from alignlib.pairs import build, import_pairs
from alignlib.pairs_data import BlockPairs
from alignlib.ranking import RULE, best_first, ranked
from alignlib.serving import rank
from alignlib.spec import PairsSpec

STOP, CUT = "stop", "length"


def scored(
    pid: str, index: int, reward: float, finish: str = STOP, tokens: int = 5, generator: str = S.GENERATOR_POLICY
):
    return {
        S.PROMPT_ID: pid,
        S.PROMPT: f"question {pid}",
        S.MESSAGES: [{"role": "user", "content": f"question {pid}"}],
        S.GOLD: None,
        S.SOURCE: f"data.jsonl:{pid[1:]}",
        S.COMPLETION: f"{pid} {generator} answer {index}",
        S.GENERATOR: generator,
        S.SAMPLE_INDEX: index,
        S.SEED: index,
        S.FINISH_REASON: finish,
        S.NUM_TOKENS: tokens,
        S.REWARD: reward,
        S.REWARD_SOURCE: "f",
    }


# prompt -> its samples as (reward, finish_reason, tokens), sample index = position. Each prompt is a case where a
# rule of its own (bon's old "fewer tokens", pairs' old reward-then-index) would have picked another answer.
CASES = {
    "p0": [(0.2, STOP, 5), (0.9, STOP, 5), (0.5, STOP, 5)],  # one clear best: index 1
    "p1": [(0.7, STOP, 9), (0.1, STOP, 5), (0.7, STOP, 2)],  # tie, both stopped: the lower index, not the shorter
    "p2": [(0.8, CUT, 8), (0.8, STOP, 6), (0.8, STOP, 3), (0.3, STOP, 4)],  # tie with a cut one: stopped, then index
    "p3": [(0.4, STOP, 4), (0.6, CUT, 8), (0.6, CUT, 8)],  # the best reward is only cut answers
    "p4": [(0.5, CUT, 8), (0.5, CUT, 8), (0.1, CUT, 8)],  # every answer cut
    "p5": [(1.0, STOP, 3), (1.0, STOP, 3), (1.0, STOP, 3), (1.0, STOP, 1)],  # all equal
}


def rows() -> list[dict]:
    out = [scored(pid, i, *sample) for pid, samples in CASES.items() for i, sample in enumerate(samples)]
    # Gold and weak answers are never best-of-N candidates, however high their reward.
    out += [scored("p0", 0, 5.0, generator=S.GENERATOR_GOLD), scored("p1", 0, 5.0, generator=S.GENERATOR_WEAK)]
    random.Random(0).shuffle(out)  # the input order must not matter
    return out


def bon_picks(table: list[dict]) -> dict[str, int]:
    prompts = [{c: samples[0][c] for c in S.PROMPT_COLUMNS} for samples in by_prompt(table).values()]
    best, _, _ = select(prompts, table)
    return {b[S.PROMPT_ID]: b["best_sample_index"] for b in best}


def serve_picks(table: list[dict]) -> dict[str, int]:
    # What the server ranks: one request's candidates, the policy's samples (reward_error None: all scored).
    policy = [r | {"error": None} for r in table if r[S.GENERATOR] == S.GENERATOR_POLICY]
    return {pid: rank(candidates)[0][S.SAMPLE_INDEX] for pid, candidates in by_prompt(policy).items()}


def sft_picks(table: list[dict], spec: PairsSpec) -> dict[str, int]:
    _, sft, _ = build(table, spec)
    index = {(r[S.PROMPT_ID], r[S.COMPLETION]): r[S.SAMPLE_INDEX] for r in table}
    return {r[S.PROMPT_ID]: index[r[S.PROMPT_ID], r[S.COMPLETION]] for r in sft}


def by_prompt(table: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in table:
        out.setdefault(row[S.PROMPT_ID], []).append(row)
    return out


EXPECTED = {"p0": 1, "p1": 0, "p2": 1, "p3": 1, "p4": 0, "p5": 0}


def test_bon_serve_and_the_sft_set_with_cut_answers_pick_the_same_answer():
    table = rows()
    assert bon_picks(table) == serve_picks(table) == EXPECTED
    assert sft_picks(table, PairsSpec(include_truncated=True)) == EXPECTED


def test_without_cut_answers_the_sft_set_picks_what_bon_and_serve_pick_among_the_rest():
    # pairs drops cut answers by default (bon keeps them, flagged): the same rule, over fewer candidates.
    table = rows()
    kept = [r for r in table if r[S.FINISH_REASON] != CUT]
    sft = sft_picks(table, PairsSpec())
    assert sft == bon_picks(kept) == serve_picks(kept) == {"p0": 1, "p1": 0, "p2": 1, "p3": 0, "p5": 0}
    # Where bon's best over every answer stopped by itself, the SFT set holds that very answer.
    everything = bon_picks(table)
    stopped = {pid for pid, i in everything.items() if CASES[pid][i][1] == STOP}
    assert stopped == {"p0", "p1", "p2", "p5"} and all(sft[pid] == everything[pid] for pid in stopped)


@pytest.mark.parametrize("include_truncated", [True, False])
def test_pairs_on_ray_data_pick_the_in_driver_sft_rows_and_every_chosen_answer_is_the_best(tmp_path, include_truncated):
    table = rows()
    spec = PairsSpec(include_truncated=include_truncated, min_margin=0.0)
    pairs, sft, _ = build(table, spec)
    block = pa.Table.from_pylist(table, schema=S.arrow_schema(S.SCORED_COLUMNS))
    task = BlockPairs(spec.model_dump(mode="json"), 0, [S.REWARD], 1.0, str(tmp_path / "pairs"), str(tmp_path / "sft"))
    task(block)
    on_ray = pq.read_table(tmp_path / "sft").to_pylist()
    assert sorted(on_ray, key=lambda r: r[S.PROMPT_ID]) == sorted(sft, key=lambda r: r[S.PROMPT_ID])
    best = {r[S.PROMPT_ID]: r[S.COMPLETION] for r in sft}
    assert pairs and all(p[S.CHOSEN] == best[p[S.PROMPT_ID]] for p in pairs), "chosen = the best-of-N answer"


def test_the_rule_and_rows_without_a_finish_reason_or_a_reward():
    assert RULE == "reward, stop before length, lower sample_index"
    answers = [
        {S.SAMPLE_INDEX: 0, S.REWARD: None},  # unscored: last
        {S.SAMPLE_INDEX: 1, S.REWARD: math.nan},  # NaN: as unscored
        {S.SAMPLE_INDEX: 2, S.REWARD: 0.5},  # no finish_reason (an imported answer): not cut
        {S.SAMPLE_INDEX: 3, S.REWARD: 0.5, S.FINISH_REASON: CUT},
        {S.SAMPLE_INDEX: 4, S.REWARD: 0.5, S.FINISH_REASON: STOP},
        {S.SAMPLE_INDEX: 5, S.REWARD: -math.inf},
    ]
    assert [a[S.SAMPLE_INDEX] for a in ranked(answers)] == [2, 4, 3, 5, 0, 1]
    assert best_first(answers[2]) < best_first(answers[3])


def test_an_imported_preference_sets_sft_rows_follow_the_rule_in_file_order():
    def pref(pid, chosen, reward):
        return {
            S.PROMPT_ID: pid,
            S.PROMPT: "q",
            S.MESSAGES: [{"role": "user", "content": "q"}],
            S.CHOSEN: chosen,
            S.REJECTED: "no",
            S.CHOSEN_REWARD: reward,
            S.REJECTED_REWARD: None,
            S.SOURCE: "p.jsonl:1",
        }

    preferences = [
        pref("a", "a-unscored", None),
        pref("a", "a-first", 0.5),
        pref("a", "a-second", 0.5),
        pref("b", "b-first", None),
        pref("b", "b-second", None),
        pref("c", "c-low", 0.1),
        pref("c", "c-high", 0.9),
    ]
    _, sft, _ = import_pairs(preferences, {"a", "b", "c"}, PairsSpec())
    assert [(r[S.PROMPT_ID], r[S.COMPLETION]) for r in sft] == [("a", "a-first"), ("b", "b-first"), ("c", "c-high")]
    assert all(list(r) == S.SFT_COLUMNS for r in sft)
