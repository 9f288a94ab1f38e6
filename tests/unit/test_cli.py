"""The command line: `alignlib` and `python -m alignlib` agree; errors name what is missing."""

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
    done = run(sys.executable, "-m", "alignlib", "prompts", "jobs/demo.yaml", f"output_dir={tmp_path}/run",
               f"data.path={data}")  # fmt: skip
    assert done.returncode == 1
    assert f"{data}:2: field 'question' must be a non-empty string or chat list" in done.stderr
    assert not (tmp_path / "run" / "prompts").exists()


@pytest.mark.parametrize("args", [["run"], ["validate", "missing.yaml"]])
def test_usage_errors_exit_nonzero(args):
    done = run(sys.executable, "-m", "alignlib", *args)
    assert done.returncode == 2


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
    row = {c: None for c in S.PAIR_COLUMNS} | {S.PROMPT_ID: "p", S.PROMPT: "2+2?", S.MESSAGES: chat,
                                              S.CHOSEN: "4", S.REJECTED: "5"}  # fmt: skip
    with pipeline.store.writer("pairs") as out:
        write_table(pa.Table.from_pylist([row], schema=S.arrow_schema(S.PAIR_COLUMNS)), out.table("pairs"))
        out.commit(pipeline.fingerprint("pairs"), inputs={})
    target = tmp_path / "pairs.jsonl"
    done = run(sys.executable, "-m", "alignlib", "export-pairs", "jobs/demo.yaml", f"output_dir={tmp_path}/run",
               "rounds.count=1", "--out", str(target))  # fmt: skip
    assert done.returncode == 0, done.stderr
    (line,) = target.read_text().splitlines()
    assert json.loads(line) == {
        "prompt": chat,
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
    }
    missing = run(sys.executable, "-m", "alignlib", "export-pairs", "jobs/demo.yaml", f"output_dir={tmp_path}/none",
                  "--out", str(target))  # fmt: skip
    assert missing.returncode == 1 and "no complete pairs" in missing.stderr


def test_run_until_stops_after_that_stage(tmp_path):
    done = run(
        sys.executable, "-m", "alignlib", "run", "jobs/demo.yaml", f"output_dir={tmp_path}", "--until", "prompts"
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "prompts" / "manifest.json").exists()
    assert not (tmp_path / "generate").exists()
