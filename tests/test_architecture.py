"""The package architecture, checked from the source: layers point down, no cycles, small units.

An AST walk over ``src/histolens`` collects every histolens import of every module, including
imports inside functions and under ``TYPE_CHECKING`` (moving an import into a function hides a
cycle, it does not break it). Third-party imports are not looked at. Each test lists every
offender, so one run shows all that is wrong.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "histolens"

# The layers, lowest first. A module may import its own layer's modules (without cycles) and any
# lower layer, never a higher one. A name is a module or package; a module belongs to the longest
# name that prefixes it ("histolens" is the package's own __init__ only). docs/architecture.md
# draws the same list.
LAYERS: tuple[tuple[str, ...], ...] = (
    (
        "histolens",
        "histolens.errors",
        "histolens.atomic",
        "histolens.rundir",
        "histolens.progress",
        "histolens.moved",
        "histolens.lazy",
    ),
    ("histolens.stats",),
    ("histolens.config",),  # the typed run config: validates operating points with stats' parser
    ("histolens.data",),
    ("histolens.stain",),
    ("histolens.models",),
    ("histolens.checkpoint",),
    ("histolens.inference",),
    ("histolens.evaluation",),
    ("histolens.report",),  # reads what evaluation wrote; training and the CLI call it
    ("histolens.training",),
    ("histolens.export",),
    ("histolens.explain",),
    ("histolens.slides",),  # whole-slide images: tiles through the Predictor, Grad-CAM via explain
    ("histolens.gui", "histolens.web"),
    ("histolens.cli", "histolens.testing", "histolens.__main__"),
)
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80


@dataclass(frozen=True)
class Import:
    importer: str
    target: str  # the histolens module imported
    names: tuple[str, ...]  # names taken from it (empty for ``import x`` / a module import)
    line: int

    def where(self) -> str:
        return f"{self.importer}:{self.line}"


@cache
def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = ("histolens", *path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


@cache
def tree(module: str) -> ast.Module:
    return ast.parse(modules()[module].read_text(), filename=str(modules()[module]))


def _absolute(module: str, level: int, name: str | None) -> str:
    if level == 0:
        return name or ""
    package = module if modules()[module].name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{name}" if name else package


def imports_of(module: str) -> Iterator[Import]:
    known = modules()
    for node in ast.walk(tree(module)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "histolens":
                    yield Import(module, alias.name, (), node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, node.level, node.module)
            if base.split(".")[0] != "histolens":
                continue
            attrs = []
            for alias in node.names:
                if f"{base}.{alias.name}" in known:  # ``from histolens.pkg import module``
                    yield Import(module, f"{base}.{alias.name}", (), node.lineno)
                else:
                    attrs.append(alias.name)
            if attrs:
                yield Import(module, base, tuple(attrs), node.lineno)


@cache
def all_imports() -> tuple[Import, ...]:
    return tuple(i for m in modules() for i in imports_of(m) if i.target != m)


def layer_of(module: str) -> int:
    best, best_len = -1, -1
    for index, names in enumerate(LAYERS):
        for name in names:
            inside = module == name or (name != "histolens" and module.startswith(name + "."))
            if inside and len(name) > best_len:
                best, best_len = index, len(name)
    return best


def package_of(module: str) -> str:
    """The subpackage a module belongs to (``histolens`` for the top-level modules)."""
    parts = module.split(".")
    path = modules()[module]
    if path.name == "__init__.py":
        return module
    return ".".join(parts[:-1])


def test_every_module_has_a_layer() -> None:
    assert layer_of("histolens.unlisted") == -1  # the package name itself is no catch-all
    missing = sorted(m for m in modules() if layer_of(m) < 0)
    assert not missing, "modules in no layer (add them to LAYERS):\n" + "\n".join(missing)


def test_every_import_resolves_to_a_module() -> None:
    unknown = [
        f"{i.where()} imports {i.target}" for i in all_imports() if i.target not in modules()
    ]
    assert not unknown, "\n".join(unknown)


def test_no_upward_imports() -> None:
    upward = [
        f"{i.where()} imports {i.target} (layer {layer_of(i.importer)} -> {layer_of(i.target)})"
        for i in all_imports()
        if layer_of(i.target) > layer_of(i.importer)
    ]
    assert not upward, f"{len(upward)} upward imports:\n" + "\n".join(upward)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_cycle_finder_finds_a_cycle() -> None:
    # The checker itself: a -> b -> c -> a is one cycle, d hangs off it.
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_no_import_cycles() -> None:
    graph: dict[str, set[str]] = {m: set() for m in modules()}
    for i in all_imports():
        if i.target in graph:
            graph[i.importer].add(i.target)
    cycles = _cycles(graph)
    assert not cycles, f"{len(cycles)} import cycles:\n" + "\n".join(
        " <-> ".join(c) for c in cycles
    )


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _same_package(importer: str, target: str) -> bool:
    package = package_of(target)
    if package == "histolens":
        return package_of(importer) == "histolens"
    return importer == package or importer.startswith(package + ".")


def test_no_private_imports_across_packages() -> None:
    offenders = []
    for i in all_imports():
        if _same_package(i.importer, i.target):
            continue
        private_module = [p for p in i.target.split(".") if _private(p)]
        private_names = [n for n in i.names if _private(n)]
        if private_module or private_names:
            what = i.target + (f" ({', '.join(private_names)})" if private_names else "")
            offenders.append(f"{i.where()} imports private {what}")
    assert not offenders, f"{len(offenders)} private imports across packages:\n" + "\n".join(
        offenders
    )


def test_modules_are_small() -> None:
    big = []
    for module, path in modules().items():
        lines = len(path.read_text().splitlines())
        if lines > MAX_MODULE_LINES:
            big.append(f"{module}: {lines} lines")
    assert not big, f"modules over {MAX_MODULE_LINES} lines:\n" + "\n".join(big)


def test_functions_are_small() -> None:
    long = []
    for module in modules():
        for node in ast.walk(tree(module)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{module}:{node.lineno} {node.name}: {length} lines")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


@pytest.mark.parametrize(
    ("importer", "target", "allowed"),
    [
        ("histolens.models.pipeline", "histolens.data.records", True),
        ("histolens.data.records", "histolens.models.pipeline", False),
        ("histolens.gui.app", "histolens.web.schemas", True),  # same layer
        ("histolens.errors", "histolens.cli.commands", False),
    ],
)
def test_layer_rule(importer: str, target: str, allowed: bool) -> None:
    # The rule the walk applies, on fixed examples (so a broken LAYERS table cannot pass silently).
    assert (layer_of(target) <= layer_of(importer)) is allowed
