"""The package's import graph has no cycle: every import inside rlrr/ (module level or inside a function,
relative or absolute), read from the source, resolved to the module it loads."""
import ast
from pathlib import Path

from helpers import ROOT

PACKAGE = ROOT / "rlrr"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The rlrr modules ``path`` imports: ``from .x import y`` loads x.y when y is a module, else x."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "rlrr"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "rlrr":
                continue
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return found & modules


def _graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(f) for f in files}
    return {_module_name(f): _imports(f, modules) - {_module_name(f)} for f in files}


def _cycle(graph: dict[str, set[str]]):
    """One import cycle as a list of modules, or None (depth-first search with colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_walker_sees_lazy_relative_and_submodule_imports():
    graph = _graph()
    assert "rlrr.layers.fused" in graph["rlrr.layers.linear"]  # `from . import fused` inside a function
    assert "rlrr.layers.variants" in graph["rlrr.config"]  # `from .layers.variants import ...`
    assert "rlrr.data.transforms" in graph["rlrr.evaluate"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_rlrr_has_no_import_cycle():
    assert _cycle(_graph()) is None
