"""Training methods, chosen by name (``--arith``) from ``METHODS``.

- ``int8``: NITI's integer-only training (``methods.niti``), with the integer loss gradient
  (``methods.loss``), the integer update (``methods.update``) and weight averaging
  (``methods.averaging``);
- ``dfp16``: DFP16, 16-bit dynamic fixed point with the float recipe (``methods.dfp16``: its
  int32-master update ``methods.sgd_fixed``, its float32-master one ``methods.float_master``);
- ``float``: the float32 twin every integer result is compared with (``methods.float_twin``).

``methods.base`` says what a method is; adding one means a module and an entry here.
"""

from __future__ import annotations

from intrain.methods.base import Method, MethodOptionError
from intrain.methods.dfp16 import Dfp16
from intrain.methods.float_twin import FloatTwin
from intrain.methods.niti import Niti

METHODS: dict[str, type[Method]] = {method.name: method for method in (Niti, Dfp16, FloatTwin)}


def get_method(name: str) -> type[Method]:
    """The method called ``name``; ``MethodOptionError`` naming the choices otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise MethodOptionError(f"unknown arithmetic {name!r}: choose one of {', '.join(METHODS)}") from None


__all__ = ["METHODS", "Method", "MethodOptionError", "get_method"]
