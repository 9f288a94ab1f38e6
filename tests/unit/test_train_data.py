"""How rows become optimizer steps: length grouping, the micro-batch split, and truncation."""

import itertools

import pytest

from alignlib.train.data import CHOSEN_IDS, LENGTH, PROMPT_IDS, REJECTED_IDS, fit, step_batches


def rows(n: int) -> list[dict]:
    # Heavy-tailed lengths: mostly short, a few long.
    lengths = [4 + (i * 7919 % 13) ** 2 for i in range(n)]
    return [{"id": i, LENGTH: length} for i, length in enumerate(lengths)]


def padded_tokens(steps) -> int:
    return sum(len(micro) * max(r[LENGTH] for r in micro) for step in steps for micro in step)


def ids(steps) -> list[list[int]]:
    return [sorted(r["id"] for micro in step for r in micro) for step in steps]


def test_grouping_keeps_every_row_once_and_pads_less():
    data = rows(200)
    plain = list(step_batches(iter(data), step_size=8, micro_size=4, group_by_length=False, seed=0))
    grouped = list(step_batches(iter(data), step_size=8, micro_size=4, group_by_length=True, seed=0))
    assert sorted(itertools.chain(*ids(grouped))) == list(range(200)), "nothing lost, nothing repeated"
    assert [r["id"] for step in plain for micro in step for r in micro] == list(range(200)), "off: data order"
    assert padded_tokens(grouped) < 0.8 * padded_tokens(plain)


def test_a_step_holds_the_same_rows_whatever_the_micro_batch_split():
    data = rows(100)
    whole = list(step_batches(iter(data), step_size=4, micro_size=4, group_by_length=True, seed=3))
    split = list(step_batches(iter(data), step_size=4, micro_size=1, group_by_length=True, seed=3))
    assert ids(whole) == ids(split)
    assert all(len(step) == 4 for step in split[:-1]) and all(len(step) == 1 for step in whole)


def test_step_order_depends_on_the_seed_only():
    data = rows(300)
    again = [ids(step_batches(iter(data), 8, 8, True, seed=s)) for s in (1, 1, 2)]
    assert again[0] == again[1] and again[0] != again[2]


def test_last_partial_step_is_kept():
    steps = list(step_batches(iter(rows(10)), step_size=4, micro_size=2, group_by_length=True, seed=0))
    assert sorted(len(list(itertools.chain(*s))) for s in steps) == [2, 4, 4]


@pytest.mark.parametrize("max_prompt_length, expected_prompt", [(None, [3, 4, 5, 6]), (2, [5, 6])])
def test_fit_cuts_the_prompt_from_the_left_and_never_empties_a_completion(max_prompt_length, expected_prompt):
    prompt, (chosen, rejected) = fit([1, 2, 3, 4, 5, 6], [[7, 8], [9, 9, 9, 9]], 8, max_prompt_length)
    assert prompt == expected_prompt and chosen == [7, 8] and rejected == [9, 9, 9, 9]
    # A completion longer than max_length keeps max_length - 1 tokens and one prompt token.
    prompt, (chosen,) = fit([1, 2, 3], [list(range(20))], 8)
    assert prompt == [3] and chosen == list(range(7))


def test_column_names_match_trls_tokenized_layout():
    assert (PROMPT_IDS, CHOSEN_IDS, REJECTED_IDS) == ("prompt_ids", "chosen_ids", "rejected_ids")
