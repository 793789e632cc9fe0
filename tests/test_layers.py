"""The package's layers, read from every import statement (function-level ones included): no
import cycle; the bottom layer imports nothing else of optimlib; the kernels import only the bottom
layer; the code that reshards, estimates or remaps optimizer state reads the optimizers'
declarations and names none of their state keys; no Python file of the library is over 500 lines."""

import ast
import re
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BOTTOM = ("optimlib.registry", "optimlib.validation", "optimlib.distributed", "optimlib.formats")


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    files = list((REPO / "optimlib").rglob("*.py"))
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


def _cycle(graph: dict) -> list[str] | None:
    """One import cycle of ``graph`` (a depth-first search; ``None`` when there is none)."""
    done, path, on_path = set(), [], set()

    def visit(node):
        path.append(node)
        on_path.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in on_path:
                return path[path.index(nxt):] + [nxt]
            if nxt not in done:
                found = visit(nxt)
                if found:
                    return found
        on_path.discard(path.pop())
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done:
            found = visit(start)
            if found:
                return found
    return None


def test_no_import_cycle():
    assert _cycle(GRAPH) is None, " -> ".join(_cycle(GRAPH))


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


# ----------------------------------------------------------------------------- state ownership
STATE_READERS = ("optimlib.train", "optimlib.distributed", "optimlib.reparam", "optimlib.bench.estimate")
# What of the optimizers those modules may import: the package, the factory, the declarations and
# the layer-wise stepper -- no optimizer's module.
PUBLIC_OPTIM = {"optimlib.optim", "optimlib.optim.factory", "optimlib.optim.state_spec", "optimlib.optim.layerwise"}
# Declared keys that are also ordinary words of these modules ("step": the training step of the loop,
# its metrics and manifests, and N:M's schedule buffer; "basis": dynamic rank's change of basis;
# "indices": SLTrain's sparse support).
HOMONYMS = {"step", "basis", "indices"}


def _declared_keys() -> set[str]:
    """Every state key the registered optimizers declare, over their projection, moment and rule
    variants, on one process and on 2 FSDP2 ranks."""
    from optimlib.optim import create_optimizer, get_optimizer_spec, list_optimizers
    from optimlib.optim.state_spec import Placement, state_specs

    model = torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.Linear(10, 6))
    keys = set()
    for name in list_optimizers():
        variants = [{"momentum": 0.9}] if name == "sgdp" else [{}]
        if get_optimizer_spec(name).matrix_keys:
            variants = [{"rank": 2, "target_modules": "all-linear", **v}
                        for v in ({}, {"moments_dtype": "int8"}, {"projection": "dct"})]
        for options in variants:
            try:
                opt = create_optimizer(model, name, lr=1e-3, **options)
            except ValueError:          # an option the method does not take (its error names it)
                continue
            for group in opt.param_groups:
                for shape in group["shapes"]:
                    for place in (Placement.whole(shape), Placement.fsdp2(shape, 2)):
                        keys.update(spec.key for spec in state_specs(opt, group, place))
    return keys


def test_state_readers_name_no_declared_state_key():
    keys = _declared_keys()
    assert {"exp_avg", "exp_avg_sq_row", "exp_avg_sign", "exp_avg_codes", "momentum_buffer"} <= keys
    found = []
    for module, path in _sources().items():
        if not _in(module, STATE_READERS):
            continue
        text = path.read_text()
        found += [(module, key) for key in sorted(keys - HOMONYMS) if re.search(rf"\b{key}\b", text)]
    assert not found, found


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if _in(m, STATE_READERS)))
def test_state_readers_import_no_optimizer_module(module):
    optim = {m for m in GRAPH[module] if _in(m, ("optimlib.optim",))}
    assert optim <= PUBLIC_OPTIM, (module, sorted(optim - PUBLIC_OPTIM))
