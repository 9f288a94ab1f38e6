"""The README and docs/ stay true to the code: the spec reference names every field the spec has, the preference
data page every drop reason and pair strategy, the README's test command is what CI runs, and no link is broken."""

import re
from pathlib import Path

from pydantic import BaseModel

from alignlib.spec import job as S

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
README = (ROOT / "README.md").read_text()
SPEC_REFERENCE = (DOCS / "spec.md").read_text()
PREFERENCE_DATA = (DOCS / "preference-data.md").read_text()

# Inline links and images, [text](target) or [text](target "title"): the target.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def fields(model: type[BaseModel]) -> set[str]:
    return set(model.model_fields)


def test_every_spec_field_is_documented():
    sections = {
        "": S.JobSpec, "data.": S.DataSpec, "policy.": S.ModelSpec, "generate.": S.GenerateSpec,
        "pairs.": S.PairsSpec, "train.": S.TrainSpec, "export.": S.ExportSpec, "eval.": S.EvalSpec, "rounds.": S.RoundsSpec,
        "serve.": S.ServeSpec, "serve.engine.": S.ReplicaSpec,
    }  # fmt: skip
    missing = [prefix + name for prefix, model in sections.items() for name in fields(model)
               if name not in SPEC_REFERENCE]  # fmt: skip
    variants = [S.ORPOLossSpec, S.DPOLossSpec, S.IPOLossSpec, S.DeepSpeedBackendSpec, S.QLoRABackendSpec,
                S.LoraSpec, S.ModelRewardSpec, S.FunctionRewardSpec, S.WeakModelSpec]  # fmt: skip
    missing += [f"{m.__name__}.{n}" for m in variants for n in fields(m) if n not in SPEC_REFERENCE]
    assert missing == []


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "cluster/setup-local.sh && .venv/bin/python -m pytest" in README
    assert "bash cluster/setup-local.sh" in ci and ".venv/bin/python -m pytest" in ci


def test_score_fields_and_drop_reasons_are_documented():
    from alignlib.pairs import DROP_REASONS

    missing = [f"score.{n}" for n in fields(S.ScoreSpec) if f"`score.{n}`" not in SPEC_REFERENCE]
    missing += [f"{m.__name__}.{n}" for m in (S.WeightedFunctionReward, S.WeightedModelReward)
                for n in fields(m) if n not in SPEC_REFERENCE]  # fmt: skip
    missing += [reason for reason in DROP_REASONS if f"`{reason}`" not in PREFERENCE_DATA]
    missing += [s for s in S.PairStrategy.__args__ if f"`{s}`" not in PREFERENCE_DATA]
    assert missing == []


def relative_links(text: str) -> list[str]:
    """Link targets that point into the repository (not URLs, not mail addresses)."""
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t, re.IGNORECASE)]


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lowercased, punctuation dropped, spaces to hyphens; repeats get -1, -2, ..."""
    seen: dict[str, int] = {}
    out = set()
    in_code = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        heading = line.lstrip("#").strip()
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in relative_links(page.read_text()):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text()):
            broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    return broken


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in relative_links(README)}
    pages = sorted(DOCS.glob("*.md"))
    assert {"spec.md", "preference-data.md"} <= {p.name for p in pages}
    assert [p.name for p in pages if p.resolve() not in linked] == []


def test_every_relative_link_points_to_an_existing_file():
    assert broken_links(ROOT / "README.md") == []
    assert [b for page in sorted(DOCS.glob("*.md")) for b in broken_links(page)] == []
