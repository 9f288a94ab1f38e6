"""The README and docs/ stay true to the code: the spec reference names every field the spec has, the preference
data page every drop reason and pair strategy, the README's test command is what CI runs, and no link is broken."""

import re
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel

from alignlib.spec import job as S

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
README = (ROOT / "README.md").read_text()
SPEC_REFERENCE = (DOCS / "spec.md").read_text()
PREFERENCE_DATA = (DOCS / "preference-data.md").read_text()

# Inline links and images, [text](target) or [text](target "title"): the target.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE = re.compile(r"`([^`]+)`")
# A key of a mapping written in a code span: `{name: dpo, beta: 0.1}` -> name, beta; `engine: vllm` -> engine.
KEY = re.compile(r"(?:^|[{,])\s*(\w+)\s*(?=[:,}]|$)")

# The spec's sections: each field of the model is one row of the spec reference, named by its dotted path.
SECTIONS: dict[str, type[BaseModel]] = {
    "": S.JobSpec,
    "data.": S.DataSpec,
    "policy.": S.ModelSpec,
    "generate.": S.GenerateSpec,
    "score.": S.ScoreSpec,
    "pairs.": S.PairsSpec,
    "train.": S.TrainSpec,
    "export.": S.ExportSpec,
    "eval.": S.EvalSpec,
    "rounds.": S.RoundsSpec,
    "serve.": S.ServeSpec,
    "serve.engine.": S.ReplicaSpec,
    "serve.reward.": S.ReplicaSpec,
}
# The models written as a mapping inside a field's row: the field whose row documents each, and the fields the
# row shows it with (a tagged variant such as `{name: dpo, beta: 0.1, ...}` in `train.loss`'s row).
VARIANTS: dict[type[BaseModel], str] = {
    S.SFTLossSpec: "train.loss",
    S.ORPOLossSpec: "train.loss",
    S.DPOLossSpec: "train.loss",
    S.IPOLossSpec: "train.loss",
    S.SimPOLossSpec: "train.loss",
    S.RewardLossSpec: "train.loss",
    S.DDPBackendSpec: "train.backend",
    S.DeepSpeedBackendSpec: "train.backend",
    S.QLoRABackendSpec: "train.backend",
    S.LoraSpec: "train.lora",
    S.ModelRewardSpec: "score.reward",
    S.FunctionRewardSpec: "score.reward",
    S.WeakModelSpec: "generate.weak_model",
}
# score.rewards' entries: a reward of either kind above (documented there) plus the fields of `score.rewards`' row.
WEIGHTED = {S.WeightedModelReward: S.ModelRewardSpec, S.WeightedFunctionReward: S.FunctionRewardSpec}


def fields(model: type[BaseModel]) -> set[str]:
    return set(model.model_fields)


def section(markdown: str, heading: str) -> str:
    """The text under a heading, up to the next heading of the same or a higher level."""
    lines = markdown.splitlines()
    level = len(heading) - len(heading.lstrip("#"))
    start = lines.index(heading) + 1
    end = next(
        (i for i in range(start, len(lines)) if re.match(rf"#{{1,{level}}} ", lines[i])),
        len(lines),
    )
    return "\n".join(lines[start:end])


def table_rows(markdown: str) -> list[list[str]]:
    """The body rows of the Markdown tables in the text, each a list of its cells (`\\|` stays in its cell)."""
    rows, previous = [], ""
    for line in markdown.splitlines():
        if line.startswith("|") and not re.fullmatch(r"\|[\s:|-]+\|", line):
            if previous.startswith("|"):  # not the header row
                rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))])
        previous = line if line.startswith("|") else ""
    return rows


def reference_rows(markdown: str) -> dict[str, list[str]]:
    """The spec reference: field path -> the text of the rows that document it. A row's first cell names its
    field(s): `data.chosen_field` / `rejected_field` documents data.chosen_field and data.rejected_field;
    `score.reward` (`type: model`) documents score.reward (for the model kind)."""
    out: dict[str, list[str]] = {}
    for cells in table_rows(markdown):
        names = [n for n in CODE.findall(cells[0]) if ":" not in n]
        if not names:
            continue
        prefix = names[0].rpartition(".")[0]
        for i, name in enumerate(names):
            path = name if i == 0 or not prefix else f"{prefix}.{name}"
            out.setdefault(path, []).append(" | ".join(cells))
    return out


def keys(text: str) -> set[str]:
    return {k for span in CODE.findall(text) for k in KEY.findall(span)}


FIELD_ROWS = reference_rows(SPEC_REFERENCE)


def documented(path: str, rows: dict[str, list[str]] = FIELD_ROWS) -> bool:
    """A field is a row of the reference, or a section whose fields are rows (`data`: `data.path`, ...)."""
    return path in rows or any(p.startswith(path + ".") for p in rows)


def tag(model: type[BaseModel]) -> tuple[str, str] | None:
    """The discriminator of a tagged variant: ("name", "dpo") for `name: Literal["dpo"]`."""
    tags = [
        (name, get_args(f.annotation)[0])
        for name, f in model.model_fields.items()
        if get_origin(f.annotation) is Literal and len(get_args(f.annotation)) == 1
    ]
    assert len(tags) <= 1, model
    return tags[0] if tags else None


def undocumented_variant_fields(model: type[BaseModel], parent: str, rows: dict[str, list[str]] = FIELD_ROWS):
    """The fields of a model written as a mapping in `parent`'s row that the row does not show as keys.
    A tagged variant (`name: dpo`, `type: model`) is documented by the code span that names its tag if that span
    is the mapping (`{name: dpo, beta: 0.1}`), else by the row that names it (`score.reward` (`type: model`)).
    A field's own row elsewhere may say it applies here too (`policy.trust_remote_code`: "also on
    `generate.weak_model`")."""
    texts = rows.get(parent, [])
    if (tagged := tag(model)) is None:
        shown = {k for text in texts for k in keys(text)}
    else:
        said = re.compile(rf"(?:^|[{{,])\s*{tagged[0]}: {tagged[1]}\s*(?:$|[,}}])")
        spans = [(span, text) for text in texts for span in CODE.findall(text) if said.search(span)]
        if not spans:
            return [f"{model.__name__} (no `{tagged[0]}: {tagged[1]}` in the row of `{parent}`)"]
        shown = {k for span, text in spans for k in (keys(f"`{span}`") if "{" in span else keys(text))}
    shown |= {
        path.rpartition(".")[2]
        for path, own in rows.items()
        if not path.startswith(parent) and any(f"`{parent}`" in text for text in own)
    }
    return [f"{model.__name__}.{n}" for n in sorted(fields(model)) if n not in shown]


def test_every_spec_field_is_documented():
    """Each field of each section is a row of the spec reference's table (by its dotted path), and each variant's
    fields are keys of the mapping that documents it: a name that merely occurs on the page does not count."""
    missing = [prefix + name for prefix, model in SECTIONS.items() for name in sorted(fields(model))]
    missing = [path for path in missing if not documented(path)]
    missing += [m for model, parent in VARIANTS.items() for m in undocumented_variant_fields(model, parent)]
    assert missing == []


def models_in(annotation: Any) -> set[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return {annotation} | {m for f in annotation.model_fields.values() for m in models_in(f.annotation)}
    return {m for arg in get_args(annotation) for m in models_in(arg)}


def test_the_field_checks_cover_every_spec_model():
    """A new section or variant of the spec is checked above, not skipped."""
    checked = {S.JobSpec, *SECTIONS.values(), *VARIANTS, *WEIGHTED}
    assert models_in(S.JobSpec) - checked == set()


def test_the_field_checks_read_the_reference_table():
    """A field counts where the table documents it, not where its name merely occurs (as a substring search over
    the page would count `name`, `path` or `seed`)."""
    assert FIELD_ROWS.keys() >= {"name", "seed", "data.path", "data.rejected_field", "generate.top_p", "train.lr"}
    page = """
| field | default | meaning |
|---|---|---|
| `seed` | `0` | the path and the name of the run, `data.limit`; lambda_ |
| `train.loss` | `{name: dpo, beta: 0.1}` | also `{name: orpo}`, with `lambda_` |
| `train.epochs` / `lr` | `1` / `5e-5` | |
"""
    rows = reference_rows(page)
    assert sorted(rows) == ["seed", "train.epochs", "train.loss", "train.lr"]
    assert [p for p in ("name", "data.path", "data.limit", "seed", "train") if not documented(p, rows)] == [
        "name",
        "data.path",
        "data.limit",
    ]
    assert undocumented_variant_fields(S.DPOLossSpec, "train.loss", rows) == ["DPOLossSpec.label_smoothing"]
    assert undocumented_variant_fields(S.ORPOLossSpec, "train.loss", rows) == ["ORPOLossSpec.lambda_"]
    assert undocumented_variant_fields(S.IPOLossSpec, "train.loss", rows) == [
        "IPOLossSpec (no `name: ipo` in the row of `train.loss`)"
    ]


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "cluster/setup-local.sh && .venv/bin/python -m pytest" in README
    assert "bash cluster/setup-local.sh" in ci and ".venv/bin/python -m pytest" in ci


def test_score_fields_and_drop_reasons_are_documented():
    """Combined rewards' own fields are keys in `score.rewards`' row; every drop reason is a row of the preference
    data page's drop-reason table, every pair strategy one of its strategy table."""
    from alignlib.pairs import DROP_REASONS

    rewards = {k for row in FIELD_ROWS.get("score.rewards", []) for k in keys(row)}
    missing = [f"{w.__name__}.{n}" for w, base in WEIGHTED.items() for n in sorted(fields(w) - fields(base))]
    missing = [m for m in missing if m.rpartition(".")[2] not in rewards]
    reasons = first_cells(section(PREFERENCE_DATA, "## Drop reasons"))
    missing += [reason for reason in DROP_REASONS if f"`{reason}`" not in reasons]
    strategies = first_cells(section(PREFERENCE_DATA, "## Pair strategies"))
    missing += [s for s in S.PairStrategy.__args__ if f"`{s}`" not in strategies]
    assert missing == []


def first_cells(markdown: str) -> set[str]:
    return {cells[0] for cells in table_rows(markdown)}


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
