"""Speed of the two ternary products of ``intrain.kernels.ternary`` on LeNet-5's layers.

For each weighted layer of LeNet-5 on 28x28 images (the shapes of ``models.zoo``), one edge of
random ternary weights (two thirds non-zero, groups of ``--group-size``) and random scales, and a
batch of random int8 inputs: the median over ``--repeats`` of the wall time of ``adds`` (group
sums by gathering and adding, then one multiplication per group and output) and of ``dense`` (one
int8 product with ``alpha * t`` through the ``cpu`` backend, AMX-INT8 where the CPU has it). Both
give the same integers (checked here too). CPU time of this process is printed beside the wall
time, because the cores may be shared:

    OMP_NUM_THREADS=1 python benchmarks/ternary_speed.py --batch 256 --group-size 4
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from intrain.kernels import get_backend
from intrain.kernels.ternary import ternary_conv2d, ternary_linear

#: (name, kind, weight shape, input shape per image): LeNet-5's weighted layers on MNIST.
LENET5 = (("conv1", "conv", (6, 1, 5, 5), (1, 28, 28)), ("conv2", "conv", (16, 6, 5, 5), (6, 14, 14)),
          ("fc1", "linear", (120, 400), (400,)), ("fc2", "linear", (84, 120), (120,)),
          ("fc3", "linear", (10, 84), (84,)))


def _operands(shape, group_size, gen):
    o, k = shape[0], 1
    for s in shape[1:]:
        k *= s
    n = min(group_size, k)
    g = -(-k // n)
    t = torch.randint(-1, 2, (o, g, n), generator=gen, dtype=torch.int8)
    t.reshape(o, -1)[:, k:] = 0
    alpha = torch.randint(1, 128, (o, g), generator=gen, dtype=torch.int16)
    return t, alpha


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    backend = get_backend("cpu")
    gen = torch.Generator().manual_seed(0)
    totals = {"adds": 0.0, "dense": 0.0}
    print(f"batch {args.batch}, groups of {args.group_size}, median of {args.repeats}, "
          f"torch threads {torch.get_num_threads()}")
    for name, kind, shape, in_shape in LENET5:
        t, alpha = _operands(shape, args.group_size, gen)
        x = torch.randint(-127, 128, (args.batch, *in_shape), generator=gen, dtype=torch.int8)
        results, line = {}, [f"{name:6s} {str(shape):16s}"]
        for product in ("adds", "dense"):
            if kind == "conv":
                run = lambda: ternary_conv2d(x, t, alpha, shape[2:], (1, 1), (2, 2) if name == "conv1" else (0, 0),
                                             backend, product)
            else:
                run = lambda: ternary_linear(x, t, alpha, backend, product)
            results[product] = run()
            walls, cpus = [], []
            for _ in range(args.repeats):
                w0, c0 = time.perf_counter(), time.process_time()
                run()
                walls.append(time.perf_counter() - w0)
                cpus.append(time.process_time() - c0)
            wall, cpu = statistics.median(walls) * 1e3, statistics.median(cpus) * 1e3
            totals[product] += wall
            line.append(f"{product} {wall:8.2f} ms (cpu {cpu:8.2f})")
        assert torch.equal(results["adds"], results["dense"]), name
        print("  ".join(line) + f"  adds/dense {float(line[1].split()[1]) / float(line[2].split()[1]):6.1f}x")
    print(f"total  adds {totals['adds']:.2f} ms, dense {totals['dense']:.2f} ms, "
          f"adds/dense {totals['adds'] / totals['dense']:.1f}x")


if __name__ == "__main__":
    main()
