"""The package's shape: public verbs, layers whose imports only go down, no import cycle (function-level imports
included), size limits."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import dqdeploy

PACKAGE = Path(dqdeploy.__file__).resolve().parent
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Package modules imported anywhere in ``path`` (TYPE_CHECKING blocks excluded)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            candidates = [module] + [f"{module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        out |= {c for c in candidates if c in known and c != name}
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_inside_the_package():
    modules = _modules()
    graph = {name: _imports(name, path, set(modules)) for name, path in modules.items()}
    assert graph["dqdeploy.stages.sources"]  # the parser sees imports (a broken parser would pass trivially)
    assert _cycles(graph) == []


# bottom to top: a module may import its own layer and the layers before it (ARCHITECTURE.md draws them)
LAYERS = ["core", "system", "quant", "io", "runtimes", "exporters", "stages", "verify", "eval", "serve", "cli"]
MAX_TOP_LEVEL_MODULES = 6


def _layer(module: str) -> int:
    """Index of ``module``'s layer; the package's own top-level modules sit above every layer."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] not in LAYERS:
        return len(LAYERS)
    return LAYERS.index(parts[1])


def _upward(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} -> {t}" for m, targets in graph.items() for t in targets if _layer(t) > _layer(m))


def test_imports_only_go_down_the_layers():
    modules = _modules()
    top = [n for n in modules if n.count(".") == 1 and _layer(n) == len(LAYERS)]
    assert sorted(top) == ["dqdeploy.__main__"]  # every other module sits in a layer
    graph = {name: _imports(name, path, set(modules)) for name, path in modules.items()}
    assert _upward(graph) == []


def test_layer_check_finds_an_upward_import():
    assert _upward({"dqdeploy.core.errors": {"dqdeploy.io.paths"}, "dqdeploy.cli": {"dqdeploy.core.errors"}}) == [
        "dqdeploy.core.errors -> dqdeploy.io.paths"]


def test_every_import_of_the_package_resolves():
    """Function-level imports too: a module moved without its importers fixed fails here, not at run time."""
    modules = _modules()
    missing = []
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("dqdeploy")):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                if target not in modules:
                    missing.append(f"{name}:{node.lineno} imports {target}")
    assert missing == []


def test_few_modules_at_the_top_level():
    top = [p.name for p in PACKAGE.glob("*.py")]
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()} == set(LAYERS)


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_modules_and_functions_stay_small():
    too_big = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        if text.count("\n") > MAX_MODULE_LINES:
            too_big.append(f"{path.name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_big.append(f"{path.name}:{node.lineno} {node.name}: {length} lines")
    assert too_big == []


def test_public_surface_resolves_and_import_stays_light():
    assert set(dqdeploy.__all__) >= {"quantize", "export", "load_quantized", "load_runtime", "Recipe"}
    for name in dqdeploy.__all__:
        assert getattr(dqdeploy, name) is not None
    assert dqdeploy.export.__module__ == "dqdeploy.exporters.export"
    code = "import sys, dqdeploy; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
