"""The demo job end to end, through both generation engines, with real Ray, vLLM and training; two ways.

- `vllm`: `Pipeline(spec).run()` in this process, on the session's Ray (the vLLM engine);
- `transformers`: `ray job submit --working-dir <repo> -- python -m alignlib run jobs/demo.yaml ...` to a Ray
  head of its own on 127.0.0.1 (token auth, dashboard, free ports, its own temp dir), the way a cluster user
  runs alignlib, with HF_TOKEN, AWS_SECRET_ACCESS_KEY, WANDB_API_KEY and a password in the cluster's
  environment, as a cluster job would have them.

Asserts what a user would look at: the stage directories and manifests, the tables' columns and row counts,
the pairs, the exported model, the before/after eval numbers; for the submitted job, that Ray reports it
succeeded and that none of the secret values appears in what it printed or in any file under its output.
The head is always stopped, by pid, so other Ray instances on the machine are untouched.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from alignlib import schema as S
from alignlib.pipeline import Pipeline
from alignlib.spec import load_spec
from alignlib.stages import STAGES as DECLARED

sys.path.insert(0, str(Path(__file__).parent))
from local_ray import LocalHead, ray_executable  # noqa: E402
from output_checks import unsafe_stage_files  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration

TRAIN_PROMPTS, EVAL_PROMPTS, SAMPLES, WEAK_SAMPLES = 360, 40, 4, 1
STAGES = [s.name for s in DECLARED if "train" in s.flows]  # `alignlib run`'s flow (not bon's select)


def table(run: Path, stage: str, name: str):
    return pads.dataset(str(run / stage / name), format="parquet").to_table()


SECRETS = {
    "HF_TOKEN": "hf_integrationFAKEtoken0042",
    "AWS_SECRET_ACCESS_KEY": "aws-integration-FAKE-secret-0042",
    "WANDB_API_KEY": "wandb-integration-FAKE-key-0042",
    "ALIGNLIB_DB_PASSWORD": "integration-FAKE-password-0042",
}


def submit_demo(run: Path, overrides: list[str], cache: Path) -> str:
    """`ray job submit` of the demo to a Ray head of its own with secrets in its environment; the job's log."""
    env = {"ALIGNLIB_CACHE": str(cache), "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **SECRETS,
           # the job's `python` is the one that runs these tests
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}  # fmt: skip
    head = LocalHead(num_cpus=2, dashboard=True, env=env)
    try:
        head.start()
        head.wait_for_dashboard()
        submit = [
            ray_executable(), "job", "submit", "--address", head.dashboard_url, "--working-dir", str(ROOT),
            "--runtime-env-json", json.dumps({"excludes": [".venv/", "runs/", ".git/", "**/__pycache__/"]}),
            "--", "python", "-m", "alignlib", "run", "jobs/demo.yaml", *overrides,
        ]  # fmt: skip
        res = subprocess.run(submit, env=head.env, capture_output=True, text=True, timeout=1500)
    finally:
        head.stop()
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-5000:]
    assert re.search(r"Job 'raysubmit_\w+' succeeded", log), log[-3000:]
    return log


@pytest.fixture(scope="module", params=["vllm", "transformers"])
def demo_run(request, ray_session, model_cache, tmp_path_factory):
    run = tmp_path_factory.mktemp(f"demo-{request.param}")
    overrides = [f"output_dir={run}", f"generate.engine={request.param}"]
    spec = load_spec(ROOT / "jobs" / "demo.yaml", overrides)
    if request.param == "vllm":
        return spec, run, Pipeline(spec).run(), None
    log = submit_demo(run, overrides, model_cache)
    manifests = {s: json.loads((run / s / "manifest.json").read_text()) for s in Pipeline(spec).stages()}
    return spec, run, manifests, log


def test_every_stage_wrote_a_manifest(demo_run):
    _, run, manifests, _ = demo_run
    assert list(manifests) == [s for s in STAGES if s != "ref_logps"], "ORPO needs no reference stage"
    for stage in manifests:
        assert (run / stage / "manifest.json").exists()
        assert manifests[stage]["fingerprint"] and manifests[stage]["versions"]["ray"].startswith("2.60")
    assert not list(run.glob(".*.tmp-*")), "no temporary stage directories are left behind"


def test_prompts_are_split(demo_run):
    _, run, manifests, _ = demo_run
    assert manifests["prompts"]["tables"] == {"train": TRAIN_PROMPTS, "eval": EVAL_PROMPTS}
    train, held = table(run, "prompts", "train"), table(run, "prompts", "eval")
    assert train.column_names == S.PROMPT_COLUMNS
    assert set(train[S.PROMPT_ID].to_pylist()).isdisjoint(held[S.PROMPT_ID].to_pylist())


def test_completions_have_every_sample_with_its_own_seed(demo_run):
    spec, run, _, _ = demo_run
    done = table(run, "generate", "completions")
    assert done.column_names == S.COMPLETION_COLUMNS
    assert done.num_rows == TRAIN_PROMPTS * (SAMPLES + WEAK_SAMPLES + 1)
    rows = done.to_pylist()
    by_generator = {g: [r for r in rows if r[S.GENERATOR] == g] for g in ("policy", "weak", "gold")}
    assert [len(v) for v in by_generator.values()] == [
        TRAIN_PROMPTS * SAMPLES,
        TRAIN_PROMPTS * WEAK_SAMPLES,
        TRAIN_PROMPTS,
    ]
    policy = by_generator["policy"]
    assert len({r[S.SEED] for r in policy}) == len(policy)
    assert {r[S.SAMPLE_INDEX] for r in policy} == set(range(SAMPLES))
    assert {r[S.FINISH_REASON] for r in policy} <= {"stop", "length"}
    assert all(1 <= r[S.NUM_TOKENS] <= spec.generate.max_new_tokens for r in policy)
    # Sampled at temperature 1, an untrained policy's N samples of one prompt differ.
    first = [r[S.COMPLETION] for r in policy if r[S.PROMPT_ID] == policy[0][S.PROMPT_ID]]
    assert len(set(first)) > 1
    assert all(r[S.COMPLETION] == r[S.GOLD] for r in by_generator["gold"])


def test_scores_come_from_the_function_reward(demo_run):
    _, run, _, _ = demo_run
    scored = table(run, "score", "scored")
    assert scored.column_names == S.SCORED_COLUMNS and scored.num_rows == TRAIN_PROMPTS * (SAMPLES + WEAK_SAMPLES + 1)
    rows = scored.to_pylist()
    assert {r[S.REWARD_SOURCE] for r in rows} == {"alignlib.rewards:numeric_closeness"}
    assert all(0.0 <= r[S.REWARD] <= 1.0 for r in rows)
    assert all(r[S.REWARD] == 1.0 for r in rows if r[S.GENERATOR] == "gold")


def test_pairs_are_valid_and_counted(demo_run):
    _, run, manifests, _ = demo_run
    pairs = table(run, "pairs", "pairs")
    assert pairs.column_names == S.PAIR_COLUMNS
    rows = pairs.to_pylist()
    assert all(r[S.CHOSEN] != r[S.REJECTED] and r[S.MARGIN] >= 0.1 for r in rows)
    stats = manifests["pairs"]["stats"]
    assert stats["pairs_gold_vs_weak"] > 0.9 * TRAIN_PROMPTS
    assert stats["pairs_gold_vs_weak"] + stats.get("pairs_best_vs_worst", 0) == len(rows)
    gold = [r for r in rows if r[S.STRATEGY] == "gold_vs_weak"]
    assert all(r[S.CHOSEN_GENERATOR] == "gold" and r[S.REJECTED_GENERATOR] == "weak" for r in gold)
    assert manifests["pairs"]["tables"]["sft"] == TRAIN_PROMPTS


def test_training_reported_checkpoints_and_metrics(demo_run):
    spec, run, manifests, _ = demo_run
    stats = manifests["train"]["stats"]
    assert Path(stats["checkpoint"], "model", "config.json").exists()
    assert stats["final_metrics"]["epoch"] == spec.train.epochs
    metrics = table(run, "train", "metrics").to_pylist()
    assert [m["epoch"] for m in metrics] == list(range(1, spec.train.epochs + 1))
    assert metrics[-1]["train/sft_loss"] < metrics[0]["train/sft_loss"]


def test_export_loads_with_from_pretrained(demo_run):
    _, run, manifests, _ = demo_run
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = run / "export" / "model"
    assert manifests["export"]["stats"]["kind"] == "full"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert model.config.num_hidden_layers == 2 and tokenizer.chat_template


def test_stage_outputs_hold_no_pickle(demo_run):
    _, run, _, _ = demo_run
    assert unsafe_stage_files(run) == [], "stage outputs are Parquet, JSON, HTML, safetensors and tokenizer text"


def test_trained_policy_beats_the_starting_policy(demo_run):
    _, run, manifests, _ = demo_run
    s = manifests["eval"]["stats"]
    assert s["prompts"] == EVAL_PROMPTS
    assert s["trained_mean_reward"] > s["base_mean_reward"] + 0.3, s
    assert s["win_rate"] > 0.7, s
    completions = table(run, "eval", "completions")
    assert completions.num_rows == 2 * EVAL_PROMPTS
    assert set(completions[S.GENERATOR].to_pylist()) == {"base", "trained"}


def test_rerun_skips_complete_stages(demo_run, capsys):
    spec, run, manifests, _ = demo_run
    again = Pipeline(spec).run()
    assert {s: m["fingerprint"] for s, m in again.items()} == {s: m["fingerprint"] for s, m in manifests.items()}
    assert capsys.readouterr().out.count("complete, skipped") == len(STAGES) - 1


@pytest.mark.parametrize("demo_run", ["vllm"], indirect=True)  # engine-independent: checked once
def test_a_failing_reward_names_the_prompt_it_failed_on(demo_run, ray_session):
    # Through the CLI in its own process, as a user runs it (attached to the session's Ray: a failed Ray Data
    # run's actors then go with that driver instead of holding CPUs for the rest of this session).
    spec, run, _, _ = demo_run
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    done = subprocess.run(
        [sys.executable, "-m", "alignlib", "score", "jobs/demo.yaml", f"output_dir={run}",
         f"generate.engine={spec.generate.engine}", "score.reward.function=math:log"],
        capture_output=True, text=True, cwd=ROOT, env=env,
    )  # fmt: skip
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("alignlib: error:")]
    assert len(errors) == 1, done.stderr[-2000:]
    assert errors[0].startswith("alignlib: error: reward math:log failed on prompt ") and "addition.jsonl:" in errors[0]
    assert (run / "score" / "manifest.json").exists(), "the complete score output of the working spec is kept"


@pytest.mark.parametrize("demo_run", ["transformers"], indirect=True)  # the run made by `ray job submit`
def test_the_submitted_job_streams_its_summary(demo_run):
    _, run, _, log = demo_run
    assert f"== alignlib job 'demo': outputs under {run}" in log
    assert "trained model (full)" in log and "eval on 40 held-out prompts" in log
    # The console a user reads: rows with rate for each engine stage, Ray's and vLLM's chatter off by default
    # (about 800 lines before; the whole job's log, `ray job submit`'s own lines included, is now under 300).
    for label, rows in (("generate (policy)", "1,440/1,440"), ("score", "2,160/2,160"), ("eval (trained)", "40/40")):
        assert f"[alignlib] {label}: {rows} rows (100%)" in log, label
    assert len(log.splitlines()) < 300, len(log.splitlines())


@pytest.mark.parametrize("demo_run", ["transformers"], indirect=True)  # secrets are in that job's environment
def test_a_run_writes_no_secret(demo_run):
    _, run, _, log = demo_run
    leaks = [name for name, value in SECRETS.items() if value in log]
    files = [p for p in run.rglob("*") if p.is_file()]
    assert len(files) > 20, "the scan covers the stage outputs and Ray Train's checkpoints"
    leaks += [(name, str(p.relative_to(run))) for p in files for name, v in SECRETS.items()
              if v.encode() in p.read_bytes()]  # fmt: skip
    assert not leaks, f"secret values found: {leaks}"
