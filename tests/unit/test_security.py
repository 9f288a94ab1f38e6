"""Nothing let in: remote model code, YAML tags and alias bombs, pickles, reward functions, paths, secrets.

Each test feeds alignlib the hostile input a careless or malicious spec, model or environment could
bring, and asserts the refusal a user would see (the file or field named) and that nothing ran.
"""

import ast
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alignlib.export import export_model, require_safetensors
from alignlib.models import RemoteCodeError, load_causal_lm, load_config, resolve_model
from alignlib.pipeline import Pipeline
from alignlib.raydata import log
from alignlib.redaction import MASK, redact, secret_values
from alignlib.spec import SpecError, load_spec, parse_spec
from alignlib.store import StageStore

ROOT = Path(__file__).resolve().parents[2]
MINIMAL = {"name": "t", "output_dir": "out", "data": {"path": "p.jsonl"}, "policy": {"model": "builtin:tiny-policy"}}


def problems(raw) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_spec(raw, "job.yaml")
    return info.value.problems


# -- 1. remote model code --------------------------------------------------------------------------

CUSTOM_CODE = """
import os
from pathlib import Path

from transformers import LlamaConfig, LlamaForCausalLM

Path(os.environ["ALIGNLIB_TEST_MARKER"]).write_text("the model's own code ran")


class CustomConfig(LlamaConfig):
    model_type = "alignlib-custom"


class CustomForCausalLM(LlamaForCausalLM):
    config_class = CustomConfig
"""


@pytest.fixture
def code_model(model_cache, tmp_path, monkeypatch):
    """The tiny policy, saved with an `auto_map` to a module in its directory that leaves a marker file when imported."""
    model = tmp_path / "custom-model"
    shutil.copytree(resolve_model("builtin:tiny-policy"), model)
    config = json.loads((model / "config.json").read_text())
    config.update(
        model_type="alignlib-custom",
        architectures=["CustomForCausalLM"],
        auto_map={
            "AutoConfig": "custom_config.CustomConfig",
            "AutoModelForCausalLM": "custom_config.CustomForCausalLM",
        },
    )
    (model / "config.json").write_text(json.dumps(config))
    (model / "custom_config.py").write_text(CUSTOM_CODE)
    marker = tmp_path / "MARKER"
    monkeypatch.setenv("ALIGNLIB_TEST_MARKER", str(marker))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return model, marker


def test_a_model_with_its_own_code_is_refused_by_default(code_model):
    model, marker = code_model
    for load in (lambda: load_causal_lm(str(model)), lambda: load_config(str(model))):
        with pytest.raises(RemoteCodeError, match="set trust_remote_code: true on that model"):
            load()
    assert not marker.exists(), "the model's code must not be imported"


def test_the_job_names_the_spec_field_to_set_before_any_stage_runs(code_model, tmp_path):
    model, marker = code_model
    cases = {
        "policy.trust_remote_code": {"policy": {"model": str(model)}},
        "generate.weak_model.trust_remote_code": {"generate": {"weak_model": {"model": str(model)}}},
        "score.reward.trust_remote_code": {"score": {"reward": {"type": "model", "model": str(model)}}},
        "score.rewards[1].trust_remote_code": {
            "score": {
                "rewards": [
                    {"type": "function", "function": "alignlib.rewards:exact_match"},
                    {"type": "model", "model": str(model)},
                ]
            }
        },
    }
    for field, section in cases.items():
        spec = parse_spec({**MINIMAL, "output_dir": str(tmp_path / "run"), **section})
        with pytest.raises(RemoteCodeError) as info:
            Pipeline(spec).run(["prompts"])
        assert f"set {field}: true" in str(info.value) and str(model) in str(info.value)
    assert not marker.exists() and not (tmp_path / "run" / "prompts").exists()


def test_trust_remote_code_true_loads_the_model_and_logs_it_once(code_model, tmp_path):
    model, marker = code_model
    script = f"""
from alignlib.models import load_causal_lm
from alignlib.pipeline import Pipeline
from alignlib.spec import parse_spec
spec = parse_spec({{"name": "t", "output_dir": {str(tmp_path / "run")!r}, "data": {{"path": "p.jsonl"}},
                    "policy": {{"model": {str(model)!r}, "trust_remote_code": True}}}})
Pipeline(spec).check_remote_code()
print("loaded", type(load_causal_lm(spec.policy.model, trust_remote_code=True)).__name__)
"""
    # A process of its own: transformers copies the model's module into HF_MODULES_CACHE and imports it.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_MODULES_CACHE": str(tmp_path / "hf-modules")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    said = f"[alignlib] policy.trust_remote_code is true: model {model} may run Python code shipped with it when loaded"
    assert lines.count(said) == 1, done.stdout
    assert "loaded CustomForCausalLM" in lines and marker.exists()


def test_remote_code_reaches_vllm_only_through_the_model_field():
    from alignlib.generate.vllm_engine import generate_config
    from alignlib.score.vllm_scorer import reward_config

    spec = parse_spec({**MINIMAL, "policy": {"model": "org/model", "trust_remote_code": True}})
    assert generate_config(spec.policy, spec.generate).engine_kwargs["trust_remote_code"] is True
    default = parse_spec(
        {
            **MINIMAL,
            "policy": {"model": "org/model"},
            "score": {"reward": {"type": "model", "model": "org/rm", "engine": "vllm"}},
        }
    )
    assert generate_config(default.policy, default.generate).engine_kwargs["trust_remote_code"] is False
    assert reward_config(default.score.reward).engine_kwargs["trust_remote_code"] is False
    found = problems({**MINIMAL, "generate": {"engine_kwargs": {"trust_remote_code": True}}})
    assert found == [
        "generate.engine_kwargs: trust_remote_code is not an engine argument here; set policy.trust_remote_code "
        "(or generate.weak_model.trust_remote_code): true instead"
    ]


# -- 2. YAML ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tag",
    [
        '!!python/object/apply:os.system ["touch {marker}"]',
        "!!python/name:os.system",
        '!!python/object/new:subprocess.Popen [["touch", "{marker}"]]',
        "!!python/module:os",
    ],
)
def test_python_yaml_tags_are_refused_and_never_run(tmp_path, tag):
    marker = tmp_path / "MARKER"
    path = tmp_path / "job.yaml"
    path.write_text(f"output_dir: out\nname: {tag.format(marker=marker)}\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.source == str(path)
    assert info.value.problems[0].startswith("line 2, column 7: invalid YAML: could not determine a constructor")
    assert not marker.exists()


def test_an_alias_bomb_is_refused_fast(tmp_path):
    # 9 levels of 9 aliases: 9**9 (387 million) values once expanded, from 600 bytes of YAML.
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 10)]
    path = tmp_path / "job.yaml"
    path.write_text("\n".join(lines) + "\nname: t\n")
    started = time.perf_counter()
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert time.perf_counter() - started < 2.0
    assert info.value.problems == ["refused: the document expands to more than 100000 values through its aliases"]


def test_a_recursive_alias_is_refused(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("name: t\ngenerate: {engine_kwargs: &loop {again: [*loop]}}\n")
    with pytest.raises(SpecError, match="refers to a value that contains it"):
        load_spec(path)


def test_ordinary_anchors_still_work(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(
        "name: t\noutput_dir: out\ndata: {path: p.jsonl}\npolicy: {model: builtin:tiny-policy}\n"
        "generate: {resources: &one_cpu {CPU: 1}}\nscore: {reward: {type: model, model: m, resources: *one_cpu}}\n"
    )
    assert load_spec(path).score.reward.resources == {"CPU": 1.0}


# -- 3. no pickle ----------------------------------------------------------------------------------


@functools.cache
def _sources() -> list[tuple[str, list[ast.AST]]]:
    """(path, every AST node) of each alignlib module."""
    paths = sorted((ROOT / "alignlib").rglob("*.py"))
    return [(str(p.relative_to(ROOT)), list(ast.walk(ast.parse(p.read_text())))) for p in paths]


def _calls(name: str):
    """(file:line, call node) of every call to `name` (e.g. `torch.load`, `eval`) in alignlib's source."""
    for path, nodes in _sources():
        for node in nodes:
            if isinstance(node, ast.Call) and ast.unparse(node.func) == name:
                yield f"{path}:{node.lineno}", node


def _imports(modules: set[str]) -> list[str]:
    """file:line of every import of one of `modules` (or a submodule) in alignlib's source."""
    found = []
    for path, nodes in _sources():
        for node in nodes:
            if isinstance(node, ast.Import):
                names = {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                names = {node.module or ""}
            else:
                continue
            if {n.split(".")[0] for n in names} & modules:
                found.append(f"{path}:{node.lineno}")
    return found


def test_alignlib_reads_no_pickle():
    for where, call in _calls("torch.load"):
        flags = {k.arg: ast.unparse(k.value) for k in call.keywords}
        assert flags.get("weights_only") == "True", f"{where}: torch.load without weights_only=True"
    assert not _imports({"pickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"})
    assert not [w for w, c in _calls("np.load") if "allow_pickle" in ast.unparse(c)]


def test_export_writes_safetensors_and_refuses_pickled_weights(model_cache, tmp_path):
    checkpoint = Path(resolve_model("builtin:tiny-policy"))
    assert export_model(str(checkpoint), str(tmp_path / "export"), "builtin:tiny-policy", merge_lora=False) == "full"
    assert list((tmp_path / "export").glob("*.safetensors"))
    pickled = tmp_path / "pickled"
    shutil.copytree(checkpoint, pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"not really weights")
    with pytest.raises(RuntimeError, match=r"found pickle files \['pytorch_model.bin'\]"):
        export_model(str(pickled), str(tmp_path / "export2"), "builtin:tiny-policy", merge_lora=False)
    (pickled / "pytorch_model.bin").unlink()
    for weights in pickled.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(RuntimeError, match="no .safetensors"):
        require_safetensors(pickled)


# -- 4. function rewards ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("function", "message"),
    [
        ("/tmp/evil.py:score", "'/tmp/evil.py' is a file path; name an importable module"),
        ("evil.py:score", "'evil.py' is a file path"),
        ("..\\evil:score", "evil' is a file path"),
        ("alignlib.rewards", "expected `module:function`"),
        ("os.path:", "expected `module:function`"),
        ("no_such_module_xyz:score", "cannot import module 'no_such_module_xyz'"),
        ("alignlib.rewards:no_such_function", "module 'alignlib.rewards' has no callable 'no_such_function'"),
        ("alignlib.rewards:_INTEGER", "'_INTEGER' is not a public function name"),
        ("os:_exit", "'_exit' is not a public function name"),
        ("alignlib.rewards:re.compile", "'re.compile' is not a public function name"),
        ("alignlib.models:BUILTIN_PREFIX", "alignlib.models:BUILTIN_PREFIX is a str, not a function"),
        ("collections:Counter", "collections:Counter is a type, not a function"),
        ("__import__('os').system('x'):f", "is not a module name"),
    ],
)
def test_a_function_reward_must_be_an_importable_public_function(function, message):
    found = problems({**MINIMAL, "score": {"reward": {"type": "function", "function": function}}})
    assert len(found) == 1 and found[0].startswith("score.reward.function: ") and message in found[0], found
    listed = problems(
        {
            **MINIMAL,
            "score": {
                "rewards": [
                    {"type": "function", "function": "alignlib.rewards:exact_match"},
                    {"type": "function", "function": function},
                ]
            },
        }
    )
    assert len(listed) == 1 and listed[0].startswith("score.rewards[1].function: "), listed


def test_nothing_executes_a_string_as_code():
    for builtin in ("eval", "exec", "compile", "__import__"):
        assert not list(_calls(builtin)), f"{builtin}() called in alignlib"


# -- 5. output paths -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../escape", "..", "a/b", "/abs", "a\\b", ".hidden", "x/../y", "a..b", ""])
def test_a_run_name_cannot_leave_the_output_directory(name):
    found = problems({**MINIMAL, "name": name})
    assert found == [
        f"name: {name!r} is not a plain name: it becomes part of a path under output_dir, so it may hold only "
        "letters, digits, `.`, `_` and `-`, start with a letter or digit, and contain no `/`, `\\` or `..`"
    ]


def test_a_run_name_override_is_checked_too(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(MINIMAL))
    with pytest.raises(SpecError) as info:
        load_spec(path, ["name=../../escape"])
    assert info.value.source == str(path) and info.value.problems[0].startswith("name: '../../escape'")
    assert parse_spec({**MINIMAL, "name": "demo-2.v1_x"}).name == "demo-2.v1_x"


# -- 6. secrets ------------------------------------------------------------------------------------

SECRETS = {
    "HF_TOKEN": "hf_FAKEtokenValue1234",
    "AWS_SECRET_ACCESS_KEY": "aws/secret+KEY=value",
    "WANDB_API_KEY": "wandb0123456789abcdef",
    "RAY_AUTH_TOKEN": "ray-auth-token-xyz-987",
    "DB_PASSWORD": 'pa"ss\\word-0001',
    "GCP_CREDENTIALS": "gcp-credentials-json-blob",
}


def test_secret_looking_variables_are_masked_and_others_are_not():
    environ = {**SECRETS, "HOME": "/home/someone", "RAY_AUTH_MODE": "token", "PATH": "/usr/bin"}
    assert set(secret_values(environ)) == set(SECRETS.values())
    text = " ".join(f"{k}={v}" for k, v in environ.items())
    masked = redact(text, environ)
    assert not [v for v in SECRETS.values() if v in masked]
    assert masked.count(MASK) == len(SECRETS)
    assert "HOME=/home/someone" in masked and "RAY_AUTH_MODE=token" in masked


def test_log_lines_and_manifests_never_hold_a_secret(tmp_path, monkeypatch, capsys):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    log(f"downloading with token {SECRETS['HF_TOKEN']}")
    assert capsys.readouterr().out == f"[alignlib] downloading with token {MASK}\n"
    store = StageStore(tmp_path / "run")
    with store.writer("train") as out:
        # JSON escapes the quote and backslash of DB_PASSWORD; the escaped form is masked too.
        out.commit("fp", inputs={}, stats={k: f"value {v}" for k, v in SECRETS.items()})
    text = (tmp_path / "run" / "train" / "manifest.json").read_text()
    assert not [v for v in SECRETS.values() if v in text or json.dumps(v)[1:-1] in text]
    assert json.loads(text)["stats"] == {k: f"value {MASK}" for k in SECRETS}
