"""Bad input, each kind in both `data.on_bad_rows` modes, through the real CLI and prompts stage.

`error`: the job stops, exit code 1, the message names the file, line (JSONL) or row (Parquet) and
field, and no prompts output is left behind. `reject`: the bad row is in `prompts/rejected_rows` with
its reason, every valid row is in prompts/train + prompts/eval, and the counts are in the manifest and
in the summary the CLI prints. Problems with the file itself stop the job in both modes.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignlib import schema as S
from alignlib.cli import main as cli
from alignlib.prompts import RAW_CHARS
from alignlib.records import REASONS
from alignlib.store import StageStore, read_table

GOOD = [{"q": f"What is {i} + {i}?", "a": str(2 * i)} for i in range(1, 5)]
LONG = "one two three " * 200  # ~600 tokens: with max_new_tokens 8 over tiny-policy's 512 positions
BAD_AT = 2  # the bad row comes after two good ones: line 3 of a JSONL file, row #2 of a Parquet file


@pytest.fixture(autouse=True)
def _models(model_cache):
    """Built-in models are built into the session's cache (conftest), not ~/.cache."""


@dataclass
class Case:
    name: str
    bad: Any  # JSONL: the line's bytes or a record; Parquet: a record
    field: str | None
    reason: str
    message: str  # a part of the error message after "file:line: "
    fmt: str = "jsonl"


CASES = [
    Case("invalid_json", b'{"q": "What is 5 + 5?", "a": ', None, "invalid_json", "invalid JSON: Expecting value"),
    Case("not_an_object", b'["What is 5 + 5?"]', None, "not_an_object", "expected a JSON object, got list"),
    Case("not_utf8", b'{"q": "caf\xe9?", "a": "1"}', None, "not_utf8", "not UTF-8: byte 0xe9 at column 11"),
    Case("missing_prompt", {"question": "What is 5 + 5?", "a": "10"}, "q", "missing_field", "missing field 'q'"),
    Case("null_prompt", {"q": None, "a": "10"}, "q", "null_field", "field 'q' must be a non-empty string or chat"),
    Case("missing_gold", {"q": "What is 5 + 5?"}, "a", "missing_field", "field 'a' must be a string or number"),
    Case("null_gold", {"q": "What is 5 + 5?", "a": None}, "a", "null_field", "field 'a' must be a string or"),
    Case("empty_prompt", {"q": "   ", "a": "10"}, "q", "empty_prompt", "field 'q' is an empty string"),
    Case("empty_chat", {"q": [], "a": "10"}, "q", "empty_prompt", "field 'q' must be a non-empty string or chat"),
    Case(
        "wrong_type_prompt", {"q": 5, "a": "10"}, "q", "wrong_type", "must be a non-empty string or chat list, got int"
    ),
    Case("wrong_type_gold", {"q": "What is 5 + 5?", "a": {"v": 10}}, "a", "wrong_type", "got {'v': 10}"),
    Case("bad_chat", {"q": [{"role": "user"}], "a": "10"}, "q", "bad_chat", "q[0] must be an object with string"),
    Case(
        "conflicting_gold",
        {"q": "What is 1 + 1?", "a": "3"},
        "a",
        "conflicting_gold",
        "same prompt as {path}:1 but a different gold answer (field 'a': '3' vs '2')",
    ),
    Case(
        "prompt_too_long",
        {"q": LONG, "a": "1"},
        "q",
        "prompt_too_long",
        "with generate.max_new_tokens 8 that is more than the 512-token context of the policy model",
    ),
    Case("parquet_null_prompt", {"q": None, "a": "10"}, "q", "null_field", "got NoneType", fmt="parquet"),
    Case("parquet_null_gold", {"q": "What is 5 + 5?", "a": None}, "a", "null_field", "got None", fmt="parquet"),
    Case("parquet_empty_prompt", {"q": "", "a": "10"}, "q", "empty_prompt", "is an empty string", fmt="parquet"),
    Case("parquet_prompt_too_long", {"q": LONG, "a": "1"}, "q", "prompt_too_long", "512-token context", fmt="parquet"),
]


def write_data(path: Path, rows: list, fmt: str) -> Path:
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
        return path
    lines = [r if isinstance(r, bytes) else json.dumps(r).encode() for r in rows]
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def write_job(tmp_path: Path, data: Path, mode: str, **data_fields) -> Path:
    job = {
        "name": "bad",
        "output_dir": str(tmp_path / "run"),
        "policy": {"model": "builtin:tiny-policy"},
        "data": {"path": str(data), "prompt_field": "q", "gold_field": "a", "eval_fraction": 0.25, "on_bad_rows": mode}
        | data_fields,
        "generate": {"engine": "transformers", "max_new_tokens": 8},
    }
    spec = tmp_path / "job.yaml"
    spec.write_text(json.dumps(job))
    return spec


def case_file(tmp_path: Path, case: Case) -> Path:
    rows = [*GOOD[:BAD_AT], case.bad, *GOOD[BAD_AT:]]
    return write_data(tmp_path / f"data.{case.fmt}", rows, case.fmt)


def where(path: Path, case: Case) -> str:
    return f"{path}:{BAD_AT + 1}" if case.fmt == "jsonl" else f"{path}#{BAD_AT}"


def prompts_kept(tmp_path: Path) -> list[str]:
    stage = StageStore(tmp_path / "run").path("prompts")
    return sorted(p for t in ("train", "eval") for p in read_table(stage / t)[S.PROMPT].to_pylist())


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_error_mode_stops_naming_file_line_and_field(tmp_path, capsys, case):
    data = case_file(tmp_path, case)
    assert cli(["prompts", str(write_job(tmp_path, data, "error"))]) == 1
    err = capsys.readouterr().err
    assert f"alignlib: error: {where(data, case)}: " in err
    assert case.message.replace("{path}", str(data)) in err
    if case.field is not None:
        assert f"'{case.field}'" in err or f"{case.field}[" in err
    assert "data.on_bad_rows: reject would set such rows aside" in err
    assert not (tmp_path / "run" / "prompts").exists()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_reject_mode_sets_the_row_aside_and_keeps_every_valid_row(tmp_path, capsys, case):
    data = case_file(tmp_path, case)
    assert cli(["prompts", str(write_job(tmp_path, data, "reject"))]) == 0
    out = capsys.readouterr().out
    stage = StageStore(tmp_path / "run").path("prompts")
    (row,) = read_table(stage / "rejected_rows").to_pylist()
    assert (row[S.SOURCE], row[S.FIELD], row[S.REASON]) == (where(data, case), case.field, case.reason)
    assert (
        row[S.MESSAGE].startswith(f"{where(data, case)}: ")
        and case.message.replace("{path}", str(data)) in row[S.MESSAGE]
    )
    assert case.reason in REASONS
    if isinstance(case.bad, bytes):
        assert row[S.RAW] == case.bad.decode("utf-8", errors="backslashreplace")
    else:
        raw = json.dumps(case.bad)  # the JSONL line as written, or the Parquet row as JSON
        if len(raw) <= RAW_CHARS:
            assert row[S.RAW] == raw
        else:  # kept to RAW_CHARS, saying how much was cut
            assert row[S.RAW] == f"{raw[:RAW_CHARS]}... ({len(raw) - RAW_CHARS} more characters)"
    assert prompts_kept(tmp_path) == sorted(r["q"] for r in GOOD)
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["tables"] == {"train": 3, "eval": 1, "rejected_rows": 1}
    assert (manifest["stats"]["rejected_rows"], manifest["stats"]["rejected"]) == (1, {case.reason: 1})
    assert f"1 bad row(s) rejected {{'{case.reason}': 1}} -> {stage / 'rejected_rows'}" in out


def test_not_utf8_names_the_byte_offset_in_the_file(tmp_path, capsys):
    data = case_file(tmp_path, CASES[2])
    assert cli(["prompts", str(write_job(tmp_path, data, "error"))]) == 1
    offset = sum(len(json.dumps(r)) + 1 for r in GOOD[:BAD_AT]) + 10  # 0xe9 is byte 10 of its line
    assert f"{data}:3: not UTF-8: byte 0xe9 at column 11 (byte {offset} of the file)" in capsys.readouterr().err
    assert data.read_bytes()[offset] == 0xE9


def test_parquet_chat_with_a_null_role_names_the_row_and_field(tmp_path):
    chats = [{"q": [{"role": "user", "content": r["q"]}], "a": r["a"]} for r in GOOD]
    chats.insert(BAD_AT, {"q": [{"role": None, "content": "What is 5 + 5?"}], "a": "10"})
    data = write_data(tmp_path / "chats.parquet", chats, "parquet")
    assert cli(["prompts", str(write_job(tmp_path, data, "reject"))]) == 0
    (row,) = read_table(tmp_path / "run" / "prompts" / "rejected_rows").to_pylist()
    assert (row[S.SOURCE], row[S.FIELD], row[S.REASON]) == (f"{data}#2", "q", "bad_chat")
    assert json.loads(row[S.RAW]) == chats[BAD_AT]
    assert prompts_kept(tmp_path) == sorted(r["q"] for r in GOOD)


@pytest.mark.parametrize("mode", ["error", "reject"])
def test_duplicates_are_merged_and_counted_not_rejected(tmp_path, capsys, mode):
    data = write_data(tmp_path / "d.jsonl", [*GOOD, GOOD[0], GOOD[1], GOOD[0]], "jsonl")
    assert cli(["prompts", str(write_job(tmp_path, data, mode))]) == 0
    stats = json.loads((tmp_path / "run" / "prompts" / "manifest.json").read_text())["stats"]
    assert (stats["prompts"], stats["duplicates_merged"]) == (4, 3)
    assert prompts_kept(tmp_path) == sorted(r["q"] for r in GOOD)
    summary = capsys.readouterr().out
    assert "prompts: 4 distinct, 3 duplicate(s) merged" in summary
    assert ("; no bad rows" in summary) == (mode == "reject")


@pytest.mark.parametrize("mode", ["error", "reject"])
@pytest.mark.parametrize("content", [b"", b"\n  \n\n"], ids=["empty", "blank_lines"])
def test_an_empty_file_stops_the_job(tmp_path, capsys, mode, content):
    data = tmp_path / "d.jsonl"
    data.write_bytes(content)
    assert cli(["prompts", str(write_job(tmp_path, data, mode))]) == 1
    assert f"alignlib: error: data.path: {data} holds no prompts" in capsys.readouterr().err
    assert not (tmp_path / "run" / "prompts").exists()


@pytest.mark.parametrize("mode", ["error", "reject"])
def test_a_missing_parquet_column_is_one_error_naming_the_file_and_its_columns(tmp_path, capsys, mode):
    data = write_data(tmp_path / "d.parquet", [{"question": r["q"], "a": r["a"]} for r in GOOD], "parquet")
    assert cli(["prompts", str(write_job(tmp_path, data, mode))]) == 1
    err = capsys.readouterr().err
    assert (
        f"alignlib: error: {data}: no column for data.prompt_field 'q'; the file's columns are ['question', 'a']" in err
    )
    assert err.count("no column") == 1
    assert not (tmp_path / "run" / "prompts").exists()


@pytest.mark.parametrize("mode", ["error", "reject"])
def test_an_unreadable_parquet_file_names_the_file(tmp_path, capsys, mode):
    data = tmp_path / "d.parquet"
    data.write_bytes(b"not parquet at all")
    assert cli(["prompts", str(write_job(tmp_path, data, mode))]) == 1
    assert f"alignlib: error: data.path: {data} is not a readable Parquet file" in capsys.readouterr().err


def test_a_wrongly_typed_parquet_column_names_row_and_field_or_rejects_every_row(tmp_path, capsys):
    data = write_data(tmp_path / "d.parquet", [{"q": i, "a": "x"} for i in range(3)], "parquet")
    assert cli(["prompts", str(write_job(tmp_path, data, "error"))]) == 1
    assert f"{data}#0: field 'q' must be a non-empty string or chat list, got int" in capsys.readouterr().err

    assert cli(["prompts", str(write_job(tmp_path, data, "reject"))]) == 1
    table = tmp_path / "run" / "prompts.failed" / "rejected_rows"
    err = capsys.readouterr().err
    assert (
        f"alignlib: error: data.path: every row of {data} was rejected (3 rows: {{'wrong_type': 3}}); see {table}"
        in err
    )
    rejected = read_table(table).to_pylist()
    assert [(r[S.SOURCE], r[S.FIELD], r[S.REASON]) for r in rejected] == [
        (f"{data}#{i}", "q", "wrong_type") for i in range(3)
    ]
    assert not (tmp_path / "run" / "prompts").exists()  # nothing committed: a rerun does not trust it

    fixed = write_data(tmp_path / "d.parquet", GOOD, "parquet")
    assert cli(["prompts", str(write_job(tmp_path, fixed, "reject"))]) == 0
    assert not table.parent.exists()  # a later good run clears the failed run's table


def test_a_duplicate_of_a_rejected_prompt_is_rejected_too(tmp_path):
    data = write_data(tmp_path / "d.jsonl", [*GOOD, {"q": LONG, "a": "1"}, {"q": LONG, "a": "1"}], "jsonl")
    assert cli(["prompts", str(write_job(tmp_path, data, "reject"))]) == 0
    rejected = read_table(tmp_path / "run" / "prompts" / "rejected_rows").to_pylist()
    assert [(r[S.SOURCE], r[S.REASON]) for r in rejected] == [
        (f"{data}:5", "prompt_too_long"),
        (f"{data}:6", "prompt_too_long"),
    ]


def test_bad_pgold_rows_are_set_aside_with_their_field(tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": "good", "rejected": "bad"} for i in range(4)]
    rows.insert(1, {"prompt": "q9", "chosen": "good", "rejected": None})
    rows.insert(3, {"prompt": "q8", "chosen": "good", "rejected": "bad", "score_chosen": float("nan")})
    data = write_data(tmp_path / "p.jsonl", rows, "jsonl")
    job = write_job(tmp_path, data, "reject", kind="preferences", prompt_field="prompt", gold_field=None)
    job.write_text(job.read_text().replace('"generate"', '"eval": {"enabled": false}, "generate"'))
    assert cli(["prompts", str(job)]) == 0
    stage = tmp_path / "run" / "prompts"
    rejected = read_table(stage / "rejected_rows").to_pylist()
    assert [(r[S.SOURCE], r[S.FIELD], r[S.REASON]) for r in rejected] == [
        (f"{data}:2", "rejected", "null_field"),
        (f"{data}:4", "score_chosen", "not_finite"),
    ]
    assert sorted(read_table(stage / "preferences")[S.PROMPT].to_pylist()) == ["q0", "q1", "q2", "q3"]


# -- prompts over the model's context -----------------------------------------------------------


def test_context_counts_max_new_tokens_and_a_change_reruns_the_stage(tmp_path, capsys):
    from alignlib.models import encode_prompt, load_tokenizer

    tokenizer = load_tokenizer("builtin:tiny-policy")
    n = len(encode_prompt(tokenizer, [{"role": "user", "content": LONG[:500]}]))
    assert 300 < n < 500
    data = write_data(tmp_path / "d.jsonl", [*GOOD, {"q": LONG[:500], "a": "1"}], "jsonl")
    job = write_job(tmp_path, data, "reject")
    assert cli(["prompts", str(job), f"generate.max_new_tokens={512 - n}"]) == 0
    assert len(prompts_kept(tmp_path)) == 5
    assert cli(["prompts", str(job), f"generate.max_new_tokens={512 - n + 1}"]) == 0
    assert "prompts: complete, skipped" not in capsys.readouterr().out
    (row,) = read_table(tmp_path / "run" / "prompts" / "rejected_rows").to_pylist()
    assert f"prompt is {n} tokens; with generate.max_new_tokens {512 - n + 1} that is more than" in row[S.MESSAGE]


def test_vllm_max_model_len_and_the_weak_model_bound_the_context(tmp_path, capsys):
    data = write_data(tmp_path / "d.jsonl", [*GOOD, {"q": "What is " + "one " * 60 + "?", "a": "1"}], "jsonl")
    job = str(write_job(tmp_path, data, "error"))
    assert cli(["prompts", job]) == 0  # ~200 tokens + 8 fit tiny-policy's 512 positions
    vllm = ["generate.engine=vllm", "generate.engine_kwargs={max_model_len: 40}"]
    assert cli(["prompts", job, *vllm]) == 1
    err = capsys.readouterr().err
    assert f"{data}:5: field 'q': prompt is " in err
    assert "the 40-token context of the policy model builtin:tiny-policy (generate.engine_kwargs.max_model_len)" in err
    # The weak model renders the prompt with its own template (here: three times over) and has its own context.
    thrice = "{% for _ in range(3) %}{{ messages[-1].content }}{% endfor %}"
    weak = [f"generate.weak_model={{model: builtin:tiny-weak, chat_template: '{thrice}'}}"]
    assert cli(["prompts", job, *weak]) == 1
    assert "the 512-token context of the weak model builtin:tiny-weak (its config)" in capsys.readouterr().err


def test_prompt_lengths_are_the_lengths_generation_encodes(model_cache):
    from tokenizers.processors import TemplateProcessing

    from alignlib.models import encode_prompt, load_tokenizer, prompt_lengths

    chats = [
        [{"role": "user", "content": "What is 1 + 1?"}],
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": LONG}],
        [{"role": "user", "content": "héllo ✓"}],
    ]
    for template in (None, "Q: {{ messages[-1].content }}\nA:"):
        tokenizer = load_tokenizer("builtin:tiny-policy", template)
        assert prompt_lengths(tokenizer, chats) == [len(encode_prompt(tokenizer, c)) for c in chats]
    bare = load_tokenizer("builtin:tiny-policy")
    bare.chat_template = None  # a base model: one user turn is raw text, several turns cannot be rendered
    bos = bare.bos_token_id  # and its tokenizer adds a BOS to raw text, which counts
    bare.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[(bare.bos_token, bos)]
    )
    assert encode_prompt(bare, chats[0])[0] == bos
    assert prompt_lengths(bare, chats) == [len(encode_prompt(bare, chats[0])), None, len(encode_prompt(bare, chats[2]))]


def test_context_length_reads_the_config_as_vllm_does(tmp_path):
    from transformers import GPT2Config, LlamaConfig

    from alignlib.models import context_length

    configs = {
        "llama": LlamaConfig(max_position_embeddings=256),
        "gpt2": GPT2Config(n_positions=300),
        "rope_linear_x4": LlamaConfig(max_position_embeddings=256, rope_scaling={"rope_type": "linear", "factor": 4.0}),
    }
    for name, config in configs.items():
        config.save_pretrained(tmp_path / name)
    assert {name: context_length(str(tmp_path / name)) for name in configs} == {
        "llama": 256,
        "gpt2": 300,
        "rope_linear_x4": 1024,
    }


# -- the spec ----------------------------------------------------------------------------------


def test_every_invalid_spec_value_is_reported_at_once_with_its_path(tmp_path, capsys):
    job = {
        "name": "bad",
        "output_dir": str(tmp_path),
        "colour": "blue",
        "data": {"path": "d.jsonl", "on_bad_rows": "skip", "eval_fraction": 1.5},
        "policy": {"model": "builtin:tiny-policy"},
        "generate": {"num_samples": 0, "top_p": 2.0},
        "pairs": {"strategy": "gold_vs_weak"},
        "train": {"epochs": 0, "loss": {"name": "dpo", "lambda_": 1.0}},
    }
    spec = tmp_path / "job.yaml"
    spec.write_text(json.dumps(job))
    assert cli(["validate", str(spec)]) == 2
    err = capsys.readouterr().err
    assert f"{spec}: 9 problem(s) in the job spec:" in err
    problems = [line.removeprefix("  - ") for line in err.splitlines() if line.startswith("  - ")]
    assert sorted(p.split(":")[0] for p in problems) == [
        "colour",
        "data.eval_fraction",
        "data.gold_field",
        "data.on_bad_rows",
        "generate.num_samples",
        "generate.top_p",
        "generate.weak_model",
        "train.epochs",
        "train.loss.lambda_",
    ]
    assert "data.on_bad_rows: 'skip' is not one of 'error' or 'reject'" in problems
    assert cli(["prompts", str(spec)]) == 2  # a stage command refuses it the same way
