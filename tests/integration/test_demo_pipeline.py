"""The demo job as a user runs it on a cluster: `ray job submit --working-dir <repo> -- python -m alignlib run
jobs/demo.yaml output_dir=s3://...` to a Ray head of its own on 127.0.0.1 (token auth, dashboard, free ports,
its own temp dir), writing everything to a real S3 server (SeaweedFS, tests/s3_server.py) with the credentials
in the cluster's environment, next to HF_TOKEN, WANDB_API_KEY and a password, as a cluster job would have them.
Real Ray, vLLM and training: two of the demo's three rounds (`rounds.count=2`, to keep CI short; round 3
repeats round 2's code path), the model round 1 trains sampling round 2's candidates from the store.

Asserts what a user would look at: the stage directories and manifests of every round, the tables' columns
and row counts, the pairs (gold vs weak in round 1, the policy's own best vs worst after), the exported
model, the per-round figures and the table the job ends with, that the held-out reward rises, the engine
starts per round, and that none of the secret values appears in what the job printed or in any file under
its output (a copy of the whole prefix, checkpoints included). The head is always stopped, by pid, so other
Ray instances on the machine are untouched. Local output directories are what the other integration tests use.
"""

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from alignlib import schema as S
from alignlib.locations import RemotePath, copytree, local_copy
from alignlib.rounds import Rounds
from alignlib.spec import load_spec
from alignlib.store import StageStore, read_table

sys.path.insert(0, str(Path(__file__).parent))
from local_ray import LocalHead, ray_executable  # noqa: E402
from output_checks import unsafe_stage_files  # noqa: E402
from s3_server import BUCKET, SECRET_KEY  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration

TRAIN_PROMPTS, EVAL_PROMPTS, SAMPLES, WEAK_SAMPLES, ROUNDS = 360, 40, 4, 1, 2
ROUND_STAGES = ["generate", "score", "pairs", "train", "export", "eval"]


def stage_dir(run: RemotePath, where: str):
    """Where a stage's committed tables are: `round-1/score` -> the attempt its manifest names."""
    subdir, _, stage = where.rpartition("/")
    return StageStore(str(run), subdir or None).path(stage)


def table(run: RemotePath, where: str, name: str):
    return read_table(stage_dir(run, where) / name)


SECRETS = {
    "HF_TOKEN": "hf_integrationFAKEtoken0042",
    "AWS_SECRET_ACCESS_KEY": SECRET_KEY,  # the S3 server's: the job really uses this one
    "WANDB_API_KEY": "wandb-integration-FAKE-key-0042",
    "ALIGNLIB_DB_PASSWORD": "integration-FAKE-password-0042",
}


def submit_demo(run: Path, overrides: list[str], cache: Path) -> str:
    """`ray job submit` of the demo to a Ray head of its own with secrets in its environment; the job's log."""
    env = {
        "ALIGNLIB_CACHE": str(cache),
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        **SECRETS,
        # the job's `python` is the one that runs these tests
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    head = LocalHead(num_cpus=2, dashboard=True, env=env)
    try:
        head.start()
        head.wait_for_dashboard()
        submit = [
            ray_executable(),
            "job",
            "submit",
            "--address",
            head.dashboard_url,
            "--working-dir",
            str(ROOT),
            "--runtime-env-json",
            json.dumps({"excludes": [".venv/", "runs/", ".git/", "**/__pycache__/"]}),
            "--",
            "python",
            "-m",
            "alignlib",
            "run",
            "jobs/demo.yaml",
            *overrides,
        ]
        res = subprocess.run(submit, env=head.env, capture_output=True, text=True, timeout=1500)
    finally:
        head.stop()
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-5000:]
    assert re.search(r"Job 'raysubmit_\w+' succeeded", log), log[-3000:]
    return log


@pytest.fixture(scope="module")
def demo_run(model_cache, s3_server):
    """The demo, submitted with `ray job submit`, writing to S3: (spec, its output_dir, the job's log)."""
    run = RemotePath(f"s3://{BUCKET}/demo-{uuid.uuid4().hex[:8]}")
    overrides = [f"output_dir={run}", f"rounds.count={ROUNDS}"]
    log = submit_demo(run, overrides, model_cache)
    return load_spec(ROOT / "jobs" / "demo.yaml", overrides), run, log


@pytest.fixture(scope="module")
def downloaded(demo_run, tmp_path_factory) -> Path:
    """Every object under the run's prefix, copied to local disk (for scans of every file)."""
    local = tmp_path_factory.mktemp("demo-download") / "run"
    copytree(demo_run[1], local)
    return local


def manifest(run: RemotePath, where: str) -> dict:
    return json.loads((run / where / "manifest.json").read_text())


def figures(run: RemotePath) -> dict:
    return json.loads((run / "rounds.json").read_text())


def test_every_round_wrote_every_stage_once(demo_run):
    _, run, _ = demo_run
    for shared in ("prompts", "baseline"):
        assert manifest(run, shared)["versions"]["ray"].startswith("2.60")
    for k in range(1, ROUNDS + 1):
        assert sorted(p.name for p in (run / f"round-{k}").iterdir()) == sorted(ROUND_STAGES), k
        for stage in ROUND_STAGES:
            committed = manifest(run, f"round-{k}/{stage}")
            assert committed["fingerprint"]
            # Each stage directory: its manifest and the one attempt it names; no leftover of another.
            names = sorted(p.name for p in (run / f"round-{k}" / stage).iterdir())
            assert names == sorted(["manifest.json", committed["attempt"]]), (k, stage, names)
    leftovers = [p for p in run.rglob(".*") if p.name.startswith((".generate", ".ahead", ".train", ".eval"))]
    assert not leftovers, "no candidates sampled ahead are left behind"


def test_prompts_are_split_once_for_every_round(demo_run):
    _, run, _ = demo_run
    assert manifest(run, "prompts")["tables"] == {"train": TRAIN_PROMPTS, "eval": EVAL_PROMPTS}
    train, held = table(run, "prompts", "train"), table(run, "prompts", "eval")
    assert train.column_names == S.PROMPT_COLUMNS
    assert set(train[S.PROMPT_ID].to_pylist()).isdisjoint(held[S.PROMPT_ID].to_pylist())


def test_completions_have_every_sample_with_its_own_seed(demo_run):
    spec, run, _ = demo_run
    done = table(run, "round-1/generate", "completions")
    assert done.column_names == S.COMPLETION_COLUMNS
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
    # Later rounds sample the policy on new seeds; the weak model's answers are round 1's, reused.
    later = table(run, "round-2/generate", "completions").to_pylist()
    assert len(later) == len(rows)
    assert {r[S.SEED] for r in policy}.isdisjoint(r[S.SEED] for r in later if r[S.GENERATOR] == "policy")
    weak = sorted((r[S.PROMPT_ID], r[S.COMPLETION]) for r in later if r[S.GENERATOR] == "weak")
    assert weak == sorted((r[S.PROMPT_ID], r[S.COMPLETION]) for r in by_generator["weak"])


def test_scores_come_from_the_function_reward(demo_run):
    _, run, _ = demo_run
    scored = table(run, "round-1/score", "scored")
    assert scored.column_names == S.SCORED_COLUMNS and scored.num_rows == TRAIN_PROMPTS * (SAMPLES + WEAK_SAMPLES + 1)
    rows = scored.to_pylist()
    assert {r[S.REWARD_SOURCE] for r in rows} == {"alignlib.rewards:numeric_closeness"}
    assert all(0.0 <= r[S.REWARD] <= 1.0 for r in rows)
    assert all(r[S.REWARD] == 1.0 for r in rows if r[S.GENERATOR] == "gold")


def test_round_one_learns_from_gold_vs_weak_and_later_rounds_from_their_own_best_of_n(demo_run):
    _, run, _ = demo_run
    first = table(run, "round-1/pairs", "pairs").to_pylist()
    assert all(r[S.CHOSEN] != r[S.REJECTED] and r[S.MARGIN] >= 0.1 for r in first)
    stats = manifest(run, "round-1/pairs")["stats"]
    assert stats["pairs_gold_vs_weak"] > 0.9 * TRAIN_PROMPTS
    assert stats["pairs_gold_vs_weak"] + stats.get("pairs_best_vs_worst", 0) == len(first)
    gold = [r for r in first if r[S.STRATEGY] == "gold_vs_weak"]
    assert all(r[S.CHOSEN_GENERATOR] == "gold" and r[S.REJECTED_GENERATOR] == "weak" for r in gold)
    for k in range(2, ROUNDS + 1):
        later = table(run, f"round-{k}/pairs", "pairs").to_pylist()
        own = [r for r in later if r[S.STRATEGY] == "best_vs_worst"]
        assert len(own) > len(later) / 2, "most pairs of rounds 2+ are the policy's own best vs worst"
        assert len(own) > TRAIN_PROMPTS, "2 per prompt (rounds.later), most prompts' samples not tied any more"
        assert all(r[S.CHOSEN_GENERATOR] == r[S.REJECTED_GENERATOR] == "policy" for r in own)


def test_training_reported_checkpoints_and_metrics(demo_run):
    spec, run, _ = demo_run
    for k in range(1, ROUNDS + 1):
        stats = manifest(run, f"round-{k}/train")["stats"]
        assert stats["checkpoint"].startswith(f"{run}/train-ray/")
        assert (RemotePath(stats["checkpoint"]) / "model" / "config.json").exists()
        assert stats["final_metrics"]["epoch"] == spec.train.epochs
    metrics = table(run, "round-1/train", "metrics").to_pylist()
    assert [m["epoch"] for m in metrics] == list(range(1, spec.train.epochs + 1))
    assert metrics[-1]["train/sft_loss"] < metrics[0]["train/sft_loss"]


def test_each_round_samples_with_the_export_of_the_round_before(demo_run, model_cache):
    _, run, _ = demo_run
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = local_copy(stage_dir(run, f"round-{ROUNDS}/export") / "model", model_cache / "models")
    assert manifest(run, f"round-{ROUNDS}/export")["stats"]["kind"] == "full"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.num_hidden_layers == 2 and AutoTokenizer.from_pretrained(model_dir).chat_template
    for k in range(2, ROUNDS + 1):
        exported = manifest(run, f"round-{k - 1}/export")["stats"]["model"]
        assert exported == str(stage_dir(run, f"round-{k - 1}/export") / "model")
        assert manifest(run, f"round-{k}/generate")["stats"]["policy"] == exported


def test_stage_outputs_hold_no_pickle(downloaded):
    assert unsafe_stage_files(downloaded) == [], "stage outputs are Parquet, JSON, HTML, safetensors and tokenizer text"


def test_held_out_reward_rises_round_over_round(demo_run):
    _, run, _ = demo_run
    saved = figures(run)
    rewards = [saved["start"]["held_out_reward"]] + [f["held_out_reward"] for f in saved["rounds"]]
    assert rewards[1] > rewards[0] + 0.3, rewards  # round 1: gold vs weak
    assert rewards[2] > rewards[1], rewards  # then mostly the policy's own best-of-N
    assert all(f["win_rate_vs_start"] > 0.7 for f in saved["rounds"]), saved["rounds"]


def test_held_out_figures_match_the_tables(demo_run):
    _, run, _ = demo_run
    saved = figures(run)
    base = table(run, "baseline", "completions").to_pylist()
    assert saved["start"]["held_out_reward"] == pytest.approx(sum(r[S.REWARD] for r in base) / len(base))
    start = previous = {r[S.PROMPT_ID]: r[S.REWARD] for r in base}
    for f in saved["rounds"]:
        rows = table(run, f"round-{f['round']}/eval", "completions").to_pylist()
        trained = {r[S.PROMPT_ID]: r[S.REWARD] for r in rows}
        assert f["held_out_reward"] == pytest.approx(sum(trained.values()) / len(trained))
        assert f["held_out_mean_tokens"] == pytest.approx(sum(r[S.NUM_TOKENS] for r in rows) / len(rows))
        for key, other in (("win_rate_vs_start", start), ("win_rate_vs_previous", previous)):
            wins = [1.0 if trained[p] > other[p] else 0.5 if trained[p] == other[p] else 0.0 for p in trained]
            assert f[key] == pytest.approx(sum(wins) / len(wins)), key
        previous = trained
    for k in range(1, ROUNDS + 1):
        completions = table(run, f"round-{k}/eval", "completions")
        assert completions.num_rows == EVAL_PROMPTS and set(completions[S.GENERATOR].to_pylist()) == {"trained"}
    assert table(run, "baseline", "completions").num_rows == EVAL_PROMPTS
    assert "<script" not in (run / "report.html").read_text()


def test_one_engine_per_model(demo_run):
    _, run, _ = demo_run
    saved = figures(run)
    # The starting policy's held-out answers and round 1's candidates: one engine; the weak model: one;
    # each round's export answers the held-out prompts and samples the next round's candidates: one.
    assert saved["start"]["engine_starts"] == 1
    assert [f["engine_starts"] for f in saved["rounds"]] == [2, 1]


def test_rerun_has_nothing_to_do(demo_run):
    spec, _, _ = demo_run
    assert Rounds(spec).plan() == {"shared": [], **{f"round-{k}": [] for k in range(1, ROUNDS + 1)}}


def test_a_failing_reward_names_the_prompt_it_failed_on(demo_run, ray_session):
    # Through the CLI in its own process, as a user runs it: one stage of one round (on the session's Ray).
    _, run, _ = demo_run
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "alignlib",
            "score",
            "jobs/demo.yaml",
            "--round",
            "1",
            f"output_dir={run}",
            "score.reward.function=math:log",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("alignlib: error:")]
    assert len(errors) == 1, done.stderr[-2000:]
    assert errors[0].startswith("alignlib: error: reward math:log failed on prompt ") and "addition.jsonl:" in errors[0]
    assert manifest(run, "round-1/score")["fingerprint"], "the complete score output of the working spec is kept"


def test_the_submitted_job_streams_its_per_round_table(demo_run):
    _, run, log = demo_run
    assert f"== alignlib job 'demo': 2 of 2 round(s) under {run}" in log
    table_lines = [line.split() for line in log.splitlines() if line.startswith("  ")]
    assert [cells[0] for cells in table_lines if cells and cells[0] in ("round", "start", "1", "2")][:4] == [
        "round",
        "start",
        "1",
        "2",
    ]
    # The console a user reads: rows with rate for each engine stage, Ray's and vLLM's chatter off by default.
    for label, rows in (("generate (weak)", "360/360"), ("score", "2,160/2,160"), ("eval (trained)", "1,480/1,480")):
        assert f"[alignlib] {label}: {rows} rows (100%)" in log, label
    assert len(log.splitlines()) < 600, len(log.splitlines())


def test_a_run_writes_no_secret(demo_run, downloaded):
    _, _, log = demo_run
    run = downloaded
    leaks = [name for name, value in SECRETS.items() if value in log]
    files = [p for p in run.rglob("*") if p.is_file()]
    assert len(files) > 20, "the scan covers the stage outputs and Ray Train's checkpoints"
    leaks += [
        (name, str(p.relative_to(run))) for p in files for name, v in SECRETS.items() if v.encode() in p.read_bytes()
    ]
    assert not leaks, f"secret values found: {leaks}"
