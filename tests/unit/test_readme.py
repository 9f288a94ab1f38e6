"""The README's job spec reference names every field the spec has (so the two cannot drift)."""

from pathlib import Path

from pydantic import BaseModel

from alignlib.spec import job as S

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def fields(model: type[BaseModel]) -> set[str]:
    return set(model.model_fields)


def test_every_spec_field_is_documented():
    sections = {
        "": S.JobSpec, "data.": S.DataSpec, "policy.": S.ModelSpec, "generate.": S.GenerateSpec,
        "pairs.": S.PairsSpec, "train.": S.TrainSpec, "export.": S.ExportSpec, "eval.": S.EvalSpec,
    }  # fmt: skip
    reference = README.split("## Job spec reference", 1)[1].split("\n## ", 1)[0]
    missing = [prefix + name for prefix, model in sections.items() for name in fields(model) if name not in reference]
    variants = [S.ORPOLossSpec, S.DPOLossSpec, S.IPOLossSpec, S.DeepSpeedBackendSpec, S.QLoRABackendSpec,
                S.LoraSpec, S.ModelRewardSpec, S.FunctionRewardSpec, S.WeakModelSpec]  # fmt: skip
    missing += [f"{m.__name__}.{n}" for m in variants for n in fields(m) if n not in reference]
    assert missing == []


def test_readme_test_command_is_what_ci_runs():
    ci = (Path(__file__).resolve().parents[2] / ".ci" / "run").read_text()
    assert "cluster/setup-local.sh && .venv/bin/python -m pytest" in README
    assert "bash cluster/setup-local.sh" in ci and ".venv/bin/python -m pytest" in ci


def test_score_fields_and_drop_reasons_are_documented():
    from alignlib.pairs import DROP_REASONS

    reference = README.split("## Job spec reference", 1)[1].split("\n## ", 1)[0]
    missing = [f"score.{n}" for n in fields(S.ScoreSpec) if f"`score.{n}`" not in reference]
    missing += [f"{m.__name__}.{n}" for m in (S.WeightedFunctionReward, S.WeightedModelReward)
                for n in fields(m) if n not in reference]  # fmt: skip
    preference_data = README.split("## Preference data", 1)[1].split("\n## ", 1)[0]
    missing += [reason for reason in DROP_REASONS if f"`{reason}`" not in preference_data]
    missing += [s for s in S.PairStrategy.__args__ if f"`{s}`" not in preference_data]
    assert missing == []
