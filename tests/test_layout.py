"""The layout stays true: no import cycles, gateway independent of admin, core independent of both, short modules.

Every check reads the source with `ast` (nothing is imported), so the whole file runs in well under a second.
Every import counts: at module level, inside functions and under `if TYPE_CHECKING:`.
"""

from __future__ import annotations

import ast
import functools
import itertools
from collections.abc import Iterator, Mapping, Set
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
PRODUCT_PACKAGES = ("gateway", "admin")

MAX_MODULE_LINES = 450
# Modules allowed over MAX_MODULE_LINES until their own issue splits them. Each entry must still be over the
# limit: a module that shrank below it leaves the list.
LONG_MODULES_ALLOWED: set[str] = set()

# The entry points of the two services and of the developer environment: only the CLI chooses between them.
SERVICE_ENTRY_MODULES = {"gateway.server", "admin.server", "admin.devenv.up"}
CLI_MODULE = "admin.cli"


@dataclass(frozen=True)
class Import:
    """One import statement's target inside the product, where it was written."""

    importer: str
    target: str
    line: int

    def __str__(self) -> str:
        return f"{self.importer}:{self.line} imports {self.target}"


@dataclass(frozen=True)
class Module:
    name: str
    path: str  # relative to the repository root, with forward slashes
    tree: ast.Module
    lines: int


def _module_name(relative: Path) -> str:
    parts = relative.with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def product_modules() -> Mapping[str, Module]:
    """Every module of the product packages, by dotted name."""
    modules: dict[str, Module] = {}
    for package in PRODUCT_PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            relative = path.relative_to(REPO_ROOT)
            source = path.read_text(encoding="utf-8")
            name = _module_name(relative)
            tree = ast.parse(source, str(relative))
            modules[name] = Module(name, relative.as_posix(), tree, len(source.splitlines()))
    return modules


def _is_product(name: str) -> bool:
    return name.split(".", 1)[0] in PRODUCT_PACKAGES


def _from_base(module: Module, node: ast.ImportFrom) -> str:
    """The absolute module a `from X import ...` names, relative imports resolved."""
    if not node.level:
        return node.module or ""
    is_package = module.path.endswith("/__init__.py")
    package = module.name if is_package else module.name.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def imports_of(module: Module, known: Set[str]) -> Iterator[Import]:
    """The product modules `module` imports anywhere in its body; `from pkg import name` counts as pkg.name when
    that is a module of its own."""
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(module, node)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in dict.fromkeys(targets):
            if _is_product(target):
                yield Import(module.name, target, node.lineno)


@functools.cache
def product_imports() -> tuple[Import, ...]:
    modules = product_modules()
    return tuple(found for module in modules.values() for found in imports_of(module, modules.keys()))


SAMPLE_MODULES = {
    "gateway", "gateway.core", "gateway.core.store", "gateway.auth", "gateway.tokens", "admin", "admin.cli",
}


@pytest.mark.parametrize(
    ("importer", "source", "targets"),
    [
        pytest.param("gateway/extract.py", "import gateway.core.store", ["gateway.core.store"], id="import"),
        pytest.param("gateway/extract.py", "from gateway.core import store", ["gateway.core.store"],
                     id="from-package-import-module"),
        pytest.param("gateway/extract.py", "from gateway.core.store import Pool", ["gateway.core.store"],
                     id="from-module-import-name"),
        pytest.param("gateway/extract.py", "from gateway.core import Thing", ["gateway.core"],
                     id="from-package-import-name"),
        pytest.param("gateway/extract.py", "from . import tokens", ["gateway.tokens"], id="relative"),
        pytest.param("gateway/extract.py", "from .core import store", ["gateway.core.store"], id="relative-subpackage"),
        pytest.param("gateway/core/__init__.py", "from . import store", ["gateway.core.store"],
                     id="relative-in-package"),
        pytest.param("admin/devenv/up.py", "from .. import cli", ["admin.cli"], id="relative-parent"),
        pytest.param("gateway/extract.py", "def f():\n    from gateway import tokens", ["gateway.tokens"],
                     id="in-a-function"),
        pytest.param("gateway/extract.py", "if TYPE_CHECKING:\n    from gateway.auth import X", ["gateway.auth"],
                     id="type-checking"),
        pytest.param("gateway/extract.py", "import asyncpg\nfrom typing import Any", [], id="not-product"),
    ],
)
def test_imports_are_found_wherever_they_are(importer: str, source: str, targets: list[str]) -> None:
    module = Module(_module_name(Path(importer)), importer, ast.parse(source), 1)
    assert [found.target for found in imports_of(module, SAMPLE_MODULES)] == targets


# --- cycles -------------------------------------------------------------------------------------------------


def strongly_connected(graph: Mapping[str, Set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components that hold a cycle (two or more nodes, or a self-import)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph.get(node, ())):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component: list[str] = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def one_cycle(graph: Mapping[str, Set[str]], component: list[str]) -> list[str]:
    """A shortest import path from the component's first module back to itself, staying inside the component."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for successor in sorted(graph.get(node, ())):
            if successor == start:
                return [*paths[node], start]
            if successor in members and successor not in paths:
                paths[successor] = [*paths[node], successor]
                queue.append(successor)
    raise AssertionError(f"{component} is not strongly connected")


@pytest.mark.parametrize(
    ("graph", "cycles"),
    [
        pytest.param({"a": {"b"}, "b": {"c"}, "c": set()}, [], id="chain"),
        pytest.param({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}, [], id="diamond"),
        pytest.param({"a": {"a"}}, [["a", "a"]], id="self-import"),
        pytest.param({"a": {"b"}, "b": {"a"}}, [["a", "b", "a"]], id="pair"),
        pytest.param({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c", "a"]], id="triangle"),
        pytest.param(
            {"a": {"b"}, "b": {"a", "c"}, "c": {"d"}, "d": {"c"}},
            [["a", "b", "a"], ["c", "d", "c"]],
            id="two-cycles",
        ),
    ],
)
def test_the_cycle_finder(graph: dict[str, set[str]], cycles: list[list[str]]) -> None:
    assert [one_cycle(graph, component) for component in strongly_connected(graph)] == cycles


def test_no_import_cycles() -> None:
    graph: dict[str, set[str]] = {name: set() for name in product_modules()}
    lines: dict[tuple[str, str], int] = {}
    for found in product_imports():
        graph[found.importer].add(found.target)
        lines.setdefault((found.importer, found.target), found.line)
    described = []
    for component in strongly_connected(graph):
        cycle = one_cycle(graph, component)
        steps = " -> ".join(f"{a} (line {lines[a, b]})" for a, b in itertools.pairwise(cycle))
        described.append(f"{steps} -> {cycle[-1]}   [cycle among {', '.join(component)}]")
    assert not described, "import cycles:\n" + "\n".join(described)


# --- who may import whom ------------------------------------------------------------------------------------


def _in(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_gateway_never_imports_admin() -> None:
    wrong = [str(i) for i in product_imports() if _in(i.importer, "gateway") and _in(i.target, "admin")]
    assert not wrong, "the gateway must not depend on the admin service:\n" + "\n".join(wrong)


def test_core_imports_only_core() -> None:
    wrong = [
        str(i)
        for i in product_imports()
        if _in(i.importer, "gateway.core") and not _in(i.target, "gateway.core")
    ]
    assert not wrong, "gateway.core is what both services share; it imports neither:\n" + "\n".join(wrong)


def test_only_the_cli_starts_services_and_nothing_imports_the_cli() -> None:
    wrong = [
        str(i)
        for i in product_imports()
        if (i.target in SERVICE_ENTRY_MODULES and i.importer != CLI_MODULE)
        or (i.target == CLI_MODULE and i.importer != "admin.__main__")
    ]
    assert not wrong, "only admin.cli chooses a service, and only `python -m admin` runs it:\n" + "\n".join(wrong)


# --- size and docstrings ------------------------------------------------------------------------------------


def test_modules_stay_short() -> None:
    modules = {module.path: module for module in product_modules().values()}
    too_long = [
        f"{path}: {module.lines} lines"
        for path, module in sorted(modules.items())
        if module.lines > MAX_MODULE_LINES and path not in LONG_MODULES_ALLOWED
    ]
    stale = [
        f"{path}: {modules[path].lines} lines" if path in modules else f"{path}: no such module"
        for path in sorted(LONG_MODULES_ALLOWED)
        if path not in modules or modules[path].lines <= MAX_MODULE_LINES
    ]
    assert not too_long, f"modules over {MAX_MODULE_LINES} lines (split along a real seam):\n" + "\n".join(too_long)
    assert not stale, "remove from LONG_MODULES_ALLOWED, they are short now or gone:\n" + "\n".join(stale)


def test_every_module_says_what_it_is_for() -> None:
    missing = [module.path for module in product_modules().values() if not ast.get_docstring(module.tree)]
    assert not missing, "modules without a docstring:\n" + "\n".join(sorted(missing))
