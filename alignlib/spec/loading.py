"""Reading a job spec: bounded safe YAML, `key=value` overrides, and every problem reported at once.

spec = load_spec("jobs/demo.yaml", overrides=["train.epochs=2"])
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

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
        try:
            node[parts[-1]] = yaml.safe_load(text) if text else ""
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise SpecError(
                "command line",
                [
                    f"{item!r}: the value is not valid YAML ({problem}); quote it, "
                    "e.g. 'train.loss={name: dpo, beta: 0.1}'"
                ],
            ) from None
    return raw


def _variants(annotation: Any) -> list[type[BaseModel]]:
    """The spec models an annotation can hold (unions, Optional, lists and Annotated unwrapped)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _variants(arg)]


def _tag(model: type[BaseModel]) -> str | None:
    """A union variant's discriminator value (`dpo` for DPOLossSpec), as pydantic puts it in error locations."""
    for key in ("name", "type"):
        field = model.model_fields.get(key)
        if field is not None and get_origin(field.annotation) is Literal:
            return get_args(field.annotation)[0]
    return None


def _walk(loc: tuple[Any, ...]) -> tuple[list[str], list[type[BaseModel]], list[type[BaseModel]]]:
    """An error location -> (the spec path a user writes, the models at its parent level, and when that level is a
    discriminated union's member, every member of that union).

    pydantic's locations also name union members (`train.loss.dpo.beta`, `pairs.strategy.literal[...]`);
    those are dropped, so a message names the field as it appears in the YAML.
    """
    parts: list[str] = []
    models: list[type[BaseModel]] = [JobSpec]
    parents = models
    union: list[type[BaseModel]] = []
    for part in loc:
        if isinstance(part, int):
            parts.append(f"[{part}]")
            continue
        tagged = [m for m in models if _tag(m) == part] if len(models) > 1 else []
        if tagged:  # a discriminated union's member: not a key in the YAML
            union, models = models, tagged
            continue
        owners = [m for m in models if part in m.model_fields]
        if not owners:
            if models:  # an unknown key (or a member label of a union of plain types)
                parents = models
                parts.append(part) if part.isidentifier() and part not in _TYPE_LABELS else None
            models = []
            continue
        parents = models
        parts.append(part)
        union = []
        models = [v for m in owners for v in _variants(m.model_fields[part].annotation)]
    return parts, parents, union


_TYPE_LABELS = {"str", "int", "float", "bool", "list", "dict", "tuple", "none"}

# Keys a spec may still carry from before a rename: old path -> new path. Each is an error naming the new
# key, not a guess among similar names.
RENAMED = {"data.reference_field": "data.gold_field"}

# The names Hugging Face's and TRL's trainer arguments and vLLM's sampling parameters give to settings alignlib
# has under another name: (the model the key was given in, the key) -> alignlib's key.
FAMILIAR = {
    ("TrainSpec", "learning_rate"): "lr",
    ("TrainSpec", "num_train_epochs"): "epochs",
    ("TrainSpec", "gradient_accumulation_steps"): "grad_accum",
    ("TrainSpec", "per_device_train_batch_size"): "batch_size",
    ("TrainSpec", "lr_scheduler_type"): "schedule",
    ("TrainSpec", "logging_steps"): "log_every",
    ("TrainSpec", "max_seq_length"): "max_length",
    ("ORPOLossSpec", "beta"): "lambda_",
    ("GenerateSpec", "n"): "num_samples",
    ("GenerateSpec", "max_tokens"): "max_new_tokens",
}


def _format_error(err: Mapping[str, Any]) -> list[str]:
    parts, parents, union = _walk(tuple(err["loc"]))
    path = ".".join(parts).replace(".[", "[")
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden" and path in RENAMED:
        return [f"{path} was renamed {RENAMED[path]}"]
    if err["type"] == "extra_forbidden":
        key = parts[-1] if parts else ""
        familiar = [FAMILIAR[(m.__name__, key)] for m in parents if (m.__name__, key) in FAMILIAR]
        others = [t for m in union if key in m.model_fields and m not in parents for t in [_tag(m)] if t]
        known = sorted({f for m in parents for f in m.model_fields})
        close = difflib.get_close_matches(key, known, n=1) if parts else []
        if familiar:
            message = f"unknown key; alignlib calls it {familiar[0]!r}"
        elif others and len(parts) > 1:
            tag = next((_tag(m) for m in parents if _tag(m)), None)
            label = next((k for m in parents for k in ("name", "type") if _tag(m) and k in m.model_fields), "name")
            field = ".".join(parts[:-1])
            message = (
                f"unknown key for {tag!r}: it is a setting of {', '.join(repr(t) for t in others)}; to switch, give "
                f"the whole mapping, e.g. '{field}={{{label}: {tag}}}'"
            )
        else:
            message = f"unknown key; did you mean {close[0]!r}?" if close else "unknown key"
    elif err["type"] == "literal_error":
        message = f"{err['input']!r} is not one of {err['ctx']['expected']}"
    if not path:  # cross-field problems from the model validator carry their own paths
        return message.splitlines()
    return [f"{path}: {message}"]


def _one_per_field(problems: list[str]) -> list[str]:
    """One message per field: a union field fails once per member; the member listing the valid values wins."""
    by_field: dict[str, str] = {}
    for line in problems:
        field = line.split(": ", 1)[0]
        if field not in by_field or ("is not one of" in line and "is not one of" not in by_field[field]):
            by_field[field] = line
    # A list given for a `value | list[value]` field: its items' messages say more than "not one of".
    nested = {f for f in by_field for g in by_field if g.startswith(f + "[")}
    return [line for field, line in by_field.items() if field not in nested]


def _without(raw: dict[str, Any], locations: list[tuple[Any, ...]]) -> dict[str, Any]:
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
    spec = _validate(raw, source)
    if spec.rounds.later:
        try:
            later_spec(spec)
        except SpecError as err:  # checked now, not when round 2 starts
            raise SpecError(source, [f"rounds.later: {p}" for p in err.problems]) from None
    return spec


# Run-level settings: the same in every round, so `rounds.later` may not set them.
RUN_LEVEL = ("name", "output_dir", "seed", "data", "rounds")


def _merged(base: Any, changes: Any) -> Any:
    """`changes` laid over `base`: mappings merge key by key, anything else replaces. A mapping naming
    another variant (`name` of a loss or backend, `type` of a reward) replaces the whole mapping."""
    if not isinstance(base, dict) or not isinstance(changes, dict):
        return copy.deepcopy(changes)
    if any(k in changes and k in base and changes[k] != base[k] for k in ("name", "type")):
        return copy.deepcopy(changes)
    out = dict(base)
    for key, value in changes.items():
        out[key] = _merged(base.get(key), value) if key in base else copy.deepcopy(value)
    return out


def later_spec(spec: JobSpec) -> JobSpec:
    """The spec of rounds 2 and later: the job's with `rounds.later` laid over it (`_merged`)."""
    later = spec.rounds.later
    fixed = [k for k in later if k in RUN_LEVEL]
    if fixed:
        raise SpecError("rounds.later", [f"{k}: the same in every round; set it outside rounds.later" for k in fixed])
    raw = _merged(spec.model_dump(mode="json"), later)
    raw["rounds"] = {**raw["rounds"], "later": {}}
    return _validate(raw, "rounds.later")


def _validate(raw: Any, source: str) -> JobSpec:
    if not isinstance(raw, dict):
        raise SpecError(source, ["the job spec must be a YAML mapping"])
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as err:
        errors = err.errors(include_url=False)
    problems = _one_per_field([line for e in errors for line in _format_error(e)])
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


def load_spec(path: str | Path, overrides: list[str] | None = None, base: Path | None = None) -> JobSpec:
    """The validated spec of a file, `key=value` overrides applied, its relative paths made absolute.

    Relative paths (`data.path`, `output_dir`, local model directories) are relative to `base`, by
    default the directory alignlib runs in; made absolute here, once, no worker ever sees a relative one.
    """
    from alignlib.sources import absolute_paths

    raw = apply_overrides(load_raw(path), overrides or [])
    return absolute_paths(parse_spec(raw, str(path)), base)


def json_schema() -> dict[str, Any]:
    return JobSpec.model_json_schema()
