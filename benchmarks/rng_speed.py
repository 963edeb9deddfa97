"""Counter-based random numbers and stochastic rounding: time against a baseline in one process.

Rows (each the best of ``--repeats`` runs, process CPU time with one thread):
- ``uniform_bits`` at a width of at most 31 bits (every rounding shift of an int32 sum) against
  drawing the whole 63-bit word it takes its top bits from (what it did before it skipped the
  low word: the same numbers, checked here);
- ``uint32`` hashed in chunks of 2**12 .. 2**20 elements against the whole tensor at once
  (``rng.CPU_CHUNK_ELEMENTS`` is the chosen chunk);
- ``shift_round`` of an int32 tensor the size of LeNet-5's first error at batch 128
  (128 x 6 x 28 x 28) with stochastic rounding, against nearest rounding of the same tensor.

    OMP_NUM_THREADS=1 python benchmarks/rng_speed.py [--repeats 20] [--elements 602112]
"""

from __future__ import annotations

import argparse
import time

import torch

from intrain.numeric import rng
from intrain.numeric.rounding import shift_round
from speed import _cpu_name


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time() if torch.get_num_threads() == 1 else time.perf_counter()
        fn()
        stop = time.process_time() if torch.get_num_threads() == 1 else time.perf_counter()
        best = min(best, stop - start)
    return best


def _whole_word(key, n: int, bits: int) -> torch.Tensor:
    high = rng.uint32(key, (n,)) >> 1
    low = rng.uint32((key[0] ^ 0x5BD1E995, key[1]), (n,))
    return ((high << 32) | low) >> (63 - bits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--elements", type=int, default=128 * 6 * 28 * 28)
    args = parser.parse_args()
    n, key, bits = args.elements, rng.derive_key(1, 2, 3), 20
    if not torch.equal(rng.uniform_bits(key, (n,), bits), _whole_word(key, n, bits)):
        raise SystemExit("uniform_bits differs from the whole-word numbers")
    print(f"CPU: {_cpu_name()}, {torch.get_num_threads()} thread(s), {n} elements")
    short = _best(lambda: rng.uniform_bits(key, (n,), bits), args.repeats)
    whole = _best(lambda: _whole_word(key, n, bits), args.repeats)
    print(f"uniform_bits ({bits} bits)      {short * 1e3:8.2f} ms   whole 63-bit word {whole * 1e3:8.2f} ms"
          f"   ratio {short / whole:.2f}x")
    whole_tensor = _best(lambda: rng.uint32(key, (n,), chunk_elements=n), args.repeats)
    for log2 in (12, 14, 15, 16, 18, 20):
        chunk = 2**log2
        if not torch.equal(rng.uint32(key, (n,), chunk_elements=chunk), rng.uint32(key, (n,), chunk_elements=n)):
            raise SystemExit(f"uint32 in chunks of {chunk} differs")
        chunked = _best(lambda: rng.uint32(key, (n,), chunk_elements=chunk), args.repeats)
        chosen = " (chosen)" if chunk == rng.CPU_CHUNK_ELEMENTS else ""
        print(f"uint32 in chunks of 2**{log2:<2}      {chunked * 1e3:8.2f} ms   whole tensor      {whole_tensor * 1e3:8.2f} ms"
              f"   ratio {chunked / whole_tensor:.2f}x{chosen}")
    a = (rng.uint32(rng.derive_key(4), (n,)) - 2**31).to(torch.int32) >> 6
    stochastic = _best(lambda: shift_round(a, 12, "stochastic", key), args.repeats)
    nearest = _best(lambda: shift_round(a, 12, "nearest"), args.repeats)
    print(f"shift_round stochastic        {stochastic * 1e3:8.2f} ms   nearest           {nearest * 1e3:8.2f} ms"
          f"   ratio {stochastic / nearest:.2f}x")


if __name__ == "__main__":
    main()
