"""The package's source files and their module names, for the static tests (test_layering.py,
test_float_free.py). They parse the files under ``src/intrain`` with :mod:`ast` and never import
them, so they see every line, including branches that no test executes."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "intrain"
SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE_DIR = SRC / PACKAGE


def module_name(path: Path) -> str:
    """``src/intrain/kernels/cpu.py`` -> ``intrain.kernels.cpu``; a package is its ``__init__.py``."""
    parts = path.relative_to(SRC).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> file, sorted by name."""
    found = {module_name(p): p for p in PACKAGE_DIR.rglob("*.py") if "__pycache__" not in p.parts}
    return dict(sorted(found.items()))


def relative_path(path: Path) -> str:
    """The path as the failure messages show it: ``src/intrain/run/loop.py``."""
    return path.relative_to(SRC.parent).as_posix()


class ScopedVisitor(ast.NodeVisitor):
    """A visitor that knows the qualified name of the enclosing class / function
    (``"IntDropout.__init__"``; ``"<module>"`` at module level)."""

    def __init__(self) -> None:
        self._scope: list[str] = []

    @property
    def scope(self) -> str:
        return ".".join(self._scope) or "<module>"

    def _visit_scoped(self, node) -> None:
        self._scope.append(node.name)
        try:
            self.visit_scope_body(node)
        finally:
            self._scope.pop()

    def visit_scope_body(self, node) -> None:
        self.generic_visit(node)

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _visit_scoped
