"""Reading prompt and preference sets in the TRL / alignment-handbook layouts, importing a preference
set as the pairs stage's input, and export-pairs -> import round trips."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignlib import schema as S
from alignlib.cli import main as cli
from alignlib.pipeline import Pipeline, StageInputError
from alignlib.prompts import DataError, prompt_id, read_data
from alignlib.spec import DataSpec, parse_spec
from alignlib.store import read_table, write_table

ROOT = Path(__file__).resolve().parents[2]
USER = {"role": "user", "content": "2+2?"}
SYSTEM = {"role": "system", "content": "be brief"}


def assistant(text):
    return {"role": "assistant", "content": text}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


LAYOUTS = [
    ("plain text", {"prompt": "2+2?", "chosen": "4", "rejected": "5"}),
    ("conversational, assistant turns", {"prompt": [USER], "chosen": [assistant("4")], "rejected": [assistant("5")]}),
    (
        "explicit prompt, whole conversations",
        {"prompt": "2+2?", "chosen": [USER, assistant("4")], "rejected": [USER, assistant("5")]},
    ),
    ("implicit prompt", {"chosen": [USER, assistant("4")], "rejected": [USER, assistant("5")]}),
    ("with scores", {"prompt": "2+2?", "chosen": "4", "rejected": "5", "score_chosen": 9, "score_rejected": 2.5}),
]


@pytest.mark.parametrize("record", [r for _, r in LAYOUTS], ids=[n for n, _ in LAYOUTS])
def test_preference_layouts_read_the_same(tmp_path, record):
    path = write_jsonl(tmp_path / "p.jsonl", [record])
    prompts, (pref,), counts = read_data(DataSpec(path=str(path), kind="preferences"))
    assert [p[S.MESSAGES] for p in prompts] == [[USER]] and prompts[0][S.GOLD] is None
    assert (pref[S.PROMPT_ID], pref[S.PROMPT], pref[S.MESSAGES]) == (prompt_id([USER]), "2+2?", [USER])
    assert (pref[S.CHOSEN], pref[S.REJECTED], pref[S.SOURCE]) == ("4", "5", f"{path}:1")
    expected = (9.0, 2.5) if "score_chosen" in record else (None, None)
    assert (pref[S.CHOSEN_REWARD], pref[S.REJECTED_REWARD]) == expected
    assert counts == {"duplicates_merged": 0, "pgold_rows": 1}


def test_parquet_preferences_with_multi_turn_prompt_and_several_pairs_per_prompt(tmp_path):
    prompt = [SYSTEM, USER, assistant("Four?"), {"role": "user", "content": "sure?"}]
    path = tmp_path / "p.parquet"
    pq.write_table(
        pa.Table.from_pylist(
            [
                {"prompt": prompt, "chosen": [assistant("yes")], "rejected": [assistant("no")]},
                {"prompt": prompt, "chosen": [assistant("yes")], "rejected": [assistant("maybe")]},
            ]
        ),
        path,
    )
    prompts, prefs, counts = read_data(DataSpec(path=str(path), kind="preferences"))
    assert len(prompts) == 1 and prompts[0][S.MESSAGES] == prompt and prompts[0][S.PROMPT] == "sure?"
    assert [(p[S.REJECTED], p[S.SOURCE]) for p in prefs] == [("no", f"{path}#0"), ("maybe", f"{path}#1")]
    assert counts == {"duplicates_merged": 1, "pgold_rows": 2}


def test_prompt_sets_in_trl_and_messages_layouts(tmp_path):
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": "plain?"},
            {"prompt": [SYSTEM, USER]},
            {"prompt": "pref?", "chosen": "a", "rejected": "b"},  # a TRL preference row used as a prompt
            {
                "chosen": [{"role": "user", "content": "implicit?"}, assistant("a")],
                "rejected": [{"role": "user", "content": "implicit?"}, assistant("b")],
            },
        ],
    )
    prompts, prefs, _ = read_data(DataSpec(path=str(path)))
    assert [p[S.PROMPT] for p in prompts] == ["plain?", "2+2?", "pref?", "implicit?"] and prefs == []
    # An SFT-style `messages` column: the final assistant turn is the gold answer.
    sft = write_jsonl(tmp_path / "m.jsonl", [{"messages": [SYSTEM, USER, assistant("4")]}])
    (row,), _, _ = read_data(DataSpec(path=str(sft), prompt_field="messages"))
    assert row[S.MESSAGES] == [SYSTEM, USER] and row[S.GOLD] == "4"


BAD = [
    ({"prompt": "q", "rejected": "b"}, "missing field 'chosen' of a preference set"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "field 'chosen' must be a string or a chat list, got int"),
    (
        {"prompt": "q", "chosen": "a", "rejected": [USER, assistant("b")]},
        "field 'rejected' must be one assistant turn after the prompt, got roles ['user', 'assistant']",
    ),
    (
        {"prompt": [USER], "chosen": [assistant("a"), USER], "rejected": "b"},
        "field 'chosen' must be one assistant turn after the prompt, got roles ['assistant', 'user']",
    ),
    (
        {"prompt": "q", "chosen": [{"role": "assistant"}], "rejected": "b"},
        "chosen[0] must be an object with string 'role' and 'content'",
    ),
    (
        {"prompt": "q", "chosen": "a", "rejected": "b", "score_chosen": "high"},
        "field 'score_chosen' must be a finite number, got 'high'",
    ),
    (
        {"chosen": [assistant("a")], "rejected": [assistant("b")]},
        "no field 'prompt', and 'chosen' and 'rejected' share no leading prompt turns",
    ),
    ({"chosen": "a", "rejected": "b"}, "missing field 'prompt'"),
    (
        {"prompt": [USER, assistant("a"), assistant("b")], "chosen": "a", "rejected": "b"},
        "prompt must hold prompt turns before its final assistant answer",
    ),
]


@pytest.mark.parametrize("record, message", BAD, ids=[m.split(" must")[0][:40] for _, m in BAD])
def test_bad_pgold_rows_name_file_line_and_field(tmp_path, record, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine", "chosen": "a", "rejected": "b"}, record])
    with pytest.raises(DataError) as info:
        read_data(DataSpec(path=str(path), kind="preferences"))
    assert str(info.value).startswith(f"{path}:2: ") and message in str(info.value)


def test_bad_parquet_row_names_the_row(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "chosen": ["x", None], "rejected": ["y", "z"]}), path)
    with pytest.raises(DataError, match=rf"^{path}#1: field 'chosen' must be a string or a chat list, got NoneType"):
        read_data(DataSpec(path=str(path), kind="preferences"))


def test_a_chat_answer_and_a_gold_field_together_are_ambiguous(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": [USER, assistant("4")], "answer": "4"}])
    with pytest.raises(DataError, match=r"m.jsonl:1: messages ends with an assistant answer and data.gold_field"):
        read_data(DataSpec(path=str(path), prompt_field="messages", gold_field="answer"))


def job(tmp_path, data, **sections):
    raw = {
        "name": "prefs",
        "output_dir": str(tmp_path / "run"),
        "policy": {"model": "builtin:tiny-policy"},
        "data": {"kind": "preferences", "eval_fraction": 0.0} | data,
        "eval": {"enabled": False},
    } | sections
    return parse_spec(raw)


def test_imported_preferences_go_from_prompts_straight_to_pairs(tmp_path):
    rows = [
        {
            "prompt": f"q{i}",
            "chosen": f"good {i}",
            "rejected": f"bad {i}",
            "score_chosen": 1.0 + i,
            "score_rejected": 0.5,
        }
        for i in range(10)
    ]
    rows += [rows[0], {"prompt": "q0", "chosen": "same", "rejected": "same"}]
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    spec = job(
        tmp_path,
        {"path": str(path), "eval_fraction": 0.2},
        eval={"enabled": True},
        score={"reward": {"type": "function", "function": "alignlib.rewards:length_penalty"}},
    )
    pipeline = Pipeline(spec)
    assert pipeline.stages() == ["prompts", "pairs", "train", "export", "eval"]
    manifests = pipeline.run(["prompts", "pairs"])
    assert manifests["prompts"]["tables"] == {"train": 8, "eval": 2, "preferences": 12}
    stats = manifests["pairs"]["stats"]
    pairs = read_table(pipeline.table_path("pairs", "pairs"))
    assert pairs.column_names == S.PAIR_COLUMNS and pairs.num_rows == stats["pairs_imported"]
    held = set(read_table(pipeline.table_path("prompts", "eval"))[S.PROMPT_ID].to_pylist())
    assert held.isdisjoint(pairs[S.PROMPT_ID].to_pylist())
    # 12 rows: 8 train prompts' pairs kept, 2 prompts held out, and a repeat and a same-text pair of q0
    # (seed 0 keeps q0 for training), each dropped and counted
    assert prompt_id([{"role": "user", "content": "q0"}]) not in held
    assert (stats["pairs_imported"], stats["held_out_for_eval"]) == (8, 2)
    assert (stats["dropped_duplicate"], stats["dropped_identical"]) == (1, 1)
    assert manifests["pairs"]["tables"]["sft"] == 8
    report = (pipeline.store.path("pairs") / "report.html").read_text()
    assert "reward of chosen" in report and "<svg" in report
    assert stats["quality"]["reward_by_generator"]["rejected"]["mean"] == 0.5
    with pytest.raises(
        StageInputError, match="stage 'score' is not part of this job: it runs only when data.kind is prompts"
    ):
        pipeline.run(["score"])


def test_export_pairs_then_import_gives_the_same_pairs(tmp_path, capsys):
    chat = [SYSTEM, USER]
    original = [
        {
            S.PROMPT_ID: prompt_id(chat),
            S.PROMPT: "2+2?",
            S.MESSAGES: chat,
            S.CHOSEN: "4",
            S.REJECTED: "5",
            S.CHOSEN_REWARD: 1.0,
            S.REJECTED_REWARD: 0.25,
            S.MARGIN: 0.75,
            S.STRATEGY: "best_vs_worst",
            S.CHOSEN_GENERATOR: "policy",
            S.REJECTED_GENERATOR: "policy",
        },
        {
            S.PROMPT_ID: prompt_id([USER]),
            S.PROMPT: "2+2?",
            S.MESSAGES: [USER],
            S.CHOSEN: 'four\n"4"',
            S.REJECTED: "",
            S.CHOSEN_REWARD: None,
            S.REJECTED_REWARD: None,
            S.MARGIN: None,
            S.STRATEGY: "gold_vs_weak",
            S.CHOSEN_GENERATOR: "gold",
            S.REJECTED_GENERATOR: "weak",
        },
    ]
    source = Pipeline(
        parse_spec(
            {
                "name": "src",
                "output_dir": str(tmp_path / "src"),
                "data": {"path": "x.jsonl"},
                "policy": {"model": "builtin:tiny-policy"},
            }
        )
    )
    with source.store.writer("pairs") as out:
        write_table(pa.Table.from_pylist(original, schema=S.arrow_schema(S.PAIR_COLUMNS)), out.table("pairs"))
        out.commit(source.fingerprint("pairs"), inputs={})
    exported = tmp_path / "pairs.jsonl"
    spec_file = tmp_path / "src.yaml"
    spec_file.write_text(json.dumps(source.spec.model_dump(mode="json")))
    assert cli(["export-pairs", str(spec_file), "--out", str(exported)]) == 0
    assert "wrote 2 pairs" in capsys.readouterr().out

    imported = Pipeline(job(tmp_path, {"path": str(exported)}))
    imported.run(["prompts", "pairs"])
    back = read_table(imported.table_path("pairs", "pairs")).to_pylist()
    same = [S.PROMPT_ID, S.PROMPT, S.MESSAGES, S.CHOSEN, S.REJECTED, S.CHOSEN_REWARD, S.REJECTED_REWARD, S.MARGIN]
    assert [{c: r[c] for c in same} for r in back] == [{c: r[c] for c in same} for r in original]
    assert {r[S.STRATEGY] for r in back} == {"imported"}

    # and once more: exporting the imported pairs writes the same file
    again = tmp_path / "again.jsonl"
    (tmp_path / "imp.yaml").write_text(json.dumps(imported.spec.model_dump(mode="json")))
    assert cli(["export-pairs", str(tmp_path / "imp.yaml"), "--out", str(again)]) == 0
    assert again.read_text() == exported.read_text()


def test_a_preference_set_without_usable_pairs_stops_the_pairs_stage(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "q", "chosen": "same", "rejected": "same"}])
    pipeline = Pipeline(job(tmp_path, {"path": str(path)}))
    with pytest.raises(
        StageInputError, match=r"no training examples survived .*'dropped_identical': 1.*preference file"
    ):
        pipeline.run(["prompts", "pairs"])
    assert not pipeline.store.path("pairs").exists()
