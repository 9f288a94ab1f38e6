"""`import alignlib` stays light: vLLM and DeepSpeed load only inside the stages that use them."""

import subprocess
import sys
from pathlib import Path

HEAVY = ["vllm", "deepspeed", "bitsandbytes", "peft", "ray.data.llm"]


def test_import_alignlib_loads_neither_vllm_nor_deepspeed():
    code = (
        "import sys, alignlib, alignlib.cli, alignlib.spec, alignlib.pipeline, alignlib.losses, alignlib.pairs, "
        "alignlib.generate, alignlib.score, alignlib.train.loop, alignlib.train.backends, alignlib.export; "
        f"print([m for m in {HEAVY!r} if m in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def module_imports(root: Path) -> dict[str, set[str]]:
    """alignlib module -> the alignlib modules it imports anywhere in its body (functions included)."""
    import ast

    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph = {}
    for name, path in modules.items():
        edges = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_between_alignlib_modules():
    """Imports inside functions count too: a cycle there still ties the modules' designs together."""
    graph = module_imports(Path(__file__).resolve().parents[2] / "alignlib")
    assert "alignlib.stages" in graph and graph["alignlib.pipeline"], "the graph covers the package"
    assert cycles(graph) == []
