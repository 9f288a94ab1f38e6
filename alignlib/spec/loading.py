"""Reading a job spec: bounded safe YAML, `key=value` overrides, and every problem reported at once.

    spec = load_spec("jobs/demo.yaml", overrides=["train.epochs=2"])
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from alignlib.spec.job import JobSpec


class SpecError(ValueError):
    """A job spec failed to load or validate; `problems` holds one "path: message" per problem."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s) in the job spec:\n{lines}")



def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides; values are parsed as YAML (so `x=[1, 4]` is a list)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise SpecError("command line", [f"{item!r}: overrides are key=value, e.g. train.epochs=2"])
        node = raw
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise SpecError("command line", [f"{key}: {where} is not a mapping, cannot set a key inside it"])
            node = child
        node[parts[-1]] = yaml.safe_load(text) if text else ""
    return raw


def _format_error(err: dict[str, Any]) -> list[str]:
    path = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in err["loc"]).replace(".[", "[")
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = "unknown key"
    if not path:  # cross-field problems from the model validator carry their own paths
        return message.splitlines()
    return [f"{path}: {message}"]


def _without(raw: dict[str, Any], locations: list[tuple]) -> dict[str, Any]:
    """A copy of `raw` without the keys at `locations` (union tags in a location are skipped)."""
    out = copy.deepcopy(raw)
    for loc in locations:
        node, parts = out, [p for p in loc if isinstance(p, str)]
        for i, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                continue
            if i == len(parts) - 1 or not isinstance(node[part], dict):
                del node[part]
                break
            node = node[part]
    return out


def parse_spec(raw: Any, source: str = "<spec>") -> JobSpec:
    if not isinstance(raw, dict):
        raise SpecError(source, ["the job spec must be a YAML mapping"])
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as err:
        errors = err.errors(include_url=False)
    problems = [line for e in errors for line in _format_error(e)]
    # pydantic runs cross-field checks only once every field is valid; validate again without
    # the bad keys so those problems are reported in the same run.
    try:
        JobSpec.model_validate(_without(raw, [e["loc"] for e in errors]))
    except ValidationError as again:
        problems += [line for e in again.errors(include_url=False) if not e["loc"] for line in _format_error(e)]
    raise SpecError(source, list(dict.fromkeys(problems)))


# A spec is a few hundred values; aliases may repeat parts of it, but not blow it up (a "billion laughs"
# document is a few lines whose aliases expand to billions of values once dumped or hashed).
MAX_SPEC_VALUES = 100_000


def expanded_size(raw: Any, limit: int = MAX_SPEC_VALUES) -> int:
    """The number of values in `raw` with every alias expanded; ValueError past `limit` or on a cycle.

    YAML aliases load as shared Python objects, so the document itself is small; the cost comes later
    when it is validated, dumped and hashed as a tree. Sizes are memoised per object: linear time.
    """
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: Any) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise ValueError("a YAML alias refers to a value that contains it (a recursive document)")
        active.add(key)
        children = [*node.keys(), *node.values()] if isinstance(node, dict) else node
        total = 1 + sum(size(child) for child in children)
        active.discard(key)
        if total > limit:
            raise ValueError(f"the document expands to more than {limit} values through its aliases")
        sizes[key] = total
        return total

    return size(raw)


def load_raw(path: str | Path) -> Any:
    """The YAML document of a spec file, unvalidated (SpecError if unreadable).

    `yaml.safe_load` builds only plain data: python/* tags (which would import or call) are refused.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SpecError(str(path), ["file not found"]) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise SpecError(str(path), [f"{where}invalid YAML: {getattr(err, 'problem', err)}"]) from None
    try:
        expanded_size(raw)
    except ValueError as err:
        raise SpecError(str(path), [f"refused: {err}"]) from None
    return raw if raw is not None else {}


def load_spec(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    raw = apply_overrides(load_raw(path), overrides or [])
    return parse_spec(raw, str(path))


def json_schema() -> dict[str, Any]:
    return JobSpec.model_json_schema()
