"""The import layering of the package, read from the sources with ast (nothing is imported).

intrain is built in layers: numerics (data just above them) <- kernels <- layers <- models <-
methods <- run <- cli. A module may import modules of its own level or of lower levels, never of
a higher one, and the imports between modules must not form a cycle (not even through an import
inside a function: a lazy import hides a cycle from the interpreter, it does not remove the
dependency).
This keeps every layer testable and reusable without the ones above it, and lets a new method,
format or backend be added as files instead of branches in the layers below.

What counts as an import: ``import intrain.x.y``, ``from intrain.x import y``, ``from intrain import
x``, relative imports and ``importlib.import_module("intrain.x")`` with a literal name, anywhere in
a file (module level, functions, ``if TYPE_CHECKING:`` blocks). ``from P import n`` names the
module ``P.n`` when that file exists (``from intrain.kernels import cpu`` -> ``intrain.kernels.cpu``),
else the package ``P`` itself (``from intrain.kernels import FUNCTIONS`` -> ``intrain.kernels``).
The implicit import of parent packages that Python performs is not counted, so a package's
``__init__`` importing its own submodules (re-exports) is fine; a submodule importing names back
from its package's ``__init__`` is an edge like any other.

To add a package or a top-level module, add one line to ``LEVELS``; a module under
``src/intrain`` that ``LEVELS`` does not place fails ``test_level_table_places_every_module``.
"""

from __future__ import annotations

import ast
from collections import defaultdict, deque
from dataclasses import dataclass

import pytest

from source_tree import PACKAGE, ScopedVisitor, package_modules, relative_path

# Level of each package / module: a module may import only modules of the same or a lower level.
# A key places the module of that name and everything below it (the longest key wins), except
# the package root "intrain", which places only src/intrain/__init__.py.
LEVELS: dict[str, float] = {
    "intrain.numeric": 0,      # QTensor, rounding, counter-based generator, requantisation
    "intrain.data": 0.5,       # datasets and pixels: may use numeric only
    "intrain.kernels": 1,      # integer product backends
    "intrain.layers": 2,       # integer layers and their initialisation
    "intrain.models": 3,       # model specs -> integer model / float twin
    "intrain.methods": 4,      # training methods: NITI, update, loss, averaging, float twin
    "intrain.run": 5,          # config, recipes, loop, checkpoint, evaluation, metrics
    "intrain.ternary": 5.5,    # converting a run to a ternary 8-2 model, its ranking and evaluation
    "intrain.cli": 6,          # entry points
    "intrain.plot": 6,
    "intrain.__main__": 6,
    # The root __init__ re-exports (QTensor) and may import anything; placing it at the top means
    # only entry points may import it (``from intrain import __version__``): a lower module that
    # imports ``intrain`` to reach into it must import the defining module instead.
    "intrain": 6,
}

# KNOWN VIOLATIONS of today's code (found by these tests, to be fixed by the restructuring of
# issue 10). Import cycles by the set of modules in the cycle (a strongly connected component)
# -> why it is there. test_no_import_cycles tolerates exactly these components (a cycle that
# grows, shrinks or appears elsewhere fails it); test_known_violation_is_gone is an
# xfail(strict=True) per entry, so when a cycle is removed that test XPASSes and fails the run
# until its entry is deleted here.
KNOWN_CYCLES: dict[frozenset[str], str] = {
}

# Known upward imports: (importing module, imported module) -> why. Same mechanism. None today.
KNOWN_UPWARD: dict[tuple[str, str], str] = {}


# ---------------------------------------------------------------- the import graph from the sources

@dataclass(frozen=True)
class Import:
    source: str      # importing module, "intrain.run.loop"
    target: str      # imported module, "intrain.run.checkpoint"; "" when it names no module
    written: str     # the module as written ("intrain.run" for ``from intrain.run import checkpoint``)
    path: str        # file shown in messages
    line: int
    scope: str       # "<module>" or the enclosing function ("resume" ...)

    @property
    def where(self) -> str:
        lazy = "" if self.scope == "<module>" else f" (inside {self.scope})"
        return f"{self.path}:{self.line}{lazy}"


def _base_package(module: str, is_package: bool, level: int) -> str:
    """The package a relative import of ``level`` dots in ``module`` starts from."""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    return ".".join(parts[: len(parts) - (level - 1)] if level > 1 else parts)


class _ImportCollector(ScopedVisitor):
    def __init__(self, module: str, is_package: bool, path: str, known: set[str]) -> None:
        super().__init__()
        self.module, self.is_package, self.path, self.known = module, is_package, path, known
        self.imports: list[Import] = []

    def _add(self, target: str, written: str, node: ast.AST) -> None:
        self.imports.append(Import(self.module, target, written, self.path, node.lineno, self.scope))

    def _resolve(self, name: str) -> str:
        return name if name in self.known else ""

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                self._add(self._resolve(alias.name), alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = _base_package(self.module, self.is_package, node.level)
            written = f"{base}.{node.module}" if node.module else base
        else:
            written = node.module or ""
        if not (written == PACKAGE or written.startswith(PACKAGE + ".")):
            return
        targets = []  # one entry per module named, in order: ``from P import a, b`` may be one or two
        for alias in node.names:
            sub = f"{written}.{alias.name}"
            target = sub if sub in self.known else self._resolve(written)
            if target not in targets:
                targets.append(target)
        for target in targets:
            self._add(target, written, node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if (name in ("import_module", "__import__") and node.args
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            written = node.args[0].value
            if written == PACKAGE or written.startswith(PACKAGE + "."):
                self._add(self._resolve(written), written, node)
        self.generic_visit(node)


def collect_imports(sources: dict[str, tuple[str, str, bool]]) -> list[Import]:
    """Every intrain import in ``sources``: module -> (source text, path to show, is a package)."""
    known = set(sources)
    found: list[Import] = []
    for module, (text, path, is_package) in sources.items():
        collector = _ImportCollector(module, is_package, path, known)
        collector.visit(ast.parse(text, filename=path))
        found += collector.imports
    return found


def package_sources() -> dict[str, tuple[str, str, bool]]:
    return {m: (p.read_text(encoding="utf-8"), relative_path(p), p.name == "__init__.py")
            for m, p in package_modules().items()}


def level_of(module: str, levels: dict[str, float] = LEVELS) -> float | None:
    best = None
    for key in levels:
        if module == key or (key != PACKAGE and module.startswith(key + ".")):
            if best is None or len(key) > len(best):
                best = key
    return None if best is None else levels[best]


def upward_imports(imports: list[Import], levels: dict[str, float] = LEVELS) -> list[Import]:
    return [i for i in imports if i.target and i.target != i.source
            and level_of(i.target, levels) is not None and level_of(i.source, levels) is not None
            and level_of(i.target, levels) > level_of(i.source, levels)]


def strongly_connected(nodes, edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module, or a self-import."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:  # recursion depth <= number of modules (tens)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges.get(v, ()):
                components.append(sorted(comp))

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return sorted(components)


def cycles_in(component: list[str], edges: dict[str, set[str]]) -> list[list[str]]:
    """For every import edge inside ``component``, the shortest cycle through it, as a chain
    ``[a, b, ..., a]``; duplicates (the same cycle from another edge) removed."""
    members = set(component)
    chains: list[list[str]] = []
    seen: set[tuple[str, ...]] = set()
    for u in sorted(members):
        for v in sorted(edges.get(u, set()) & members):
            # shortest path v -> u inside the component
            prev = {v: None}
            queue = deque([v])
            while queue and u not in prev:
                x = queue.popleft()
                for y in sorted(edges.get(x, set()) & members):
                    if y not in prev:
                        prev[y] = x
                        queue.append(y)
            path, x = [], u
            while x is not None:
                path.append(x)
                x = prev[x]
            cycle = [u] + path[::-1] if u != v else [u]  # u -> v -> ... -> u
            ring = cycle[:-1] if len(cycle) > 1 else cycle
            start = ring.index(min(ring))
            key = tuple(ring[start:] + ring[:start])
            if key not in seen:
                seen.add(key)
                chains.append(list(key) + [key[0]])
    return chains


def describe_cycle(chain: list[str], imports: list[Import]) -> str:
    lines = ["  " + " -> ".join(chain)]
    for a, b in zip(chain, chain[1:]):
        for i in imports:
            if i.source == a and i.target == b:
                lines.append(f"      {a} -> {b}: {i.where}")
    return "\n".join(lines)


def graph(imports: list[Import]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for i in imports:
        if i.target:
            edges[i.source].add(i.target)
    return edges


# ------------------------------------------------------------------------------- the tests

@pytest.fixture(scope="module")
def imports() -> list[Import]:
    return collect_imports(package_sources())


def test_level_table_places_every_module():
    """Every module under src/intrain has a level in LEVELS (a new package must be placed)."""
    unplaced = [f"  {m} ({relative_path(p)})" for m, p in package_modules().items() if level_of(m) is None]
    assert not unplaced, ("modules that LEVELS in tests/test_layering.py does not place "
                          "(add their package with its level):\n" + "\n".join(unplaced))


def test_every_intrain_import_names_a_module(imports):
    """Every ``intrain...`` import resolves to a module of the package (catches stale imports
    left behind when modules move)."""
    broken = [f"  {i.where}: imports {i.written!r}, which is no module under src/intrain"
              for i in imports if not i.target]
    assert not broken, "\n".join(broken)


def test_imports_point_to_the_same_level_or_lower(imports):
    """numerics <- data <- kernels <- layers <- models <- methods <- run <- cli: no module imports a
    module of a higher level (LEVELS), whether at module level or inside a function."""
    bad = [i for i in upward_imports(imports) if (i.source, i.target) not in KNOWN_UPWARD]
    report = [f"  {i.where}: {i.source} (level {level_of(i.source)}) imports {i.target} "
              f"(level {level_of(i.target)})" for i in bad]
    assert not report, "imports that point up the layering:\n" + "\n".join(report)


def test_no_import_cycles(imports):
    """No two modules import each other, directly or through others (same-level imports are
    allowed, cycles are not). Lists each cycle as a chain with the file:line of every import."""
    edges = graph(imports)
    components = strongly_connected(package_modules(), edges)
    report = []
    for comp in components:
        if frozenset(comp) in KNOWN_CYCLES:
            continue
        report.append(f"import cycle among {', '.join(comp)}:")
        report += [describe_cycle(chain, imports) for chain in cycles_in(comp, edges)]
    assert not report, "\n".join(report)


def _known_violations():
    for members, why in KNOWN_CYCLES.items():
        yield pytest.param("cycle", members, id="cycle: " + " + ".join(sorted(members)),
                           marks=pytest.mark.xfail(strict=True, reason=f"known import cycle: {why}"))
    for edge, why in KNOWN_UPWARD.items():
        yield pytest.param("upward", edge, id="upward: " + " -> ".join(edge),
                           marks=pytest.mark.xfail(strict=True, reason=f"known upward import: {why}"))


@pytest.mark.parametrize("kind, known", list(_known_violations()) or [pytest.param(None, None, id="none known")])
def test_known_violation_is_gone(imports, kind, known):
    """Each KNOWN_CYCLES / KNOWN_UPWARD entry fails here (xfail) while the violation exists; once
    it is fixed this XPASSes, which (strict) fails the run until the entry is deleted."""
    if kind is None:
        return
    if kind == "upward":
        assert known not in {(i.source, i.target) for i in upward_imports(imports)}
        return
    edges = graph(imports)
    components = [frozenset(c) for c in strongly_connected(package_modules(), edges)]
    if known in components:
        chains = "\n".join(describe_cycle(chain, imports) for chain in cycles_in(sorted(known), edges))
        pytest.fail(f"still a cycle:\n{chains}")


# ------------------------------------------------------------- the checker itself can fail

def test_checker_finds_cycles_upward_and_lazy_imports():
    """A made-up package: a lazy import inside a function closing a cycle, an upward import, a
    relative import, ``from P import submodule`` and ``from P import NAME`` resolution."""
    sources = {
        "intrain": ("from intrain.numeric.qtensor import QTensor\n", "intrain/__init__.py", True),
        "intrain.numeric": ("", "intrain/numeric/__init__.py", True),
        "intrain.numeric.qtensor": ("X = 1\n", "intrain/numeric/qtensor.py", False),
        "intrain.numeric.rounding": (
            "from .qtensor import X\n"
            "def f():\n    from intrain.layers import base\n", "intrain/numeric/rounding.py", False),
        "intrain.layers": ("from intrain.layers.base import Y\n", "intrain/layers/__init__.py", True),
        "intrain.layers.base": ("from intrain.layers import Z\n", "intrain/layers/base.py", False),
        "intrain.run": ("", "intrain/run/__init__.py", True),
        "intrain.run.a": ("import intrain.run.b\n", "intrain/run/a.py", False),
        "intrain.run.b": ("def g():\n    from intrain.run import a\n", "intrain/run/b.py", False),
        "intrain.run.c": ("from intrain import QTensor\nfrom intrain.nothing import W\n",
                          "intrain/run/c.py", False),
    }
    found = collect_imports(sources)
    by_pair = {(i.source, i.target): i for i in found}
    assert by_pair[("intrain.numeric.rounding", "intrain.numeric.qtensor")].line == 1
    lazy = by_pair[("intrain.numeric.rounding", "intrain.layers.base")]
    assert (lazy.line, lazy.scope) == (3, "f")
    assert ("intrain.layers.base", "intrain.layers") in by_pair      # a name from the __init__
    assert ("intrain.run.b", "intrain.run.a") in by_pair              # ``from P import submodule``
    assert [i.written for i in found if not i.target] == ["intrain.nothing"]

    up = {(i.source, i.target) for i in upward_imports(found)}
    assert up == {("intrain.numeric.rounding", "intrain.layers.base"),  # level 0 -> 2, lazy
                  ("intrain.run.c", "intrain")}                         # reaching into the root
    edges = graph(found)
    comps = strongly_connected(sources, edges)
    assert comps == [["intrain.layers", "intrain.layers.base"], ["intrain.run.a", "intrain.run.b"]]
    assert cycles_in(comps[1], edges) == [["intrain.run.a", "intrain.run.b", "intrain.run.a"]]
    text = describe_cycle(cycles_in(comps[1], edges)[0], found)
    assert "intrain/run/b.py:2 (inside g)" in text and "intrain/run/a.py:1" in text
    assert level_of("intrain.newthing") is None and level_of("intrain") == 6
