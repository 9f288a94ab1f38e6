"""The command line: `alignlib` and `python -m alignlib` agree; errors name what is missing."""

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run(*args, cwd=ROOT):
    return subprocess.run(list(args), capture_output=True, text=True, cwd=cwd)


def test_console_script_and_module_agree():
    exe = shutil.which("alignlib", path=str(Path(sys.executable).parent))
    assert exe, "the alignlib console script is installed next to python"
    a, b = run(exe, "validate", "jobs/demo.yaml"), run(sys.executable, "-m", "alignlib", "validate", "jobs/demo.yaml")
    assert a.returncode == b.returncode == 0 and a.stdout == b.stdout
    assert "jobs/demo.yaml: valid (job 'demo'" in a.stdout


def test_a_stage_without_its_inputs_says_which_command_to_run(tmp_path):
    done = run(sys.executable, "-m", "alignlib", "score", "jobs/demo.yaml", f"output_dir={tmp_path}")
    assert done.returncode == 1
    assert "stage 'score' needs the output of 'generate'" in done.stderr
    assert "run `alignlib generate JOB.yaml --round 1`" in done.stderr  # the demo has rounds: round 1 by default


def test_bad_data_file_names_the_line(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "1+1?", "answer": "2"}\n{"question": 3, "answer": "4"}\n')
    job = ["jobs/demo.yaml", f"output_dir={tmp_path}/run", f"data.path={data}"]
    done = run(sys.executable, "-m", "alignlib", "prompts", *job)
    assert done.returncode == 1
    assert f"{data}:2: field 'question' must be a non-empty string or chat list" in done.stderr
    assert not (tmp_path / "run" / "prompts").exists()


@pytest.mark.parametrize(
    "args,says",
    [
        (["run"], "alignlib run: error: the following arguments are required: JOB.yaml"),
        (["validate", "missing.yaml"], "missing.yaml: 1 problem(s) in the job spec:\n  - file not found"),
    ],
)
def test_usage_errors_exit_nonzero(args, says):
    done = run(sys.executable, "-m", "alignlib", *args)
    assert done.returncode == 2
    assert says in done.stderr


def test_export_pairs_writes_trl_conversational_jsonl(tmp_path):
    import json

    import pyarrow as pa

    from alignlib import schema as S
    from alignlib.pipeline import Pipeline
    from alignlib.spec import load_spec
    from alignlib.store import write_table

    spec = load_spec(ROOT / "jobs" / "demo.yaml", [f"output_dir={tmp_path}/run", "rounds.count=1"])
    pipeline = Pipeline(spec)
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]
    pair = {S.PROMPT_ID: "p", S.PROMPT: "2+2?", S.MESSAGES: chat, S.CHOSEN: "4", S.REJECTED: "5"}
    row = dict.fromkeys(S.PAIR_COLUMNS) | pair
    with pipeline.store.writer("pairs") as out:
        write_table(pa.Table.from_pylist([row], schema=S.arrow_schema(S.PAIR_COLUMNS)), out.table("pairs"))
        out.commit(pipeline.fingerprint("pairs"), inputs={})
    target = tmp_path / "pairs.jsonl"
    export = [sys.executable, "-m", "alignlib", "export-pairs", "jobs/demo.yaml", "--out", str(target)]
    done = run(*export, f"output_dir={tmp_path}/run", "rounds.count=1")
    assert done.returncode == 0, done.stderr
    (line,) = target.read_text().splitlines()
    assert json.loads(line) == {
        "prompt": chat,
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
    }
    missing = run(*export, f"output_dir={tmp_path}/none")
    assert missing.returncode == 1 and "no complete pairs" in missing.stderr


def test_run_until_stops_after_that_stage(tmp_path):
    done = run(
        sys.executable, "-m", "alignlib", "run", "jobs/demo.yaml", f"output_dir={tmp_path}", "--until", "prompts"
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "prompts" / "manifest.json").exists()
    assert not (tmp_path / "generate").exists()


def test_every_command_has_one_function_in_the_dispatch_table():
    from alignlib import cli

    (subcommands,) = [a for a in cli._parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert list(subcommands.choices) == [
        "run",
        *cli.STAGE_COMMANDS,
        "bon",
        "serve",
        "validate",
        "demo",
        "schema",
        "export-pairs",
        "k8s",
    ]
    assert set(cli.COMMANDS) == set(subcommands.choices)
    assert {"prompts", "generate", "score", "pairs", "train", "export", "eval"} <= set(cli.STAGE_COMMANDS)


# What a command refuses before it starts anything (in this process: no Ray, no stage runs).
REFUSALS = [
    (["run", "--round", "4"], "alignlib: error: --round 4: this job has rounds 1 to 3 (rounds.count)\n"),
    (["run", "--round", "0"], "alignlib: error: --round 0: this job has rounds 1 to 3 (rounds.count)\n"),
    (
        ["run", "--round", "2", "rounds.count=1"],
        "alignlib: error: --round 2: this job has rounds 1 to 1 (rounds.count)\n",
    ),
    (["score", "--round", "4"], "alignlib: error: --round 4: this job has rounds 1 to 3 (rounds.count)\n"),
    (
        ["train", "--round", "2", "rounds.count=1"],
        "alignlib: error: --round 2: this job has rounds 1 to 1 (rounds.count)\n",
    ),
    (
        ["run", "--until", "ref_logps", "rounds.count=1"],
        "alignlib: error: --until ref_logps: this job has no such stage "
        "(prompts, generate, score, pairs, train, export, eval)\n",
    ),
    (
        ["run", "--until", "ref_logps"],
        "alignlib: error: --until ref_logps: this job has no such stage "
        "(prompts, generate, score, pairs, train, export, eval, baseline)\n",
    ),
    (
        ["run", "--round", "4", "--until", "ref_logps"],
        "alignlib: error: --round 4: this job has rounds 1 to 3 (rounds.count)\n",
    ),
    # export-pairs' message has never named rounds.count
    (["export-pairs", "--out", "p.jsonl", "--round", "9"], "alignlib: error: --round 9: this job has rounds 1 to 3\n"),
    (
        ["export-pairs", "--out", "/missing/dir/p.jsonl"],
        "alignlib: error: --out /missing/dir/p.jsonl: directory /missing/dir does not exist\n",
    ),
    (
        ["bon", "--out", "best.txt"],
        "alignlib: error: --out best.txt: give a .jsonl or .parquet file in an existing directory\n",
    ),
]


@pytest.mark.parametrize("args,stderr", REFUSALS, ids=[" ".join(a) for a, _ in REFUSALS])
def test_round_until_and_out_are_refused_before_anything_runs(args, stderr, tmp_path, capsys, monkeypatch):
    from alignlib.cli import main

    monkeypatch.chdir(tmp_path)
    command, *rest = args
    assert main([command, str(ROOT / "jobs" / "demo.yaml"), f"output_dir={tmp_path}/run", *rest]) == 2
    out, err = capsys.readouterr()
    assert (out, err) == ("", stderr)
    assert not (tmp_path / "run").exists(), "nothing was written"
