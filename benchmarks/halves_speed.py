"""DFP16's operand preparation on the cpu backend's int8-halves path, the C passes against the
PyTorch ones, in one process: the im2col columns of both int8 halves of an int16 activation
(``int16_gemm.HalvesColumns``: shift, split, channels-last padding, columns) and the rows of a
weight gradient's error halves (``int16_gemm._error_halves``), for the shapes of VGG-small-7's
convolutions at a chunk of samples. Sides take turns, best of ``--rounds``, and must give the same
bits; only the ratios are meant to be compared.

    OMP_NUM_THREADS=1 python benchmarks/halves_speed.py
    OMP_NUM_THREADS=2 python benchmarks/halves_speed.py --samples 8 --shift 0
"""

from __future__ import annotations

import argparse
import time
from unittest import mock

import torch

from intrain.kernels import int16_gemm
from intrain.numeric import native

#: (channels, side) of VGG-small-7's convolution inputs at 32 x 32 pixels (the first has 3).
VGG_SMALL_7 = ((3, 32), (128, 32), (128, 16), (256, 16), (256, 8), (512, 8))


def best_of(fn, rounds: int) -> tuple[float, tuple[torch.Tensor, ...]]:
    """Best time of ``fn()`` over ``rounds`` calls, and a copy of what the first call gave (the
    sides write into buffers they reuse)."""
    result, best = tuple(t.clone() for t in fn()), float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=8, help="samples per chunk (default: 8)")
    parser.add_argument("--shift", type=int, default=3, help="headroom shift of the operand (default: 3)")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    if not native.available():
        raise SystemExit("halves_speed.py: numeric/native.c is not built here (no C compiler?): nothing to compare")
    print(f"{torch.get_num_threads()} thread(s), {args.samples} samples, shift {args.shift}")
    print(f"{'C x H x W':>14} | {'columns: C':>10} {'PyTorch':>8} {'ratio':>6} | {'errors: C':>9} {'PyTorch':>8} "
          f"{'ratio':>6}")
    gen = torch.Generator().manual_seed(0)
    for channels, side in VGG_SMALL_7:
        x = torch.randint(-32768, 32768, (args.samples, channels, side, side), generator=gen,
                          dtype=torch.int32).to(torch.int16)
        columns = int16_gemm.HalvesColumns(x, (3, 3), (1, 1), (1, 1), args.samples, args.shift)
        rows = torch.empty((2 * channels + 1) * args.samples * side * side, dtype=torch.int8)
        sides = {"columns": lambda: columns.of(0),
                 "errors": lambda: int16_gemm._error_halves(x, args.shift, rows)}
        cells = []
        for name, fn in sides.items():
            c_time, c_result = best_of(fn, args.rounds)
            with mock.patch.object(native, "library", lambda: None):
                torch_time, torch_result = best_of(fn, args.rounds)
            if not all(torch.equal(a, b) for a, b in zip(c_result, torch_result)):
                raise SystemExit(f"halves_speed.py: the C and PyTorch {name} differ at {channels} x {side} x {side}")
            cells.append(f"{c_time * 1e3:8.2f}ms {torch_time * 1e3:6.2f}ms {c_time / torch_time:5.2f}x")
        print(f"{channels:>5} x {side:>2} x {side:>2} | {cells[0]} | {cells[1]}")


if __name__ == "__main__":
    main()
