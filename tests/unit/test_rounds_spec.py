"""Iterative rounds without running a model: the spec, each round's spec, layout, fingerprints, slices, figures.

The runs themselves (two rounds end to end, a kill in round 2, a changed round-1 setting) are in
tests/integration/test_rounds.py and the demo test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from alignlib import schema as S
from alignlib.pipeline import Pipeline
from alignlib.prompts import round_of
from alignlib.report import render_rounds
from alignlib.rounds import Rounds, round_spec, win_rate
from alignlib.spec import SpecError, load_spec
from alignlib.stages.score import data_figures

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "jobs" / "demo.yaml"
# The single-pass demo: the demo job with its rounds section set back to one round.
SINGLE = [f"data.path={ROOT / 'jobs/data/addition.jsonl'}", "rounds.count=1"]


def demo(tmp_path, *overrides):
    return load_spec(DEMO, [*SINGLE, f"output_dir={tmp_path / 'run'}", *overrides])


def test_one_round_is_todays_single_pass(tmp_path):
    spec = demo(tmp_path)
    pipeline = Pipeline(spec)
    assert pipeline.stages() == ["prompts", "generate", "score", "pairs", "train", "export", "eval"]
    assert pipeline.store.path("pairs") == tmp_path / "run" / "pairs"
    # A spec without a rounds section fingerprints exactly as one with rounds.count 1.
    plain = spec.model_copy(update={"rounds": type(spec.rounds)()})
    assert {n: Pipeline(plain).fingerprint(n) for n in pipeline.stages()} == {
        n: pipeline.fingerprint(n) for n in pipeline.stages()
    }


def test_rounds_lay_out_shared_stages_once_and_each_round_in_its_folder(tmp_path):
    spec = demo(tmp_path, "rounds.count=3")
    rounds = Rounds(spec)
    assert rounds.shared.stages() == ["prompts", "baseline"]
    first, second = rounds.pipelines(2, complete=False)
    assert first.stages() == ["generate", "score", "pairs", "train", "export", "eval"]
    assert first.store.path("train") == tmp_path / "run" / "round-1" / "train"
    assert second.store.path("prompts") == tmp_path / "run" / "prompts"  # shared, whichever round asks
    assert second.fingerprint("prompts") == rounds.shared.fingerprint("prompts")


def test_round_one_on_all_prompts_is_a_single_pass_and_later_rounds_chain_it(tmp_path):
    single = Pipeline(demo(tmp_path))
    first, second = Rounds(demo(tmp_path, "rounds.count=2")).pipelines(2, complete=False)
    for name in ["generate", "score", "pairs", "train", "export"]:
        assert first.fingerprint(name) == single.fingerprint(name), name
    assert first.fingerprint("eval") != single.fingerprint("eval")  # compared with the shared baseline
    # A round-1 setting changes round 1 from that stage on, and every stage of round 2.
    changed_first, changed_second = Rounds(demo(tmp_path, "rounds.count=2", "pairs.min_margin=0.3")).pipelines(
        2, complete=False
    )
    assert [n for n in first.stages() if first.fingerprint(n) != changed_first.fingerprint(n)] == [
        "pairs",
        "train",
        "export",
        "eval",
    ]
    assert all(second.fingerprint(n) != changed_second.fingerprint(n) for n in second.stages())


def test_a_changed_count_keeps_the_earlier_rounds(tmp_path):
    two = Rounds(demo(tmp_path, "rounds.count=2")).pipelines(2, complete=False)
    three = Rounds(demo(tmp_path, "rounds.count=3")).pipelines(2, complete=False)
    for a, b in zip(two, three, strict=True):
        assert {n: a.fingerprint(n) for n in a.stages()} == {n: b.fingerprint(n) for n in b.stages()}


def test_each_round_starts_from_the_previous_export_with_the_chosen_reference(tmp_path):
    spec = demo(tmp_path, "rounds.count=3", "train.loss={name: dpo}")
    second = round_spec(spec, 2)
    assert second.policy.model == str(tmp_path / "run" / "round-1" / "export" / "model")
    assert second.policy.chat_template == spec.policy.chat_template
    assert second.train.reference_model == "builtin:tiny-policy"  # rounds.reference: initial (the default)
    assert round_spec(spec, 1) is spec
    previous = round_spec(demo(tmp_path, "rounds.count=3", "rounds.reference=previous"), 3)
    assert previous.train.reference_model is None  # the round's own starting model
    assert previous.policy.model.endswith("round-2/export/model")
    base = demo(tmp_path, "rounds.count=3", "rounds.start_from=base")
    assert round_spec(base, 3).policy.model == "builtin:tiny-policy"


def test_fresh_prompt_slices_are_disjoint_seeded_and_cover_every_prompt():
    ids = [f"p{i}" for i in range(3000)]
    slices = [round_of(pid, 7, 3) for pid in ids]
    assert set(slices) == {1, 2, 3}
    assert all(900 < slices.count(k) < 1100 for k in (1, 2, 3))
    assert slices == [round_of(pid, 7, 3) for pid in ids]  # the same on every rerun
    assert slices != [round_of(pid, 8, 3) for pid in ids]  # and another for another seed


def test_fresh_rounds_sample_only_their_slice(tmp_path):
    spec = demo(tmp_path, "rounds.count=2", "rounds.prompts=fresh")
    first, second = Rounds(spec).pipelines(2, complete=False)
    assert first.fingerprint("generate") != Pipeline(demo(tmp_path)).fingerprint("generate")


def test_round_figures_are_computed_from_rows():
    assert win_rate({"a": 1.0, "b": 0.0, "c": 0.5}, {"a": 0.0, "b": 1.0, "c": 0.5}) == pytest.approx(0.5)
    assert win_rate({"a": 1.0}, {"z": 0.0}) is None
    rows = [
        {S.PROMPT_ID: "a", S.GENERATOR: S.GENERATOR_POLICY, S.REWARD: 1.0, S.NUM_TOKENS: 4},
        {S.PROMPT_ID: "a", S.GENERATOR: S.GENERATOR_POLICY, S.REWARD: 0.0, S.NUM_TOKENS: 8},
        {S.PROMPT_ID: "b", S.GENERATOR: S.GENERATOR_POLICY, S.REWARD: 0.5, S.NUM_TOKENS: 6},
        {S.PROMPT_ID: "b", S.GENERATOR: S.GENERATOR_POLICY, S.REWARD: 0.5, S.NUM_TOKENS: 6},
        {S.PROMPT_ID: "b", S.GENERATOR: S.GENERATOR_GOLD, S.REWARD: 1.0, S.NUM_TOKENS: None},
    ]
    f = data_figures(pa.Table.from_pylist(rows))
    assert f["sample_mean_reward"] == pytest.approx(0.5) and f["sample_max_reward"] == 1.0
    assert f["best_worst_gap"] == pytest.approx(0.5) and f["tied_share"] == pytest.approx(0.5)
    assert f["sample_mean_tokens"] == pytest.approx(6.0)


def test_the_report_is_one_page_without_scripts():
    figures = [
        {
            "round": 1,
            "held_out_reward": 0.5,
            "win_rate_vs_start": 0.9,
            "win_rate_vs_previous": 0.9,
            "tied_share": 0.2,
            "pairs": {"best_vs_worst": 10},
        },
        {
            "round": 2,
            "held_out_reward": 0.7,
            "win_rate_vs_start": 0.95,
            "win_rate_vs_previous": 0.6,
            "tied_share": 0.1,
            "pairs": {"best_vs_worst": 12},
        },
    ]
    spec = load_spec(DEMO, SINGLE)
    page = render_rounds(spec, {"held_out_reward": 0.1}, figures, {1: [{"step": 1, "loss": 2.0}]})
    assert "<script" not in page and page.count("<svg") >= 5
    assert "round-2/pairs/report.html" in page and "0.700" in page


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.lora={r: 4}", "export.merge_lora=false", "eval.enabled=false"], "export.merge_lora: each round"),
        (["rounds.count=0"], "rounds.count"),
        (["rounds.start_from=last"], "rounds.start_from"),
    ],
)
def test_rounds_settings_that_cannot_work_are_refused(tmp_path, overrides, message):
    with pytest.raises(SpecError, match=message):
        demo(tmp_path, "rounds.count=2", *overrides)


def cli(*args):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "alignlib", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120
    )


def test_round_options_are_checked_before_anything_runs(tmp_path):
    out = f"output_dir={tmp_path / 'run'}"
    wrong = cli("run", str(DEMO), out, "rounds.count=2", "--round", "3")
    assert wrong.returncode == 2 and "--round 3: this job has rounds 1 to 2" in wrong.stderr
    unsaid = cli("pairs", str(DEMO), out, "rounds.count=2")  # round 1 unless said otherwise
    assert unsaid.returncode == 1 and "stage 'pairs' needs the output of 'score'" in unsaid.stderr
    assert "run `alignlib score JOB.yaml --round 1`" in unsaid.stderr
    early = cli("pairs", str(DEMO), out, "rounds.count=2", "--round", "2")
    assert early.returncode == 1 and "round 1 is not complete" in early.stderr
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").glob("round-*"))


def test_eval_summary_means_per_prompt_then_over_prompts():
    import pyarrow as pa

    from alignlib.stages.eval import summarize

    answers = pa.table(
        {
            S.PROMPT_ID: ["a", "a", "a", "b", "b", "c", "c"],
            S.GENERATOR: ["base", "trained", "trained", "base", "trained", "base", "trained"],
            S.REWARD: [0.0, 1.0, 0.0, 1.0, 0.0, 0.5, 0.5],
        }
    )
    # Per prompt: a base 0 vs trained 0.5 (win), b 1 vs 0 (loss), c 0.5 vs 0.5 (tie).
    assert summarize(answers) == {
        "prompts": 3,
        "base_mean_reward": pytest.approx(0.5),
        "trained_mean_reward": pytest.approx(1 / 3),
        "win_rate": pytest.approx(0.5),
    }


def test_the_round_table_ends_with_where_the_last_rounds_model_is(tmp_path, capsys):
    import json

    from alignlib.report import print_rounds

    spec = load_spec(ROOT / "jobs" / "demo.yaml", [f"output_dir={tmp_path}"])
    model = tmp_path / "round-2" / "export" / "model"
    model.mkdir(parents=True)
    stats = {"kind": "full", "source": "ckpt/model", "model": str(model)}
    (model.parent / "manifest.json").write_text(json.dumps({"fingerprint": "f", "tables": {}, "stats": stats}))
    print_rounds(spec, {}, [{"round": 1}, {"round": 2}])
    assert f"  model after round 2 (full): {model}" in capsys.readouterr().out.splitlines()
    print_rounds(spec, {}, [{"round": 1}])  # round 1 made no model here: no line rather than a wrong path
    assert "model after round" not in capsys.readouterr().out
