"""The package's layout rules: no import cycles, one home for the run-folder names, inference and
serving without Lightning."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "brainseg"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its source (package __init__ files that
    only hold a docstring are left out: importing a submodule runs them, but they import nothing)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            graph[name] |= {t for t in targets if t in modules and t != name and t != "brainseg"}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("literal", ["split.json", "model.pt", "config.yaml", "last.ckpt"])
def test_run_folder_names_are_written_in_one_module(literal):
    homes = sorted(module_name(p) for p in PACKAGE.rglob("*.py")
                   if any(isinstance(n, ast.Constant) and n.value == literal
                          for n in ast.walk(ast.parse(p.read_text()))))
    assert homes == ["brainseg.runs.folder"]


@pytest.mark.parametrize("module", ["brainseg.inference", "brainseg.predict", "brainseg.predict_merge",
                                    "brainseg.serve", "brainseg.export", "brainseg.evaluation.evaluate"])
def test_inference_and_serving_do_not_import_lightning(module):
    code = f"import sys, {module}; print('lightning' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_imports_sit_at_the_top_of_modules():
    """Only cli.py and the package __init__ import lazily (start-up time); plots picks its backend
    first; the rest are optional dependencies probed in a try, or heavy ones behind a choice (a model,
    the ONNX backend, making a split) that every `brainseg predict` would otherwise pay for."""
    allowed = {("brainseg.plots", "matplotlib"), ("brainseg.plots", "matplotlib.pyplot"),
               ("brainseg.models.registry", "monai.networks.nets"), ("brainseg.training", "tensorboard"),
               ("brainseg.export", "torch.onnx"), ("brainseg.runs.model_file", "sys"),
               ("brainseg.inference", "brainseg.export"), ("brainseg.data.splits", "sklearn.model_selection")}
    late = []
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        if name in ("brainseg.cli", "brainseg"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and node.col_offset > 0:
                imported = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                if (name, imported) not in allowed:
                    late.append(f"{name}: {imported} (line {node.lineno})")
    assert late == []
