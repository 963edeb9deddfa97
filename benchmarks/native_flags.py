"""The C kernels (``intrain.numeric.native``) built with and without ``-mprefer-vector-width=512``,
timed in one process on tensors of real training steps, and checked to give the same bits.

gcc and clang keep to 256-bit vectors on AVX-512 CPUs unless told otherwise; ``native.py`` builds
with the wider preference (``WIDE_VECTORS``) and this script is what justifies it. Each kernel's
time is its best of ``--rounds`` rounds of ``--calls`` calls, the two builds taking turns. Only
the ratios are meant to be compared; name the CPU with them.

    python benchmarks/native_flags.py
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from unittest import mock

import torch

from intrain.numeric import native


def _cases():
    """(name, call) pairs on the sizes of an MLP 784-100-50-10 step at batch 64 and LeNet-5's
    first pooling at batch 256."""
    generator = torch.Generator().manual_seed(0)
    grad = torch.randint(-2**20, 2**20, (100, 784), dtype=torch.int32, generator=generator)
    weight = torch.randint(-127, 128, (100, 784), dtype=torch.int8, generator=generator)
    output = torch.randint(-2**20, 2**20, (256, 100), dtype=torch.int32, generator=generator)
    pooled = torch.randint(0, 128, (256, 6, 24, 24), dtype=torch.int64, generator=generator).to(torch.int8)
    return [
        ("max |g| (int32 [100, 784])", lambda: native.max_abs(grad)),
        ("NITI update (int32 grad, int8 weight)", lambda: native.update_pseudo(weight, grad, 10, 127)),
        ("nearest rounding int32 -> int8 [256, 100]", lambda: native.round_shift(output, 10, "nearest", 127, torch.int8)),
        ("stochastic rounding int32 -> int8 [256, 100]",
         lambda: native.round_shift(output, 10, "stochastic", 127, torch.int8, (1, 2))),
        ("2x2 max pool with arg-max [256, 6, 24, 24]", lambda: native.max_pool(pooled, 2, True)),
    ]


def same_bits(a, b) -> bool:
    """Whether two kernel results (tensors, tuples of them, or numbers) are the same bits."""
    if isinstance(a, tuple):
        return all(same_bits(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    builds = {}
    for name, flags in (("256-bit (compiler default)", (*native.BASE_FLAGS, native.OPENMP)),
                        ("wide (-mprefer-vector-width=512)", native.FLAG_SETS[0])):
        path = native.build(compiler, flags) if compiler else None
        lib = native.load(path) if path is not None else None
        if lib is None:
            parser.exit(2, f"native_flags.py: the kernels did not build with {' '.join(flags)}\n")
        builds[name] = lib
    print(f"{torch.get_num_threads()} threads, compiler {compiler}")
    for label, call in _cases():
        times = {name: float("inf") for name in builds}
        results = {}
        for _ in range(args.rounds):
            for name, lib in builds.items():
                with mock.patch.object(native, "library", lambda lib=lib: lib):
                    results[name] = call()
                    start = time.perf_counter()
                    for _ in range(args.calls):
                        call()
                    times[name] = min(times[name], (time.perf_counter() - start) / args.calls)
        first, second = results.values()
        if not same_bits(first, second):
            raise SystemExit(f"native_flags.py: the two builds differ on {label}")
        base, wide = times.values()
        print(f"  {label:46s} 256-bit {base * 1e6:8.1f} us   wide {wide * 1e6:8.1f} us   wide/256-bit {wide / base:5.2f}x")


if __name__ == "__main__":
    main()
