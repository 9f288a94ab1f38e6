"""What a job reads from outside its output directory: the data file, models, reward functions.

Two jobs here:

- Paths. A relative path in a spec (`data.path`, `output_dir`, a local model directory) is relative to the
  directory alignlib runs in; `absolute_paths` makes each one absolute once, when the spec is loaded, so no
  Ray worker or Train worker ever sees a relative path. `problems` checks, before any stage runs, that each
  source a stage will read exists and is what the field says, and names the field.
- Fingerprints. A stage's fingerprint holds `digest(...)` of what it reads, not only the spec's text: the
  data file's content, a local model directory's files, a reward function's module source. Edit any of them
  and the stages it feeds run again; nothing else does.

    spec = absolute_paths(spec)                 # once, in load_spec
    problems(spec, ["prompts", "generate"])      # ["policy.model: ...", ...] before those stages run
"""

from __future__ import annotations

import difflib
import hashlib
import os
from pathlib import Path
from typing import Any

from alignlib.hashing import file_digest

# Model files over this size are fingerprinted by size and modification time instead of content: hashing
# a 16 GB checkpoint on every run costs more than it is worth (a rewritten file gets a new mtime).
HASHED_FILE_BYTES = 64 * 2**20


def looks_like_path(value: str) -> bool:
    """A model field naming a local path rather than a hub id (`org/name`) or a builtin."""
    from alignlib.uri import is_uri

    if value.startswith("builtin:") or is_uri(value):
        return False
    return (
        value.startswith(("/", "./", "../", "~"))
        or value.count("/") >= 2
        or value.endswith(".gguf")
        or Path(value).expanduser().exists()
    )


def _absolute(value: str, base: Path) -> str:
    from alignlib.uri import is_uri

    if is_uri(value):
        return value
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def absolute_paths(spec, base: Path | None = None):
    """The spec with `data.path`, `output_dir` and local model paths absolute (relative to `base`, default cwd)."""
    base = base or Path.cwd()
    update: dict[str, Any] = {"output_dir": _absolute(spec.output_dir, base)}
    update["data"] = spec.data.model_copy(update={"path": _absolute(spec.data.path, base)})

    def model(m):
        return m.model_copy(update={"model": _absolute(m.model, base)}) if looks_like_path(m.model) else m

    update["policy"] = model(spec.policy)
    if spec.generate.weak_model is not None:
        update["generate"] = spec.generate.model_copy(update={"weak_model": model(spec.generate.weak_model)})
    score = spec.score
    if score.reward is not None and score.reward.type == "model":
        update["score"] = score.model_copy(update={"reward": model(score.reward)})
    elif score.rewards:
        update["score"] = score.model_copy(
            update={"rewards": [model(r) if r.type == "model" else r for r in score.rewards]}
        )
    return spec.model_copy(update=update)


# -- checks -------------------------------------------------------------------------------------


def model_problem(field: str, value: str) -> str | None:
    """Why `value` cannot be loaded as a model, naming `field`; None if it can (or is a hub id)."""
    from alignlib.models import BUILTIN_PREFIX, BUILTINS, PACKAGED, builtin_names, gguf_problem, packaged_gguf

    if value.startswith(BUILTIN_PREFIX):
        name = value.removeprefix(BUILTIN_PREFIX)
        if name in BUILTINS:
            return None
        if name in PACKAGED:
            try:
                packaged_gguf(name)
            except ValueError as err:
                return f"{field}: {err}"
            return None
        close = difflib.get_close_matches(name, [*BUILTINS, *PACKAGED], n=1)
        hint = f"did you mean {BUILTIN_PREFIX}{close[0]}? " if close else ""
        return f"{field}: unknown built-in model {value!r}; {hint}the built-ins are {', '.join(builtin_names())}"
    from alignlib.uri import is_uri

    if is_uri(value):  # a model a run wrote to an object store (an export): it must hold a config
        from alignlib.locations import RemotePath

        return None if (RemotePath(value) / "config.json").exists() else f"{field}: no model at {value}"
    if not looks_like_path(value):
        return None  # a hub id: from_pretrained fetches (or finds in its cache) what exists
    path = Path(value).expanduser()
    if path.suffix == ".gguf":
        problem = gguf_problem(path)
        return f"{field}: {problem}" if problem else None
    if not path.exists():
        return (
            f"{field}: no such model directory {value} (relative paths are relative to the directory alignlib runs in)"
        )
    if not path.is_dir() or not (path / "config.json").exists():
        return f"{field}: {value} is not a Hugging Face model directory (no config.json in it)"
    return None


def reward_head_problem(source: str, trust_remote_code: bool = False) -> str | None:
    """Why the model at `source` cannot become a one-label sequence classifier, or None; read from its config
    only (no weights), and only for a model already on this machine (a built-in or a local directory)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    from alignlib.models import BUILTIN_PREFIX, BUILTINS, load_config

    if (
        source not in {BUILTIN_PREFIX + n for n in BUILTINS}
        and not (Path(source).expanduser() / "config.json").exists()
    ):
        return None  # a hub id or a GGUF file (a causal LM): not read here; loading says what is wrong
    config = load_config(source, trust_remote_code)
    if getattr(config, "auto_map", None):
        return None  # its own code decides its classes
    if config.model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        return f"model type {config.model_type!r} has no sequence-classification class in transformers"
    if any(a.endswith("ForSequenceClassification") for a in config.architectures or []) and config.num_labels != 1:
        return f"it is a classifier with num_labels={config.num_labels}; a reward model has one output"
    return None


def models_read(spec, stages: list[str]) -> list[tuple[str, str]]:
    """(field, model) of every model the given stages load."""
    out = []
    if {"generate", "ref_logps", "train", "eval"} & set(stages):
        out.append(("policy.model", spec.policy.model))
    if "generate" in stages and spec.generate.weak_model is not None:
        out.append(("generate.weak_model.model", spec.generate.weak_model.model))
    if {"score", "eval"} & set(stages):
        for i, (_, reward, _) in enumerate(spec.score.components()):
            if reward.type == "model":
                out.append((f"score.rewards[{i}].model" if spec.score.rewards else "score.reward.model", reward.model))
    return out


def problems(spec, stages: list[str]) -> list[str]:
    """Every source the given stages read that is missing or not what its field says, as "field: message"."""
    found = []
    if "prompts" in stages:
        path = Path(spec.data.path)
        if not path.exists():
            found.append(
                f"data.path: {spec.data.path} does not exist (relative paths are relative to the "
                "directory alignlib runs in)"
            )
    found += [
        p for field, model in dict.fromkeys(models_read(spec, stages)) for p in [model_problem(field, model)] if p
    ]
    found += [
        f"{field}: {model} is a GGUF causal LM; a reward model is a sequence classifier (num_labels=1)"
        for field, model in models_read(spec, stages)
        if field.startswith("score.") and (model.endswith(".gguf") or model == "builtin:smollm2-135m-instruct")
    ]
    if "train" in stages and spec.train.loss.name == "reward" and not model_problem("policy.model", spec.policy.model):
        problem = reward_head_problem(spec.policy.model, spec.policy.trust_remote_code)
        if problem:
            found.append(f"policy.model: loss reward trains {spec.policy.model} as a reward model, but {problem}")
    from alignlib.uri import is_uri

    if is_uri(spec.output_dir):
        return found + output_store_problems(spec.output_dir)
    output = Path(spec.output_dir)
    existing = next((p for p in [output, *output.parents] if p.exists()), None)
    if existing is not None and not existing.is_dir():
        found.append(f"output_dir: {existing} is a file, not a directory")
    elif existing is not None and not os.access(existing, os.W_OK):
        found.append(f"output_dir: {existing} is not writable")
    return found


def output_store_problems(uri: str) -> list[str]:
    """Whether this process can reach and write the object store `uri` names: one small object, written
    and deleted, so bad credentials or a wrong endpoint fail before any work, naming output_dir."""
    import uuid

    from alignlib.locations import RemotePath
    from alignlib.redaction import redact

    try:
        probe = RemotePath(uri) / f".alignlib-write-check-{uuid.uuid4().hex[:8]}"
        probe.write_text("")
        probe.unlink()
    except Exception as err:  # noqa: BLE001 - any failure to reach the store is the user's to fix
        first = redact(str(err)).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return [
            f"output_dir: cannot write to {uri} ({first}); check the bucket, the endpoint (AWS_ENDPOINT_URL) "
            "and the credentials in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"
        ]
    return []


# -- fingerprints -------------------------------------------------------------------------------


def data_digest(path: str) -> str:
    """The content of a data file, or of every file of a Parquet directory; `missing` if there is none."""
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root] if root.exists() else []
    if not files:
        return "missing"
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(root) if root.is_dir() else ''}\0".encode())  # a renamed file is the same data
        h.update(file_digest(f).encode())
    return h.hexdigest()[:16]


def model_digest(source: str) -> str:
    """A model source as its fingerprint: builtins and hub ids by name, a local directory by its files."""
    from alignlib.models import BUILTIN_VERSION, PACKAGED

    if source.startswith("builtin:"):
        if source.removeprefix("builtin:") in PACKAGED:
            from importlib.metadata import version

            module = PACKAGED[source.removeprefix("builtin:")][0]
            return f"{source}@{version(module.replace('_', '-'))}"
        return f"{source}@v{BUILTIN_VERSION}"
    from alignlib.uri import is_uri

    if is_uri(source):  # by its files' names, sizes and times (an object store keeps no cheap content hash)
        from alignlib.locations import RemotePath, listing_key

        try:
            return "store:" + listing_key(RemotePath(source))
        except FileNotFoundError:
            return source
    root = Path(source).expanduser()
    if root.suffix == ".gguf" and root.is_file():
        return "gguf:" + file_digest(root)[:16]
    if not root.is_dir():
        return source
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        stat = f.stat()
        h.update(f"{f.relative_to(root)}\0{stat.st_size}\0".encode())
        small = stat.st_size <= HASHED_FILE_BYTES
        h.update((file_digest(f) if small else str(stat.st_mtime_ns)).encode())
    return "dir:" + h.hexdigest()[:16]


def function_digest(ref: str) -> str:
    """A reward function `module:function` as the source of its module (edit it and scoring reruns)."""
    import importlib.util

    spec = importlib.util.find_spec(ref.partition(":")[0])
    origin = getattr(spec, "origin", None) if spec else None
    if not origin or not Path(origin).is_file():
        return ref
    return f"{ref}@{file_digest(Path(origin))[:16]}"


def reward_digests(spec) -> list[str]:
    """What each reward of the score section is, by content."""
    return [
        function_digest(r.function) if r.type == "function" else model_digest(r.model)
        for _, r, _ in spec.score.components()
    ]
