"""The stage package's contract: one module per stage, listed once; results stored as the manifests have always
held them; the pipeline and rounds naming no stage; a stage runs against any StageContext."""

from __future__ import annotations

import ast
import importlib
import json
import pkgutil
from pathlib import Path
from types import SimpleNamespace

import pytest

import alignlib.stages as stages
from alignlib.stages.contract import Stage, StageResult
from alignlib.stages.eval import BaselineResult, EvalResult
from alignlib.stages.export import ExportResult
from alignlib.stages.generate import GenerateResult
from alignlib.stages.pairs import PairsResult
from alignlib.stages.prompts import PromptsResult
from alignlib.stages.ref_logps import RefLogpsResult
from alignlib.stages.score import ScoreResult
from alignlib.stages.select import SelectResult
from alignlib.stages.train import TrainStageResult

PACKAGE = Path(stages.__file__).parent
NOT_STAGES = {"contract", "sections", "ahead"}  # what stage modules share


def stage_modules() -> dict[str, list[Stage]]:
    """module name -> the Stage declarations it holds."""
    out = {}
    for info in pkgutil.iter_modules([str(PACKAGE)]):
        if info.name in NOT_STAGES:
            continue
        module = importlib.import_module(f"alignlib.stages.{info.name}")
        out[info.name] = [v for v in vars(module).values() if isinstance(v, Stage)]
    return out


def test_every_stage_module_declares_its_stages_and_the_list_holds_each_once():
    modules = stage_modules()
    declared = [s for found in modules.values() for s in found]
    assert sorted(s.name for s in declared) == sorted(stages.NAMES)
    assert len(set(stages.NAMES)) == len(stages.NAMES)
    for name, found in modules.items():
        assert found, f"alignlib/stages/{name}.py declares no Stage"
        # A module is named after its stage; eval.py also holds baseline, which judges the start the same way.
        assert name in {s.name for s in found}, (name, [s.name for s in found])
    assert all(s in stages.STAGES for s in declared)


def test_only_export_makes_the_model_and_only_eval_only_judges():
    assert stages.MODEL_STAGE == "export"
    assert [s.name for s in stages.STAGES if s.evaluates] == ["eval"]
    assert [d.gang for d in stages.stage("train").demands(spec_for())] == [True]


def spec_for(**overrides):
    from alignlib.spec import load_spec

    return load_spec(
        Path(__file__).resolve().parents[2] / "jobs" / "demo.yaml", [f"{k}={v}" for k, v in overrides.items()]
    )


# The few string constants equal to a stage's name that are not one: a flow (`train`) and a figure key (`pairs`).
NOT_A_STAGE = {"pipeline.py": {"train"}, "rounds.py": {"train"}, "report.py": {"pairs"}}


def stage_names_in_code(path: Path) -> set[str]:
    """Stage names among a module's string constants, docstrings aside (they name stages for people)."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    constants = {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    }
    return constants & set(stages.NAMES)


@pytest.mark.parametrize("module", sorted(NOT_A_STAGE))
def test_the_pipeline_rounds_and_report_name_no_stage(module):
    """What they special-case is a declared field of the stage (makes_model, evaluates, gang, figures, result)."""
    named = stage_names_in_code(PACKAGE.parent / module) - NOT_A_STAGE[module]
    assert named == set(), f"alignlib/{module} names stages {sorted(named)} in its code"


def test_the_name_check_finds_a_stage_named_in_code(tmp_path):
    code = tmp_path / "m.py"
    code.write_text(
        '"""The eval stage."""\n'
        "def f(p, names, manifests):\n"
        '    """Reads export."""\n'
        '    return manifests.get("eval"), manifests["pairs"], names.index("score"), p.run(only=["export"])\n'
    )
    assert stage_names_in_code(code) == {"eval", "pairs", "score", "export"}


# What each stage's manifest held as `stats` before results were typed: a result must read them back and store
# them unchanged, or finished runs would report differently.
MANIFEST_STATS = {
    PromptsResult: [
        {"prompts": 40, "duplicates_merged": 2},
        {"prompts": 40, "duplicates_merged": 0, "rejected_rows": 3, "rejected": {"empty_prompt": 1, "invalid_json": 2}},
        {"prompts": 12, "duplicates_merged": 0, "pgold_rows": 12},
    ],
    GenerateResult: [{"engine": "vllm", "engine_starts": 1, "policy": "builtin:tiny-llama"}],
    ScoreResult: [{"reward_mean": 0.25, "reward_brevity_mean": -0.5}],
    PairsResult: [
        {
            "pairs_best_vs_worst": 7,
            "pairs_gold_vs_weak": 30,
            "dropped_tie": 4,
            "sft_rows": 32,
            "quality": {"reward_by_generator": {"policy": {"count": 120}}},
            "warnings": ["only 7 pairs from 80 prompts"],
        }
    ],
    RefLogpsResult: [{"pairs": 37}],
    TrainStageResult: [
        {"checkpoint": "/runs/x/train-ray/r/checkpoint_epoch-1", "examples": 37, "final_metrics": {"epoch": 1}}
    ],
    ExportResult: [{"kind": "full", "source": "/c/model", "model": "/runs/x/export/model"}],
    EvalResult: [
        {"prompts": 8, "base_mean_reward": 0.1, "trained_mean_reward": 0.4, "win_rate": 0.75, "engine_starts": 2}
    ],
    BaselineResult: [{"answers": 16, "base_mean_reward": 0.1, "engine_starts": 1}],
    SelectResult: [{"prompts": 5, "all_truncated": 1, "no_candidates": 0, "tied": 2}],
}


def test_every_stage_result_reads_and_stores_its_manifest_stats_unchanged():
    assert {s.result for s in stages.STAGES} == set(MANIFEST_STATS)
    for kind, examples in MANIFEST_STATS.items():
        for stats in examples:
            result = kind.from_stats(json.loads(json.dumps(stats)))
            assert isinstance(result, StageResult)
            assert result.stats() == stats, kind.__name__


def test_summary_lines_come_from_the_typed_results(tmp_path):
    (tmp_path / "report.html").write_text("<html></html>")
    pairs = PairsResult.from_stats(MANIFEST_STATS[PairsResult][0]).summary(tmp_path)
    assert pairs[0] == "  pairs kept {'pairs_best_vs_worst': 7, 'pairs_gold_vs_weak': 30}; dropped {'dropped_tie': 4}"
    assert pairs[1] == "  warning: only 7 pairs from 80 prompts"
    assert pairs[2].endswith(str(tmp_path / "report.html"))
    rejected = PromptsResult.from_stats(MANIFEST_STATS[PromptsResult][1]).summary(tmp_path)
    assert rejected[0].startswith("  prompts: 40 distinct, 0 duplicate(s) merged; 3 bad row(s) rejected")
    assert GenerateResult.from_stats(MANIFEST_STATS[GenerateResult][0]).summary(tmp_path) == []


def test_a_stage_runs_against_any_stage_context(tmp_path):
    """The select stage reads and writes only through its context (here a plain namespace, not the Pipeline)."""
    import pyarrow as pa

    from alignlib import schema as S
    from alignlib.stages import select
    from alignlib.store import StageStore, write_table

    store = StageStore(tmp_path)
    prompt = {S.PROMPT_ID: "p1", S.PROMPT: "1+1?", S.MESSAGES: [{"role": "user", "content": "1+1?"}], S.SOURCE: "f:1"}
    write_table(
        pa.Table.from_pylist([{**prompt, S.GOLD: "2"}], schema=S.arrow_schema(S.PROMPT_COLUMNS)),
        tmp_path / "prompts" / "train",
    )
    scored = [
        {
            **prompt,
            S.GENERATOR: S.GENERATOR_POLICY,
            S.SAMPLE_INDEX: i,
            S.COMPLETION: text,
            S.REWARD: reward,
            S.FINISH_REASON: reason,
            S.NUM_TOKENS: 3,
            S.GOLD: "2",
            S.SEED: i,
            S.REWARD_SOURCE: "f",
        }
        for i, (text, reward, reason) in enumerate([("3", 0.0, "stop"), ("2 is", 1.0, "length"), ("2", 1.0, "stop")])
    ]
    write_table(pa.Table.from_pylist(scored, schema=S.arrow_schema(S.SCORED_COLUMNS)), tmp_path / "score" / "scored")
    ctx = SimpleNamespace(spec=None, store=store, force=False, round=None, table_path=lambda n, t: store.path(n) / t)
    with store.writer("select") as out:
        result = select.run(ctx, out)
        out.commit("fp", {}, result.stats())
    assert result == SelectResult(prompts=1, all_truncated=0, no_candidates=0, tied=1)
    from alignlib.store import read_table

    (best,) = read_table(tmp_path / "select" / "best").to_pylist()
    assert (best[S.COMPLETION], best["best_sample_index"]) == ("2", 2)  # the tie goes to the answer that stopped


def test_what_the_stages_compute_fits_their_results_without_a_key_dropped():
    """The counts and summaries the stages store come from domain functions; a key they add must reach the result."""
    import pyarrow as pa

    from alignlib import schema as S
    from alignlib.bon import select as bon_select
    from alignlib.prompts import Loaded
    from alignlib.spec import DataSpec
    from alignlib.stages.eval import summarize

    fields = {kind: set(kind.__dataclass_fields__) for kind in MANIFEST_STATS}
    for data in (DataSpec(path="x.jsonl", on_bad_rows="reject"), DataSpec(path="x.jsonl", kind="preferences")):
        assert set(Loaded([], [], [], 0).counts(data)) <= fields[PromptsResult], data
    assert set(bon_select([], [])[2]) == fields[SelectResult]
    rows = [
        {S.PROMPT_ID: "p", S.GENERATOR: g, S.REWARD: r}
        for g, r in ((S.GENERATOR_BASE, 0.0), (S.GENERATOR_TRAINED, 1.0))
    ]
    assert set(summarize(pa.Table.from_pylist(rows))) | {"engine_starts"} == fields[EvalResult]


def test_a_finished_run_without_a_later_field_still_reports():
    assert GenerateResult.from_stats({"engine": "vllm", "engine_starts": 1}).policy is None


def test_candidates_sampled_ahead_are_adopted_once_whole_and_under_force_only_when_this_run_wrote_them(tmp_path):
    from alignlib import schema as S
    from alignlib.stages import ahead
    from alignlib.stages.contract import RoundContext
    from alignlib.store import StageStore, count_rows

    def context(force, sampled_ahead):
        store = StageStore(tmp_path, "round-2")
        return SimpleNamespace(
            store=store,
            force=force,
            round=RoundContext(2, sampled_ahead=sampled_ahead),
            fingerprint=lambda name: "fp-generate",
        )

    def waiting(complete):
        import pyarrow as pa

        from alignlib.store import write_table

        folder = ahead.folder(context(False, False)) / S.GENERATOR_POLICY
        write_table(pa.table({S.PROMPT_ID: ["a", "b", "c"]}), folder)
        if complete:
            (folder / ahead.DONE).write_text("")
        return folder

    target = tmp_path / "round-2" / "generate-out" / S.GENERATOR_POLICY
    waiting(complete=False)
    assert not ahead.adopt(context(False, False), target), "half-written candidates are never adopted"
    waiting(complete=True)
    assert not ahead.adopt(context(True, False), target), "--force adopts only what this run sampled"
    assert ahead.adopt(context(True, True), target)
    assert count_rows(target) == 3 and not (target / ahead.DONE).exists()
    waiting(complete=True)
    assert ahead.adopt(context(False, False), tmp_path / "round-2" / "other" / S.GENERATOR_POLICY)
    ahead.clear(context(False, False))
    assert not ahead.folder(context(False, False)).parent.exists()
