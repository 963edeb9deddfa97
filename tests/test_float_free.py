"""The static integer-only audit: no float arithmetic in the source of an integer training step.

tests/test_integer_only.py runs a training step under a dispatch mode that fails on any float
*tensor*; it cannot see Python floats, numpy or ``math`` (a softmax done in numpy, or a shift
computed as ``math.log2(float(x))``, passes it), nor branches the step it runs does not take.
This test reads the modules of an integer training step with the reference backend
(``STEP_MODULES``) with :mod:`ast`, every line of them, and flags:

* imports of numpy, math, cmath, fractions, decimal, statistics, random, and any use of them
  (``np.exp``, ``math.log2``);
* float and complex literals (``1.0``, ``1e-3``, ``2j``), ``float(...)`` / ``complex(...)`` and the
  ``float`` type used as a value (``dtype=float``); ``isinstance(x, float)`` checks and annotations
  are not arithmetic and are not flagged;
* true division ``/`` and ``/=`` (int / int is a float in Python; integer code uses ``//``, ``>>``
  or ``torch.div(..., rounding_mode="floor")``), ``torch.div`` / ``.div`` without a rounding mode,
  ``true_divide``, and negative powers (``2 ** -k`` is a float);
* torch float dtypes named in code (``torch.float32``, ``torch.float``, ``torch.double``, ...),
  conversions ``.float()`` / ``.double()`` / ``.half()`` / ``.bfloat16()``;
* torch functions whose result is a float (``torch.exp``, ``softmax``, ``mean``, ``torch.rand``,
  ``torch.nn.init``, ...) and factories that make a default-dtype (float32) tensor when given
  no ``dtype`` (``torch.zeros``, ``ones``, ``empty``, ``eye``).

Docstrings and comments are not code (ast does not see comments; a docstring is a string
constant) and are never flagged. A legitimate use is allowed only by an entry of ``ALLOWED`` that
names its module, its function or line, and the reason; an entry that matches nothing fails
the test, so the list cannot grow stale. Known violations of today's code, to be fixed, are in
``KNOWN_VIOLATIONS`` with an xfail(strict=True) each.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

import pytest

from source_tree import PACKAGE_DIR, ScopedVisitor, module_name, relative_path

# The modules of an integer training step (NITI int8 with the reference backend), as paths under
# src/intrain; a path ending in "/" means every module below it. New integer methods add theirs.
STEP_MODULES = (
    "numeric/",               # QTensor, rounding, generator, requantisation
    "kernels/__init__.py",    # get_backend: how a model finds its backend
    "kernels/reference.py",   # the reference products
    "kernels/im2col.py",      # reference convolutions: im2col/col2im, checks, conv_*_by
    "kernels/ternary.py",     # ternary x int8 products of the 8-2 inference (layers/ternary.py)
    "layers/",                # integer layers and integer initialisation (layers/init.py)
    "models/",                # building the integer model (before the step, integer too)
    "methods/__init__.py",
    "methods/niti.py",        # the NITI training step
    "methods/update.py",      # integer weight update and mu schedule
    "methods/loss.py",        # integer cross-entropy gradient
    "methods/averaging.py",   # integer weight averaging
    "run/dist.py",            # a data-parallel step's all-reduces (exact integer sums and maxima)
    "methods/dfp16.py",       # the DFP16 training step (its fp32-master mode, methods/float_master.py,
                              # is float by design and not part of the integer-only mode)
    "methods/sgd_fixed.py",   # DFP16's integer-only SGD: int32 masters, fixed-point factors
    "methods/adamw_fixed.py", # NITI's --update adamw: int32 masters and moments, int64 second moments
    "methods/twin_updates.py",  # the two above by name, for NITI's --update and DFP16's --optimizer
)

# Legitimate float uses in STEP_MODULES: (module, where, reason). ``where`` is "def Qual.name"
# for everything inside that function or class, or else a piece of the flagged line's source.
# Every entry must match at least one finding (test_allow_list_entries_are_all_used).
ALLOWED: tuple[tuple[str, str, str], ...] = (
    ("intrain.numeric.qtensor", "def QTensor.to_float",
     "the real value for people and the float baseline; called only by run/loop.py (_as_float, "
     "for logging and evaluation outside the step), never inside a training step"),
    ("intrain.layers.dropout", "p: float = 0.5",
     "default of the dropout probability, a float hyper-parameter that IntDropout.__init__ turns "
     "once, at build time, into the integer threshold round(p * 2**32) (exact in binary64: a "
     "power-of-two scale); the step only compares integers with it"),
    ("intrain.models.zoo", "width: float = 1.0",
     "default of the channel-width multiplier, an architecture hyper-parameter (_scaled turns it "
     "into integer channel counts before any weight exists), not a number the network computes "
     "with"),
    ("intrain.models.build", "width: float = 1.0", "the same default, passed on to the zoo"),
    ("intrain.layers.recurrent", "round(forget_bias * 2**-GATE_EXPONENT)",
     "the forget-gate bias, a hyper-parameter given as a decimal, turned once at build time into the "
     "integer Q11 offset round(b * 2**11) (exact in binary64 for |b| <= 8: a power-of-two scale); "
     "the step adds only that integer"),
    ("intrain.models.zoo", "VGG_DROPOUT = 0.5",
     "VGG-small's dropout probability, a hyper-parameter converted to an integer threshold by "
     "IntDropout (see its entry)"),
    ("intrain.models.zoo", "ALEXNET_DROPOUT = 0.5", "AlexNet's dropout probability, likewise"),
    ("intrain.layers.recurrent", "def FloatLSTM",
     "the float32 twin of IntLSTM, kept beside it; only the float method builds it (models.build's "
     "_float_layers), an integer step never constructs or calls it"),
    ("intrain.layers.tensor_ring", "def FloatTensorRing",
     "the float32 twin of IntTensorRing (its initialisation draws floats), likewise built only by "
     "the float method"),
    ("intrain.numeric.native", "torch.float32: \"f32\"",
     "the table of tensor types the C kernels take: the cpu backend's float path hands them the "
     "exact integers it holds in floats (kernels.cpu.exact_to_narrow); an integer step never passes "
     "a float tensor (tests/test_native.py: test_an_integer_step_gives_the_kernels_integer_tensors_only)"),
)

# KNOWN VIOLATIONS: real floats in the training step, to be fixed; same format as ALLOWED. Each
# is excluded from test_step_modules_are_float_free and is an xfail(strict=True) in
# test_known_violation_is_gone, which XPASSes (and so fails) once the float is gone, until the
# entry is deleted. None today.
KNOWN_VIOLATIONS: tuple[tuple[str, str, str], ...] = ()


# ------------------------------------------------------------------------------------ the checker

BANNED_MODULES = {"numpy", "math", "cmath", "fractions", "decimal", "statistics", "random"}
FLOAT_DTYPES = {"float", "double", "half", "float16", "float32", "float64", "bfloat16", "cfloat",
                "cdouble", "chalf", "complex32", "complex64", "complex128", "float8_e4m3fn",
                "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu"}
FLOAT_CONVERSIONS = {"float", "double", "half", "bfloat16", "cfloat", "cdouble", "chalf"}
# torch functions (torch.X, torch.nn.functional.X, torch.special.X) that return floats
FLOAT_FUNCTIONS = {"exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "sqrt", "rsqrt",
                   "sigmoid", "tanh", "softmax", "log_softmax", "mean", "nanmean", "std", "var",
                   "rand", "randn", "rand_like", "randn_like", "normal", "linspace", "logspace",
                   "reciprocal", "erf", "erfinv", "sin", "cos", "true_divide"}
# the same as tensor methods (x.exp(), in-place variants, the float random fills)
FLOAT_METHODS = {"exp", "exp_", "log", "log_", "log2", "log2_", "sqrt", "sqrt_", "rsqrt",
                 "sigmoid", "sigmoid_", "tanh", "tanh_", "softmax", "log_softmax", "mean",
                 "nanmean", "std", "var", "reciprocal", "reciprocal_", "true_divide",
                 "true_divide_", "uniform_", "normal_", "exponential_", "cauchy_", "log_normal_"}
TRUE_DIVIDES = {"div", "div_", "divide", "divide_"}  # float unless rounding_mode is given
DEFAULT_DTYPE_FACTORIES = {"zeros", "ones", "empty", "eye", "empty_strided"}  # float32 without dtype=
DEFAULT_ALIASES = {"np": "numpy", "math": "math", "torch": "torch", "F": "torch.nn.functional"}


@dataclass(frozen=True)
class Finding:
    module: str
    path: str
    line: int
    scope: str   # enclosing function / class, "<module>" at top level
    what: str
    source: str  # the flagged line, stripped

    def __str__(self) -> str:
        return f"{self.path}:{self.line} ({self.scope}): {self.what}: {self.source}"


def _keywords(call: ast.Call) -> set[str | None]:
    return {k.arg for k in call.keywords}  # None for **kwargs


class _FloatFinder(ScopedVisitor):
    def __init__(self, module: str, path: str, lines: list[str]) -> None:
        super().__init__()
        self.module, self.path, self.lines = module, path, lines
        self.aliases = dict(DEFAULT_ALIASES)
        self.findings: list[Finding] = []
        self._type_checks: set[int] = set()   # id() of nodes that are isinstance's class argument
        self._calls_seen: set[int] = set()    # id() of ``float`` names already reported as calls

    def flag(self, node: ast.AST, what: str) -> None:
        line = self.lines[node.lineno - 1].strip() if node.lineno <= len(self.lines) else ""
        self.findings.append(Finding(self.module, self.path, node.lineno, self.scope, what, line))

    def dotted(self, node: ast.AST) -> str | None:
        """``F.softmax`` -> ``torch.nn.functional.softmax`` (import aliases resolved)."""
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if not isinstance(node, ast.Name):
            return None
        root = self.aliases.get(node.id)
        return ".".join([root] + parts[::-1]) if root else None

    # -- imports
    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name.split(".")[0] in BANNED_MODULES:
                self.flag(node, f"import {alias.name}")
            if alias.asname:
                self.aliases[alias.asname] = alias.name
            else:
                top = alias.name.split(".")[0]
                self.aliases[top] = top

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        mod = node.module or ""
        if not node.level and mod.split(".")[0] in BANNED_MODULES:
            self.flag(node, f"from {mod} import ...")
        for alias in node.names:
            full = f"{mod}.{alias.name}"
            if not node.level and self._float_name(full):
                self.flag(node, f"import of {full}")
            self.aliases[alias.asname or alias.name] = full if not node.level else None

    def _float_name(self, full: str) -> bool:
        head, _, name = full.rpartition(".")
        return ((head == "torch" and name in FLOAT_DTYPES)
                or (head in ("torch", "torch.nn.functional", "torch.special") and name in FLOAT_FUNCTIONS)
                or full.startswith(("torch.nn.init", "torch.special")))

    # -- annotations are not arithmetic
    def visit_scope_body(self, node) -> None:
        if isinstance(node, ast.ClassDef):
            return self.generic_visit(node)
        for d in node.decorator_list:
            self.visit(d)
        self.visit(node.args)
        for stmt in node.body:
            self.visit(stmt)

    def visit_arg(self, node: ast.arg) -> None:
        pass  # only the annotation is below an arg

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self.visit(node.target)
        if node.value is not None:
            self.visit(node.value)

    # -- literals, float(), the float type
    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, (float, complex)):
            self.flag(node, f"float literal {node.value!r}")

    def visit_Name(self, node: ast.Name) -> None:
        if (node.id in ("float", "complex") and isinstance(node.ctx, ast.Load)
                and id(node) not in self._type_checks and id(node) not in self._calls_seen):
            self.flag(node, f"the {node.id} type used as a value")

    # -- division and negative powers
    def visit_BinOp(self, node: ast.BinOp) -> None:
        if isinstance(node.op, ast.Div):
            self.flag(node, "true division /")
        if isinstance(node.op, ast.Pow) and isinstance(node.right, ast.UnaryOp) \
                and isinstance(node.right.op, ast.USub):
            self.flag(node, "negative power (a float)")
        self.generic_visit(node)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        if isinstance(node.op, ast.Div):
            self.flag(node, "true division /=")
        self.generic_visit(node)

    # -- attributes: np.x, math.x, torch.float32, torch.nn.init
    def visit_Attribute(self, node: ast.Attribute) -> None:
        if isinstance(node.value, ast.Name):
            name = self.dotted(node)
            if name and name.split(".")[0] in BANNED_MODULES:
                self.flag(node, f"use of {name}")
        name = self.dotted(node)
        if name and name.startswith("torch.") and name.count(".") == 1 \
                and name.split(".")[1] in FLOAT_DTYPES:
            self.flag(node, f"float dtype {name}")
        if name in ("torch.nn.init", "torch.special"):
            self.flag(node, f"use of {name}")
        self.generic_visit(node)

    # -- calls
    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Name):
            if func.id in ("float", "complex"):
                self.flag(node, f"{func.id}(...) call")
                self._calls_seen.add(id(func))
            if func.id in ("isinstance", "issubclass") and len(node.args) == 2:
                cls = node.args[1]
                for n in [cls, *(cls.elts if isinstance(cls, ast.Tuple) else [])]:
                    self._type_checks.add(id(n))
        name = self.dotted(func)
        if name and name.startswith("torch."):
            head, _, fn = name.rpartition(".")
            if head in ("torch", "torch.nn.functional", "torch.special") and fn in FLOAT_FUNCTIONS:
                self.flag(node, f"{name}(...) returns a float tensor")
            elif head == "torch" and fn in TRUE_DIVIDES and "rounding_mode" not in _keywords(node):
                self.flag(node, f"{name}(...) without rounding_mode: true division")
            elif head == "torch" and fn in DEFAULT_DTYPE_FACTORIES and not (_keywords(node) & {"dtype", None}):
                self.flag(node, f"{name}(...) without dtype: a float32 tensor")
        elif isinstance(func, ast.Attribute) and name is None:  # a method call: x.float(), x.div(y)
            attr = func.attr
            if attr in FLOAT_CONVERSIONS and not node.args:
                self.flag(node, f".{attr}() conversion")
            elif attr in FLOAT_METHODS:
                self.flag(node, f".{attr}() returns a float tensor")
            elif attr in TRUE_DIVIDES and "rounding_mode" not in _keywords(node):
                self.flag(node, f".{attr}(...) without rounding_mode: true division")
        self.generic_visit(node)


def find_floats(source: str, module: str = "<snippet>", path: str = "<snippet>") -> list[Finding]:
    """Every float use in ``source`` (see the module docstring for the rules)."""
    finder = _FloatFinder(module, path, source.splitlines())
    finder.visit(ast.parse(source, filename=path))
    return sorted(finder.findings, key=lambda f: (f.path, f.line, f.what))


def step_files() -> list:
    files = []
    for entry in STEP_MODULES:
        target = PACKAGE_DIR / entry.rstrip("/")
        if entry.endswith("/"):
            files += sorted(p for p in target.rglob("*.py") if "__pycache__" not in p.parts)
        elif target.is_file():
            files.append(target)
    return files


def step_findings() -> list[Finding]:
    found = []
    for path in step_files():
        found += find_floats(path.read_text(encoding="utf-8"), module_name(path), relative_path(path))
    return found


def matches(entry: tuple[str, str, str], f: Finding) -> bool:
    module, where, _ = entry
    if f.module != module:
        return False
    if where.startswith("def "):
        qual = where[4:]
        return f.scope == qual or f.scope.startswith(qual + ".")
    return where in f.source


# ------------------------------------------------------------------------------------- the tests

@pytest.fixture(scope="module")
def findings() -> list[Finding]:
    return step_findings()


def test_step_modules_exist():
    """Every STEP_MODULES entry names a file or a folder of modules: a module that moves or is
    renamed must move in this list too, not drop out of the audit."""
    missing = [e for e in STEP_MODULES if not (PACKAGE_DIR / e.rstrip("/")).is_file() and not
               (e.endswith("/") and any((PACKAGE_DIR / e).rglob("*.py")))]
    assert not missing, f"STEP_MODULES entries with no module under src/intrain: {missing}"


def test_step_modules_are_float_free(findings):
    """No float arithmetic in the modules of an integer training step, except the ALLOWED
    entries (legitimate, with reasons) and the KNOWN_VIOLATIONS (xfailed below, to be fixed)."""
    bad = [f for f in findings if not any(matches(e, f) for e in ALLOWED + KNOWN_VIOLATIONS)]
    assert not bad, ("float arithmetic in a training-step module (make it integer, or add an "
                     "ALLOWED entry with the reason it is legitimate):\n"
                     + "\n".join(f"  {f}" for f in bad))


def test_allow_list_entries_are_all_used(findings):
    """Every ALLOWED entry still matches a finding, and every entry gives a reason: an exception
    whose code is gone must leave the list."""
    stale = [e for e in ALLOWED if not any(matches(e, f) for f in findings)]
    assert not stale, "ALLOWED entries that match nothing (delete them):\n" + "\n".join(map(str, stale))
    assert all(module and where and reason for module, where, reason in ALLOWED + KNOWN_VIOLATIONS)


@pytest.mark.parametrize("entry", [
    pytest.param(e, id=f"{e[0]}: {e[1]}", marks=pytest.mark.xfail(strict=True, reason=e[2]))
    for e in KNOWN_VIOLATIONS
] or [pytest.param(None, id="none known")])
def test_known_violation_is_gone(findings, entry):
    """XFAILs while the known float is in the code; XPASSes (a strict failure) once it is fixed,
    until its KNOWN_VIOLATIONS entry is deleted. (With no known violation: one trivial pass.)"""
    if entry is None:
        return
    still = [str(f) for f in findings if matches(entry, f)]
    assert not still, "\n".join(still)


# ------------------------------------------------------------- the checker itself can fail

FLOAT_SNIPPETS = {
    "numpy softmax": (
        "import numpy as np\n"
        "def softmax(z):\n"
        "    e = np.exp(z - z.max())\n"
        "    return e / e.sum()\n",
        ["import numpy", "use of numpy.exp", "true division /"]),
    "math.log2 shift": (
        "import math\n"
        "def shift(m):\n"
        "    return int(math.log2(float(m.item()))) + 1\n",
        ["import math", "use of math.log2", "float(...) call"]),
    "true division": ("def mean(a, b):\n    return a / b\n", ["true division /"]),
    "in-place true division": ("def halve(a):\n    a /= 2\n    return a\n", ["true division /="]),
    "torch.float32": (
        "import torch\n"
        "def scale(x):\n"
        "    return x.to(torch.float32) * 0.5\n",
        ["float dtype torch.float32", "float literal 0.5"]),
    "float literals": ("X = 1e-3\nY = 2j\n", ["float literal 0.001", "float literal 2j"]),
    "conversions": ("def f(x):\n    return x.float() + x.double() + x.half()\n",
                    [".float() conversion", ".double() conversion", ".half() conversion"]),
    "from imports": ("from math import log2\nfrom torch import float64 as f64\n",
                     ["from math import ...", "import of torch.float64"]),
    "torch true division": ("import torch\ndef f(a, b):\n    return torch.div(a, b) + a.div_(b)\n",
                            ["torch.div(...) without rounding_mode: true division",
                             ".div_(...) without rounding_mode: true division"]),
    "float torch functions": (
        "import torch\nimport torch.nn.functional as F\n"
        "def f(x):\n    return F.softmax(x, 1) + torch.rand(3) + x.mean()\n",
        ["torch.nn.functional.softmax(...) returns a float tensor",
         "torch.rand(...) returns a float tensor", ".mean() returns a float tensor"]),
    "default dtype": ("import torch\nW = torch.zeros(3, 4)\n",
                      ["torch.zeros(...) without dtype: a float32 tensor"]),
    "float type as dtype": ("import torch\nW = torch.tensor([1], dtype=float)\n",
                            ["the float type used as a value"]),
    "negative power": ("def f(k):\n    return 2 ** -k\n", ["negative power (a float)"]),
    "kaiming init": ("import torch\ndef f(w):\n    torch.nn.init.kaiming_uniform_(w)\n",
                     ["use of torch.nn.init"]),
}


@pytest.mark.parametrize("name", FLOAT_SNIPPETS)
def test_checker_flags_float_code(name):
    source, expected = FLOAT_SNIPPETS[name]
    assert sorted(f.what for f in find_floats(source)) == sorted(expected)


def test_checker_passes_integer_code():
    """Integer code of the kind the step is made of: nothing flagged (docstrings with "/" and
    "float" in them, ``//``, shifts, integer dtypes, ``torch.div`` with a rounding mode,
    ``isinstance(x, float)``, float annotations, ``is_floating_point()`` checks)."""
    source = '''
"""Integer softmax: p = e / sum(e), computed without float32."""
import torch
from intrain.numeric.qtensor import QTensor

LIMIT = 2**31 - 1


def f(x: torch.Tensor, p: float, e: int = 3) -> float:
    """x / 2**e rounded to nearest, as int64: no float."""
    if isinstance(p, float) or x.is_floating_point():
        raise TypeError("integers only")  # not 1.0 / x
    y = torch.div(x.to(torch.int64) << 4, 7, rounding_mode="floor") + (x >> e) // 3
    z = torch.zeros(3, dtype=torch.int32) + torch.full((), -e, dtype=torch.int64)
    w = y.div(2, rounding_mode="trunc").clamp(-127, 127).to(torch.int8)
    return QTensor(w, torch.tensor(e)), 2**e, x.amax(dim=1), z
'''
    assert find_floats(source) == []


def test_allow_list_matching():
    """``def Name`` entries cover a function and what it contains; other entries a line."""
    [f] = find_floats("class Q:\n    def to_float(self):\n        return self.v * 0.5\n", "m")
    assert matches(("m", "def Q.to_float", "r"), f) and matches(("m", "def Q", "r"), f)
    assert matches(("m", "self.v * 0.5", "r"), f)
    assert not matches(("m", "def Q.to", "r"), f) and not matches(("other", "def Q", "r"), f)
