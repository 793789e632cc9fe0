"""The package's layers, read from every import statement (function-level ones included): the
bottom layer imports nothing else of optimlib; the kernels import only the bottom layer; no Python
file of the library is over 500 lines."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BOTTOM = ("optimlib.registry", "optimlib.validation", "optimlib.distributed", "optimlib.formats")


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "kernels":
        parts = ["optimlib", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    files = list((REPO / "optimlib").rglob("*.py")) + list((REPO / "kernels").rglob("*.py"))
    return {_module_name(p): p for p in files}


def _imports(path: Path, modules: dict) -> set[str]:
    """The optimlib modules ``path`` imports anywhere in its body (a package import counts as its
    ``__init__``; ``from package import module`` as the module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name.startswith("optimlib") and name in modules:
                found.add(name)
    return found


def _edges(name: str, path: Path, modules: dict) -> set[str]:
    """Imports of other modules; an import of an enclosing package's ``__init__`` is left out (it
    is how the package exposes the module itself)."""
    return {m for m in _imports(path, modules) if m != name and not name.startswith(m + ".")}


GRAPH = {name: _edges(name, path, _sources()) for name, path in _sources().items()}


def _in(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if _in(m, BOTTOM)))
def test_bottom_layer_imports_only_the_bottom_layer(module):
    assert all(_in(m, BOTTOM) for m in GRAPH[module]), (module, sorted(GRAPH[module]))


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if _in(m, ("optimlib.kernels",))))
def test_kernels_import_only_the_bottom_layer(module):
    assert all(_in(m, BOTTOM + ("optimlib.kernels",)) for m in GRAPH[module]), (module, sorted(GRAPH[module]))


def test_no_library_file_over_500_lines():
    long = {str(p.relative_to(REPO)): n for p in _sources().values()
            if (n := len(p.read_text().splitlines())) > 500}
    assert not long, long
