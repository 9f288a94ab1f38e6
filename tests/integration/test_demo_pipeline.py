"""The demo job end to end, through both generation engines, with real Ray, vLLM and training.

Asserts what a user of `alignlib demo` would look at: the stage directories and manifests, the
tables' columns and row counts, the pairs, the exported model, and the before/after eval numbers.
"""

import sys
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from alignlib import schema as S
from alignlib.pipeline import Pipeline
from alignlib.spec import load_spec
from alignlib.stages import NAMES as STAGES

sys.path.insert(0, str(Path(__file__).parent))
from output_checks import unsafe_stage_files  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration

TRAIN_PROMPTS, EVAL_PROMPTS, SAMPLES, WEAK_SAMPLES = 360, 40, 4, 1


def table(run: Path, stage: str, name: str):
    return pads.dataset(str(run / stage / name), format="parquet").to_table()


@pytest.fixture(scope="module", params=["vllm", "transformers"])
def demo_run(request, ray_session, tmp_path_factory):
    run = tmp_path_factory.mktemp(f"demo-{request.param}")
    spec = load_spec(ROOT / "jobs" / "demo.yaml", [f"output_dir={run}", f"generate.engine={request.param}"])
    manifests = Pipeline(spec).run()
    return spec, run, manifests


def test_every_stage_wrote_a_manifest(demo_run):
    _, run, manifests = demo_run
    assert list(manifests) == [s for s in STAGES if s != "ref_logps"], "ORPO needs no reference stage"
    for stage in manifests:
        assert (run / stage / "manifest.json").exists()
        assert manifests[stage]["fingerprint"] and manifests[stage]["versions"]["ray"].startswith("2.60")
    assert not list(run.glob(".*.tmp-*")), "no temporary stage directories are left behind"


def test_prompts_are_split(demo_run):
    _, run, manifests = demo_run
    assert manifests["prompts"]["tables"] == {"train": TRAIN_PROMPTS, "eval": EVAL_PROMPTS}
    train, held = table(run, "prompts", "train"), table(run, "prompts", "eval")
    assert train.column_names == S.PROMPT_COLUMNS
    assert set(train[S.PROMPT_ID].to_pylist()).isdisjoint(held[S.PROMPT_ID].to_pylist())


def test_completions_have_every_sample_with_its_own_seed(demo_run):
    spec, run, _ = demo_run
    done = table(run, "generate", "completions")
    assert done.column_names == S.COMPLETION_COLUMNS
    assert done.num_rows == TRAIN_PROMPTS * (SAMPLES + WEAK_SAMPLES + 1)
    rows = done.to_pylist()
    by_generator = {g: [r for r in rows if r[S.GENERATOR] == g] for g in ("policy", "weak", "reference")}
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
    assert all(r[S.COMPLETION] == r[S.REFERENCE] for r in by_generator["reference"])


def test_scores_come_from_the_function_reward(demo_run):
    _, run, _ = demo_run
    scored = table(run, "score", "scored")
    assert scored.column_names == S.SCORED_COLUMNS and scored.num_rows == TRAIN_PROMPTS * (SAMPLES + WEAK_SAMPLES + 1)
    rows = scored.to_pylist()
    assert {r[S.REWARD_SOURCE] for r in rows} == {"alignlib.rewards:numeric_closeness"}
    assert all(0.0 <= r[S.REWARD] <= 1.0 for r in rows)
    assert all(r[S.REWARD] == 1.0 for r in rows if r[S.GENERATOR] == "reference")


def test_pairs_are_valid_and_counted(demo_run):
    _, run, manifests = demo_run
    pairs = table(run, "pairs", "pairs")
    assert pairs.column_names == S.PAIR_COLUMNS
    rows = pairs.to_pylist()
    assert all(r[S.CHOSEN] != r[S.REJECTED] and r[S.MARGIN] >= 0.1 for r in rows)
    stats = manifests["pairs"]["stats"]
    assert stats["pairs_gold_vs_weak"] > 0.9 * TRAIN_PROMPTS
    assert stats["pairs_gold_vs_weak"] + stats.get("pairs_best_vs_worst", 0) == len(rows)
    gold = [r for r in rows if r[S.STRATEGY] == "gold_vs_weak"]
    assert all(r[S.CHOSEN_GENERATOR] == "reference" and r[S.REJECTED_GENERATOR] == "weak" for r in gold)
    assert manifests["pairs"]["tables"]["sft"] == TRAIN_PROMPTS


def test_training_reported_checkpoints_and_metrics(demo_run):
    spec, run, manifests = demo_run
    stats = manifests["train"]["stats"]
    assert Path(stats["checkpoint"], "model", "config.json").exists()
    assert stats["final_metrics"]["epoch"] == spec.train.epochs
    metrics = table(run, "train", "metrics").to_pylist()
    assert [m["epoch"] for m in metrics] == list(range(1, spec.train.epochs + 1))
    assert metrics[-1]["train/sft_loss"] < metrics[0]["train/sft_loss"]


def test_export_loads_with_from_pretrained(demo_run):
    _, run, manifests = demo_run
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = run / "export" / "model"
    assert manifests["export"]["stats"]["kind"] == "full"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert model.config.num_hidden_layers == 2 and tokenizer.chat_template


def test_stage_outputs_hold_no_pickle(demo_run):
    _, run, _ = demo_run
    assert unsafe_stage_files(run) == [], "stage outputs are Parquet, JSON, HTML, safetensors and tokenizer text"


def test_trained_policy_beats_the_starting_policy(demo_run):
    _, run, manifests = demo_run
    s = manifests["eval"]["stats"]
    assert s["prompts"] == EVAL_PROMPTS
    assert s["trained_mean_reward"] > s["base_mean_reward"] + 0.3, s
    assert s["win_rate"] > 0.7, s
    completions = table(run, "eval", "completions")
    assert completions.num_rows == 2 * EVAL_PROMPTS
    assert set(completions[S.GENERATOR].to_pylist()) == {"base", "trained"}


def test_rerun_skips_complete_stages(demo_run, capsys):
    spec, run, manifests = demo_run
    again = Pipeline(spec).run()
    assert {s: m["fingerprint"] for s, m in again.items()} == {s: m["fingerprint"] for s, m in manifests.items()}
    assert capsys.readouterr().out.count("complete, skipped") == len(STAGES) - 1


def test_a_failing_reward_names_the_prompt_it_failed_on(demo_run):
    # Through the CLI in its own process, as a user runs it: a failed Ray Data run can leave its
    # actors holding CPUs until the driver exits, which would starve later tests in this session.
    import subprocess
    import sys

    spec, run, _ = demo_run
    done = subprocess.run(
        [sys.executable, "-m", "alignlib", "score", "jobs/demo.yaml", f"output_dir={run}",
         f"generate.engine={spec.generate.engine}", "score.reward.function=math:log"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("alignlib: error:")]
    assert len(errors) == 1, done.stderr[-2000:]
    assert errors[0].startswith("alignlib: error: reward math:log failed on prompt ") and "addition.jsonl:" in errors[0]
    assert (run / "score" / "manifest.json").exists(), "the complete score output of the working spec is kept"
