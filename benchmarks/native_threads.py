"""The C kernels on one thread against all of PyTorch's threads, by size: where cutting a call into
ranges run on threads (``numeric.native._threads``, native.c's ``IN_RANGES``) starts to pay, the evidence for
``native.PARALLEL_MIN``. Both ways run in one process, taking turns, and must give the same bits.

    OMP_NUM_THREADS=2 python benchmarks/native_threads.py
    OMP_NUM_THREADS=2 python benchmarks/native_threads.py --sizes 4096,65536 --calls 200
"""

from __future__ import annotations

import argparse
import time

import torch

from intrain.numeric import native, rng
from native_flags import same_bits  # benchmarks/ is the script's folder, first on sys.path


def kernels(n: int, gen: torch.Generator) -> dict:
    """A call of each threaded kernel on ``n`` elements."""
    acc = torch.randint(-2**40, 2**40, (n,), generator=gen, dtype=torch.int64)
    grad = torch.randint(-2**20, 2**20, (n,), generator=gen, dtype=torch.int32)
    weight = torch.randint(-127, 128, (n,), generator=gen, dtype=torch.int8)
    planes = torch.randint(-127, 128, (max(1, n // 64), 8, 8), generator=gen, dtype=torch.int8)
    key = rng.derive_key(1, 2, 3, rng.STREAM_ROUNDING)
    o = 128  # an int16 product's halves as a VGG layer's chunk gives them: [rows, 2O + 1] int32, twice
    rows = max(1, n // o)
    high = torch.randint(-2**31, 2**31, (rows, 2 * o + 1), generator=gen, dtype=torch.int64).to(torch.int32)
    low = torch.randint(-2**31, 2**31, (rows, 2 * o + 1), generator=gen, dtype=torch.int64).to(torch.int32)
    row_terms = torch.randint(-2**40, 2**40, (rows, 1), generator=gen, dtype=torch.int64)
    col_terms = torch.randint(-2**40, 2**40, (1, o), generator=gen, dtype=torch.int64)
    combined = torch.empty((rows, o), dtype=torch.int64)

    def combine():
        native.combine_halves((high[:, :o], high[:, o:2 * o], low[:, :o], low[:, o:2 * o]), row_terms, col_terms,
                              combined)
        return combined  # into one buffer, as the convolutions write theirs

    return {
        "int16 product from halves": combine,
        "max |a|, int64": lambda: native.max_abs(acc),
        "nearest int64 -> int16": lambda: native.round_shift(acc, 26, "nearest", 32767, torch.int16),
        "stochastic int64 -> int16": lambda: native.round_shift(acc, 26, "stochastic", 32767, torch.int16, key),
        "NITI update int32 -> int8": lambda: native.update_pseudo(weight, grad, 14, 127),
        "2x2 max pool int8": lambda: native.max_pool(planes.view(-1, 1, 8, 8), 2, True),
    }


def timed(fn, calls: int) -> float:
    fn()
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls)
    return min(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4096,16384,65536,131072,262144,1048576,4194304",
                        help="comma-separated element counts")
    parser.add_argument("--calls", type=int, default=20, help="calls per timing (best of 5 timings)")
    args = parser.parse_args()
    if not native.available():
        parser.error("the C kernels did not build here (no C compiler?)")
    threads = torch.get_num_threads()
    print(f"{threads} PyTorch threads; PARALLEL_MIN = {native.PARALLEL_MIN}")
    print(f"{'kernel':28s} {'elements':>9s} {'one thread':>12s} {'split':>12s} {'ratio':>7s}")
    default = native.PARALLEL_MIN
    gen = torch.Generator().manual_seed(0)
    for n in (int(v) for v in args.sizes.split(",")):
        for name, fn in kernels(n, gen).items():
            results, times = {}, {"one": [], "split": []}
            for _ in range(2):  # taking turns, so drifting load hits both alike
                for way, minimum in (("one", 2**62), ("split", 1)):
                    native.PARALLEL_MIN = minimum
                    result = fn()
                    results[way] = result.clone() if isinstance(result, torch.Tensor) else result
                    times[way].append(timed(fn, args.calls * max(1, 65536 // n)))
            native.PARALLEL_MIN = default
            if not same_bits(results["one"], results["split"]):
                raise SystemExit(f"{name} at {n} elements: the split gave other bits")
            one, split = min(times["one"]), min(times["split"])
            print(f"{name:28s} {n:9d} {one * 1e6:10.1f}us {split * 1e6:10.1f}us {split / one:6.2f}x")
        print()


if __name__ == "__main__":
    main()
