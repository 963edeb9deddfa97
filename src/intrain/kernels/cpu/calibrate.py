"""Whether this CPU's int8 GEMM (``torch._int_mm``) pays, measured once per machine and cached.

The cpu backend can run an int8 x int8 product on the CPU's int8 dot-product units through
``torch._int_mm`` (AMX-INT8 tiles, AVX-512 VNNI or AVX-VNNI, whatever oneDNN finds) or exactly
through its float32 units (the float path). Both give the same integers, so the choice is one of
speed only and never changes a result bit. It is made from what this CPU does, not from its name:
``int8_gemm_speedup()`` times both GEMMs on a few product shapes of real training steps and
returns the int8 rate over the float32 rate (median over the shapes, each shape's best of a few
runs). The automatic rule takes the int8 path when that ratio is at least
``INT8_GEMM_MIN_SPEEDUP``.

Why 2 and not 1: the int8 path pays what the float path does not (int8 im2col columns of
every convolution, requantising int32 results in chunks), so a GEMM only a little faster loses
the step. Measured points: on the Intel Xeon with AMX-INT8 of BENCHMARKS.md this calibration gives
10.7x (1 thread) and the int8 path makes VGG-small-7's products 0.64x the float path's
(``python benchmarks/cpu_tuning.py --only use_int8_gemm``: off 1.56x); issue 15's AMD Zen 4 (AVX-512
VNNI, no AMX) measured ``torch._int_mm`` at 3.3-7.0x float32 and its VGG step at 0.53x against 1.03x
of float32 with the path on and off; a CPU without int8 dot products (AMD Zen 3) runs
``torch._int_mm`` at about 3 GOPS, far below its float32 rate. No CPU with a rate between 1 and 3
was available to measure; there the float path is kept, as it was before this rule. ``python
benchmarks/speed.py`` prints the rate beside the step times, with ``--int8-gemm on`` / ``off`` to
compare on any machine.

The measurement takes well under a second (more on CPUs without int8 units, where int_mm is
slow) and is cached in ``$INTRAIN_CACHE_DIR`` (default ``~/.cache/intrain``) under a key of the
CPU's model name, its feature flags, the PyTorch version, the thread count and any limit on the
instructions oneDNN or MKL may use (``ISA_LIMITS``), so that it runs once per machine and
setting; an unreadable or unwritable cache only means measuring again.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import time
from pathlib import Path

import torch

from intrain.numeric.native import cache_dir, cpu_identity

#: Take the int8 GEMM automatically from this measured int8 / float32 GEMM rate (see above).
INT8_GEMM_MIN_SPEEDUP = 2.0

#: (M, K, N) of products from real steps: VGG-small-7's im2col forward and weight gradient
#: (cut to a tenth of their rows), an MLP layer at batch 256, LeNet-5's second convolution.
_SHAPES = ((1024, 1152, 128), (4096, 576, 64), (256, 784, 512), (1600, 400, 16))
_REPEATS = 3


#: Environment variables with which oneDNN (``torch._int_mm``, float convolutions) and MKL (float
#: matmul) are told to use fewer of the CPU's instructions; a measurement under one holds only
#: for it, so they are part of the cache key. ``ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI`` on an AMX
#: machine is how BENCHMARKS.md measures the path a VNNI-only CPU takes.
ISA_LIMITS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def isa_limit_label() -> str:
    """The instruction-set limits set in the environment, as ``|NAME=value`` pieces ("" if none)."""
    return "".join(f"|{name}={os.environ[name]}" for name in ISA_LIMITS if os.environ.get(name))


def _cache_path() -> Path:
    return cache_dir() / "cpu-calibration.json"


def _best_seconds(fn) -> float:
    fn()  # warm-up: oneDNN builds its kernel on the first call
    best = float("inf")
    for _ in range(_REPEATS):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return max(best, 1e-9)


def measure_int8_gemm_speedup() -> float:
    """int8 ``torch._int_mm`` rate over float32 matmul rate on this CPU, now (no cache)."""
    generator = torch.Generator().manual_seed(0)
    ratios = []
    for m, k, n in _SHAPES:
        a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=generator)
        b = torch.randint(-127, 128, (k, n), dtype=torch.int8, generator=generator)
        af, bf = a.float(), b.float()
        int8 = _best_seconds(lambda: torch._int_mm(a, b))
        float32 = _best_seconds(lambda: torch.mm(af, bf))
        ratios.append(float32 / int8)
    return statistics.median(ratios)


@functools.cache
def int8_gemm_speedup() -> float:
    """The measured int8 / float32 GEMM rate of this machine (cached on disk and per process)."""
    key = f"{cpu_identity()}|torch {torch.__version__}|threads {torch.get_num_threads()}{isa_limit_label()}"
    path = _cache_path()
    try:
        cache = json.loads(path.read_text())
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    value = cache.get(key)
    if isinstance(value, (int, float)) and value > 0:
        return float(value)
    speedup = measure_int8_gemm_speedup()
    cache[key] = speedup
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(cache, indent=1, sort_keys=True))
        os.replace(temporary, path)
    except OSError:
        pass  # no cache: measure again next time
    return speedup


def int8_gemm_pays() -> bool:
    """Whether the automatic rule takes the int8 GEMM on this machine."""
    return int8_gemm_speedup() >= INT8_GEMM_MIN_SPEEDUP
