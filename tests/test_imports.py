"""The package's import graph has no cycle: every import inside rlrr/ (module level or inside a function,
relative or absolute), read from the source, resolved to the module it loads. And the entry point stays
light where loader workers import it."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.integration
def test_the_entry_point_run_again_in_a_loader_worker_leaves_the_training_stack_out():
    """multiprocessing's forkserver runs the parent's script again, as __mp_main__, in every loader worker it
    starts (three per rank: train, val, test): launch/train.py must not import timm, torchmetrics or the
    training loop there (about 1.5 s of CPU per worker before it was kept light)."""
    heavy = ("timm", "torchmetrics", "rlrr.train", "rlrr.run", "rlrr.evaluate", "deepspeed")
    code = ("import runpy, sys; runpy.run_path(sys.argv[1], run_name='__mp_main__'); "
            f"print(sorted(m for m in {heavy!r} if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code, str(ROOT / "launch" / "train.py")], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stdout + res.stderr[-2000:]


@pytest.mark.integration
def test_print_run_dir_answers_without_importing_torch(tmp_path):
    """A batch script asks for the run directory at every start and requeue (launch/slurm/common.sh): that
    reads the config only, so it must not pay for torch (about 5 s of CPU with timm and torch._dynamo)."""
    code = ("import runpy, sys; main = runpy.run_path(sys.argv[1], run_name='entry')['main']; "
            "main(sys.argv[2:]); print(sorted(m for m in ('torch', 'numpy', 'webdataset') if m in sys.modules))")
    argv = ["--print-run-dir", "--config", str(ROOT / "configs" / "vtab" / "kitti.yaml"),
            "--set", f"output_dir={tmp_path}", "run_name=kitti-a"]
    res = subprocess.run([sys.executable, "-c", code, str(ROOT / "launch" / "train.py"), *argv],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.splitlines() == [str(tmp_path / "kitti-a"), "[]"]


def test_long_lived_imports_pause_the_collector_then_freeze_what_was_made(tmp_path):
    """rlrr.startup: no collection while the heavy imports load, then what they made is frozen out of
    later collections; a block that loads nothing (a second run in one process) freezes nothing; a
    collector the caller had turned off stays off, even when the block raises."""
    import gc
    import importlib.util

    from rlrr.startup import long_lived_imports

    (tmp_path / "rlrr_startup_probe.py").write_text("TABLE = [[i] for i in range(1000)]\n")
    spec = importlib.util.spec_from_file_location("rlrr_startup_probe", tmp_path / "rlrr_startup_probe.py")
    before = gc.get_freeze_count()
    try:
        with long_lived_imports():
            assert not gc.isenabled()
            probe = sys.modules["rlrr_startup_probe"] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(probe)
        assert gc.isenabled() and gc.get_freeze_count() >= before + len(probe.TABLE)
    finally:
        del sys.modules["rlrr_startup_probe"]
    frozen = gc.get_freeze_count()
    with long_lived_imports():
        garbage = [[i] for i in range(1000)]
    # frozen objects are still freed by reference counting (another thread's, say), so the count may fall
    # meanwhile; a freeze would have raised it by the 1,000 lists at least
    assert gc.get_freeze_count() <= frozen and len(garbage) == 1000
    gc.disable()
    try:
        with pytest.raises(KeyError), long_lived_imports():
            raise KeyError("inside")
        assert not gc.isenabled()
    finally:
        gc.enable()
