"""What a new user hits first: stale results, late path errors, requests this machine cannot meet, CLI friction.

Each check goes through what the user touches: the `alignlib` command in its own process, or a Pipeline on
files in a temporary directory. None of these needs Ray running except the local-resource check, which
must fail before any stage starts.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from alignlib import schema as S
from alignlib.pipeline import Pipeline
from alignlib.spec import SpecError, load_spec, parse_spec
from alignlib.store import read_table, write_table

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "jobs" / "demo.yaml"


def cli(*args, cwd=ROOT, env=None):
    env = {k: v for k, v in {**os.environ, **(env or {})}.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "alignlib", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def write_questions(path: Path, start: int, n: int) -> Path:
    path.write_text(
        "".join(
            json.dumps({"question": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n" for i in range(start, start + n)
        )
    )
    return path


# -- nothing stale -------------------------------------------------------------------------------


def test_an_edited_data_file_is_read_again(model_cache, tmp_path, capsys):
    data = write_questions(tmp_path / "q.jsonl", 0, 10)
    overrides = [f"output_dir={tmp_path / 'run'}", f"data.path={data}", "data.eval_fraction=0.2"]
    first = Pipeline(load_spec(DEMO, ["rounds.count=1", *overrides])).run(["prompts"])
    assert sum(first["prompts"]["tables"][t] for t in ("train", "eval")) == 10
    write_questions(data, 100, 30)  # 30 other rows, same file name
    again = Pipeline(load_spec(DEMO, ["rounds.count=1", *overrides])).run(["prompts"])
    log = capsys.readouterr().out
    assert "prompts: complete, skipped" not in log
    assert "holds the output of a different spec or input" in log and "replacing it" in log, "never replaced in silence"
    assert sum(again["prompts"]["tables"][t] for t in ("train", "eval")) == 30
    questions = read_table(tmp_path / "run" / "prompts" / "train")[S.PROMPT].to_pylist()
    assert all(int(q.split()[2]) >= 100 for q in questions), "no row of the old file is left"


def test_a_changed_input_moves_the_fingerprints_of_the_stages_it_feeds_and_no_others(
    model_cache, tmp_path, monkeypatch
):
    from alignlib.models import resolve_model

    model = tmp_path / "policy"
    shutil.copytree(resolve_model("builtin:tiny-policy"), model)
    module = tmp_path / "my_reward.py"
    module.write_text("def score(prompt, completion, gold):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    overrides = [
        f"output_dir={tmp_path / 'run'}",
        f"policy.model={model}",
        "score.reward={type: function, function: 'my_reward:score'}",
    ]

    def fingerprints():
        p = Pipeline(load_spec(DEMO, ["rounds.count=1", *overrides]))
        return {s: p.fingerprint(s) for s in p.stages()}

    before = fingerprints()
    module.write_text("def score(prompt, completion, gold):\n    return 2.0\n")
    after_reward = fingerprints()
    assert [s for s in before if before[s] != after_reward[s]] == ["score", "pairs", "train", "export", "eval"]
    with open(model / "model.safetensors", "ab") as f:  # the weights changed in place
        f.write(b"\0")
    after_model = fingerprints()
    assert {s for s in before if after_reward[s] == after_model[s]} == set(), "the policy feeds every stage"


def test_relative_paths_are_made_absolute_once(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    write_questions(tmp_path / "data" / "q.jsonl", 0, 4)
    (tmp_path / "runs" / "old" / "export" / "model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    spec = load_spec(
        DEMO, ["rounds.count=1", "data.path=data/q.jsonl", "output_dir=runs/new", "policy.model=runs/old/export/model"]
    )
    assert spec.data.path == str(tmp_path / "data" / "q.jsonl")
    assert spec.output_dir == str(tmp_path / "runs" / "new")
    assert spec.policy.model == str(tmp_path / "runs" / "old" / "export" / "model")
    assert load_spec(DEMO, ["rounds.count=1", "policy.model=org/model"]).policy.model == "org/model", (
        "a hub id stays a hub id"
    )


# -- errors before any work ----------------------------------------------------------------------


def test_validate_names_bad_sources_and_suggests_the_builtin(tmp_path):
    (tmp_path / "not-a-model").mkdir()
    done = cli(
        "validate",
        str(DEMO),
        "policy.model=builtin:tiny-polcy",
        f"data.path={tmp_path}/none.jsonl",
        f"generate.weak_model.model={tmp_path}/not-a-model",
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert "3 problem(s)" in lines[0] and "Traceback" not in done.stderr
    assert any(line.startswith(f"  - data.path: {tmp_path}/none.jsonl does not exist") for line in lines)
    assert any(
        "policy.model: unknown built-in model 'builtin:tiny-polcy'; did you mean builtin:tiny-policy?" in line
        for line in lines
    )
    assert any(
        f"generate.weak_model.model: {tmp_path}/not-a-model is not a Hugging Face model directory" in line
        for line in lines
    )


def test_run_with_a_missing_model_fails_before_any_stage(tmp_path):
    done = cli("run", str(DEMO), f"output_dir={tmp_path}/run", f"policy.model={tmp_path}/missing/model")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"policy.model: no such model directory {tmp_path}/missing/model" in done.stderr
    assert not (tmp_path / "run").exists(), "nothing was created"


def test_an_object_store_it_cannot_write_fails_before_any_stage_naming_output_dir(s3_prefix, s3_server):
    wrong = "wrong-secret-do-not-print-0042"
    done = cli("run", str(DEMO), f"output_dir={s3_prefix}/run", env={**os.environ, "AWS_SECRET_ACCESS_KEY": wrong})
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert f"output_dir: cannot write to {s3_prefix}/run (" in done.stderr and "SIGNATURE_DOES_NOT_MATCH" in done.stderr
    assert "AWS_SECRET_ACCESS_KEY" in done.stderr and wrong not in done.stderr + done.stdout
    listing = s3_server.filesystem().get_file_info(
        pafs.FileSelector(s3_prefix.removeprefix("s3://"), allow_not_found=True)
    )
    assert listing == [], "nothing was written"


@pytest.mark.parametrize("command", ["run", "validate"])
def test_a_gpu_request_on_a_machine_without_one_fails_at_once(tmp_path, command):
    """`validate` refuses what `run` would refuse before its first stage."""
    started = time.time()
    done = cli(
        command, str(DEMO), f"output_dir={tmp_path}/run", "train.backend.use_gpu=true", "train.backend.num_workers=2"
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "train.backend: the train stage asks for 2 GPU" in done.stderr
    assert "set train.backend.use_gpu=false" in done.stderr
    assert "valid (job" not in done.stdout
    assert not (tmp_path / "run" / "prompts").exists(), "it failed before the first stage"
    assert time.time() - started < 120


def test_unknown_keys_and_bad_choices_name_what_would_be_valid():
    raw = {
        "name": "x",
        "output_dir": "o",
        "data": {"path": "d.jsonl", "prompt_feild": "q"},
        "policy": {"model": "builtin:tiny-policy"},
        "pairs": {"strategy": "foo"},
        "train": {"loss": {"name": "dpo", "bta": 0.1}},
    }
    with pytest.raises(SpecError) as err:
        parse_spec(raw)
    assert err.value.problems == [
        "data.prompt_feild: unknown key; did you mean 'prompt_field'?",
        "pairs.strategy: 'foo' is not one of 'best_vs_worst', 'best_vs_rest', 'best_vs_second', 'best_vs_random', "
        "'rejected_at_mean_minus_2std' or 'gold_vs_weak'",
        "train.loss.bta: unknown key; did you mean 'beta'?",
    ]


def test_eval_on_a_preference_file_needs_a_reward_without_gold_answers():
    raw = {
        "name": "x",
        "output_dir": "o",
        "data": {"path": "p.jsonl", "kind": "preferences"},
        "policy": {"model": "builtin:tiny-policy"},
    }
    with pytest.raises(SpecError) as err:
        parse_spec(raw)
    assert len(err.value.problems) == 1
    assert err.value.problems[0].startswith(
        "eval.enabled: data.kind preferences has no gold answers, and the eval's reward alignlib.rewards:exact_match"
    )
    parse_spec({**raw, "eval": {"enabled": False}})
    parse_spec({**raw, "score": {"reward": {"type": "function", "function": "alignlib.rewards:length_penalty"}}})


# -- the command line ----------------------------------------------------------------------------


def test_options_and_overrides_mix_in_any_order(tmp_path):
    done = cli("run", str(DEMO), "--until", "prompts", "data.limit=20", f"output_dir={tmp_path}/run")
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = json.loads((tmp_path / "run" / "prompts" / "manifest.json").read_text())
    assert manifest["tables"]["train"] + manifest["tables"]["eval"] == 20
    assert cli("run", str(DEMO), "--bogus").returncode == 2


def test_the_demo_runs_from_any_directory(tmp_path):
    done = cli("demo", "--until", "prompts", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "runs" / "demo" / "prompts" / "manifest.json").exists()


def test_output_into_a_closed_pipe_ends_quietly():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "alignlib", "schema"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    proc.stdout.close()  # the reader is gone before alignlib writes (`alignlib schema | head -0`)
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141 and "Traceback" not in stderr, stderr


def scored_run(tmp_path: Path, rewards: list[float], loss: str = "sft") -> Pipeline:
    """A pipeline whose generate and score outputs are written by hand (one prompt per reward, 2 samples)."""
    spec = load_spec(
        DEMO,
        [
            "rounds.count=1",
            f"output_dir={tmp_path / 'run'}",
            f"train.loss={{name: {loss}}}",
            "pairs.strategy=best_vs_worst",
        ],
    )
    pipeline = Pipeline(spec)
    rows = []
    for i, reward in enumerate(rewards):
        messages = [{"role": "user", "content": f"q{i}"}]
        for k, value in enumerate((reward, 0.0)):
            rows.append(
                {
                    S.PROMPT_ID: f"p{i}",
                    S.PROMPT: f"q{i}",
                    S.MESSAGES: messages,
                    S.GOLD: "1",
                    S.SOURCE: f"f:{i}",
                    S.COMPLETION: f"answer {k}",
                    S.GENERATOR: "policy",
                    S.SAMPLE_INDEX: k,
                    S.SEED: k,
                    S.FINISH_REASON: "stop",
                    S.NUM_TOKENS: 2,
                    S.REWARD: value,
                    S.REWARD_SOURCE: "hand",
                }
            )
    for stage, table, columns in (
        ("generate", "completions", S.COMPLETION_COLUMNS),
        ("score", "scored", S.SCORED_COLUMNS),
    ):
        with pipeline.store.writer(stage) as out:
            write_table(
                pa.Table.from_pylist([{c: r[c] for c in columns} for r in rows], schema=S.arrow_schema(columns)),
                out.table(table),
            )
            out.commit(pipeline.fingerprint(stage), inputs={})
    return pipeline


def test_a_degenerate_training_set_is_said_and_the_sft_set_exports(tmp_path, capsys):
    pipeline = scored_run(tmp_path, [0.0] * 19 + [1.0])  # best-of-N is the worst reward on 19 of 20 prompts
    stats = pipeline.run(["pairs"])["pairs"]["stats"]
    (warning,) = stats["warnings"]
    assert warning.startswith("19 of 20 best-of-N rows (the SFT set, mean reward 0.050) have the lowest reward")
    assert f"pairs: warning: {warning}" in capsys.readouterr().out

    target = tmp_path / "sft.jsonl"
    done = cli(
        "export-pairs",
        str(DEMO),
        f"output_dir={tmp_path / 'run'}",
        "rounds.count=1",
        "train.loss={name: sft}",
        "pairs.strategy=best_vs_worst",
        "--table",
        "sft",
        "--out",
        str(target),
    )
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert (
        len(rows) == 20 and rows[0]["prompt"][0]["role"] == "user" and rows[0]["completion"][0]["role"] == "assistant"
    )
    assert sorted(r["reward"] for r in rows)[-1] == 1.0

    healthy = scored_run(tmp_path / "healthy", [1.0] * 20, loss="orpo").run(["pairs"])["pairs"]["stats"]
    assert healthy["warnings"] == []


def test_export_into_a_missing_directory_is_refused(tmp_path):
    done = cli("export-pairs", str(DEMO), f"output_dir={tmp_path}/run", "--out", "/missing/dir/x.jsonl")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--out /missing/dir/x.jsonl: directory /missing/dir does not exist" in done.stderr


def test_gguf_model_sources_are_checked_by_name(tmp_path):
    (tmp_path / "fake.gguf").write_bytes(b"PK\x03\x04 not a gguf file")
    done = cli(
        "validate",
        str(DEMO),
        f"policy.model={tmp_path}/missing.gguf",
        f"generate.weak_model.model={tmp_path}/fake.gguf",
        "score.reward={type: model, model: builtin:smollm2-135m-instrct}",
    )
    assert done.returncode == 2, done.stderr
    assert f"policy.model: {tmp_path}/missing.gguf does not exist" in done.stderr
    assert f"generate.weak_model.model: {tmp_path}/fake.gguf is not a GGUF file" in done.stderr
    assert (
        "score.reward.model: unknown built-in model 'builtin:smollm2-135m-instrct'; did you mean "
        "builtin:smollm2-135m-instruct?" in done.stderr
    )


def test_progress_lines_say_rows_rate_and_time_left():
    from alignlib.progress import describe

    assert describe("generate (policy)", 1024, 1440, 32.0) == (
        "generate (policy): 1,024/1,440 rows (71%), 32.0 rows/s, about 13 s left"
    )
    assert describe("score", 100, 10_000, 10.0) == "score: 100/10,000 rows (1%), 10.0 rows/s, about 16 min 30 s left"
    assert describe("score", 9, 9, 3.0) == "score: 9/9 rows (100%), 3.0 rows/s"


def test_a_moved_or_renamed_data_file_with_the_same_content_reruns_nothing(model_cache, tmp_path, capsys):
    data = write_questions(tmp_path / "q.jsonl", 0, 10)
    run = f"output_dir={tmp_path / 'run'}"
    Pipeline(load_spec(DEMO, ["rounds.count=1", run, f"data.path={data}"])).run(["prompts"])
    (tmp_path / "moved").mkdir()
    moved = data.rename(tmp_path / "moved" / "questions.jsonl")
    capsys.readouterr()
    Pipeline(load_spec(DEMO, ["rounds.count=1", run, f"data.path={moved}"])).run(["prompts"])
    assert "prompts: complete, skipped" in capsys.readouterr().out
