"""Imports run one way: no cycles among the package's modules, each layer uses only the layers below it,
and what must run without torch (the runtime, on a Jetson) imports without it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "protoad_edge"

# Lowest first. Shared code; the torch-free runtime and the backend registry; the exporters (which run
# what they make through the runtime); the build stage (which drives the exporters); evaluation (which
# reads datasets with the build's readers and runs any backend); teaching a deployed bundle (which checks a teach
# with the evaluation's accuracy gate); the CLIs.
LAYERS = (
    (
        "shared",
        (
            "protoad_edge",
            "errors",
            "atomic",
            "owner",
            "progress",
            "constants",
            "preprocess",
            "metadata",
            "bundle",
            "decision",
            "metrics",
            "gpu",
            "redact",
            "imagestats",
            "versions",
        ),
    ),
    ("runtime", ("runtime",)),
    ("export", ("export",)),
    ("build", ("builder",)),
    ("evaluation", ("evaluation",)),
    ("teach", ("teach",)),
    ("cli", ("cli",)),
)


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts).removesuffix(".__init__")] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Modules of the package that ``name`` imports anywhere (functions included, TYPE_CHECKING blocks not)."""
    tree = ast.parse(path.read_text())
    skip = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for stmt in node.body
        for n in ast.walk(stmt)
    }
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rsplit(".", 1)[0] if "." in target else ""
            if target and target != name and not name.startswith(target + "."):
                out.add(target)
    return out


def layer_of(module: str) -> int:
    first = module.split(".")[1] if "." in module else module
    for index, (_, members) in enumerate(LAYERS):
        if first in members:
            return index
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS")


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_no_import_cycles(graph: dict[str, set[str]]) -> None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycle = stack[stack.index(target) :] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_each_layer_imports_only_layers_below_it(graph: dict[str, set[str]]) -> None:
    upward = sorted(
        f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
        for m, targets in graph.items()
        for t in targets
        if layer_of(t) > layer_of(m)
    )
    assert upward == []


def test_the_walker_sees_function_level_and_relative_imports(graph: dict[str, set[str]]) -> None:
    assert "protoad_edge.builder.pipeline" in graph["protoad_edge.cli.export"]  # imported inside main()
    assert (
        "protoad_edge.runtime.backends.base" in graph["protoad_edge.runtime.backends.registry"]
    )  # ``from .runtime.backend import``
    assert "protoad_edge.builder.network" not in graph["protoad_edge.export.onnx"]  # only under TYPE_CHECKING


TORCH_FREE = (
    "protoad_edge.runtime",
    "protoad_edge.runtime.loop",
    "protoad_edge.runtime.backends.ort",
    "protoad_edge.runtime.backends.trt",
    "protoad_edge.runtime.backends.registry",
    "protoad_edge.export.engine",
    "protoad_edge.export.tensorrt",
    "protoad_edge.evaluation.bench",
    "protoad_edge.evaluation.evaluate",
    "protoad_edge.builder.config",
    "protoad_edge.builder.datasets",
    "protoad_edge.builder.memory",
    "protoad_edge.cli.run",
    "protoad_edge.cli.bench",
    "protoad_edge.cli.eval",
    "protoad_edge.cli.export",
    "protoad_edge.versions",
    "protoad_edge.runtime.reload",
    "protoad_edge.export.prototypes",
    "protoad_edge.teach.teach",
    "protoad_edge.teach.check",
    "protoad_edge.evaluation.line_split",
    "protoad_edge.cli.teach",
)


def test_runtime_side_imports_without_torch() -> None:
    code = (
        "import importlib, importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'torchvision'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        f"for name in {TORCH_FREE!r}:\n"
        "    importlib.import_module(name)\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=PACKAGE.parent
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
