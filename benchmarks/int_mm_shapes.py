"""Which int8 product shapes ``torch._int_mm`` refuses or gets wrong on this device, in the layout
the padded path hands it (a row-major first operand, a column-major second: cuBLASLt's "TN"), and
whether ``int_mm.mm_int32`` (which pads to ``COLUMN_MULTIPLE``) computes every one of them exactly.

    python benchmarks/int_mm_shapes.py [--device cuda]

For each number of rows M and reduction length K it prints the column counts N (multiples of 8 up
to 512) that ``_int_mm`` answered with an error or a wrong sum, then the same for ``mm_int32``.
Justifies ``int_mm.COLUMN_MULTIPLE`` (BENCHMARKS.md, "cuBLASLt's int8 shapes"). On a CPU every
shape is taken (oneDNN); the script exists for GPUs.
"""

from __future__ import annotations

import argparse

import torch

from intrain.kernels.int_mm import mm_int32


def outcome(product, a: torch.Tensor, b: torch.Tensor) -> str:
    """'ok', 'wrong' or the error's first words, for ``product(a, b)`` against a float64 product on
    the same device (exact in any order of summation: every partial sum is an integer of magnitude
    at most 2**14 * K < 2**53)."""
    try:
        got = product(a, b)
    except RuntimeError as error:
        return "refused" if "NOT_SUPPORTED" in str(error) else str(error).split("\n")[0][:60]
    exact = (a.double() @ b.double()).int()
    return "ok" if torch.equal(got, exact) else "wrong"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, nargs="+", default=[1024, 16384, 65536, 200704])
    parser.add_argument("--terms", type=int, nargs="+", default=[32, 40, 64, 72, 96, 152, 576])
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), {name}")
    gen = torch.Generator().manual_seed(0)
    products = {"torch._int_mm, TN": lambda a, b: torch._int_mm(a, b.t().contiguous().t()),
                "int_mm.mm_int32": mm_int32}
    for m in args.rows:
        for k in args.terms:
            a = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8).to(device)
            b_all = torch.randint(-128, 128, (k, 512), generator=gen, dtype=torch.int8).to(device)
            for label, product in products.items():
                failed = {}
                for n in range(8, 513, 8):
                    result = outcome(product, a, b_all[:, :n])
                    if result != "ok":
                        failed.setdefault(result, []).append(n)
                summary = "; ".join(f"{what} for N = {ns}" for what, ns in failed.items()) or "every N taken"
                print(f"M {m:>6}  K {k:>3}  {label:<18} {summary}", flush=True)


if __name__ == "__main__":
    main()
