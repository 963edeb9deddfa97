"""A NITI training step with the C rounding kernels (``intrain.numeric.native``) against the same
step with them switched off (the PyTorch code), and the float32 twin's step, in one process.

The two integer trainers start from the same weights and train on the same batch, so they must
stay bit-identical: the script checks that after every timed round and stops if they differ.
Sides are timed alternately, best of ``--rounds`` medians, so drifting load hits all alike;
only ratios are meant to be compared.

    python benchmarks/native_speed.py                                   # MLP 784-100-50-10, batch 64
    python benchmarks/native_speed.py --model lenet5 --batch 256
    python benchmarks/native_speed.py --model resnet18 --width 0.25 --batch 64 --steps 3
    python benchmarks/native_speed.py --model tr-lstm --batch 64 --steps 10  # the LSTM's step kernels
"""

from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import torch

from intrain.layers import weighted_layers
from intrain.methods.float_twin import FloatOptions, FloatTwin
from intrain.methods.niti import Niti, NitiOptions
from intrain.models import MODELS, build_float_model, build_int_model
from intrain.numeric import native
from intrain.numeric.qtensor import QTensor

SHAPES = {"mlp": (1, 28, 28), "lenet5": (1, 28, 28),
          # the recurrent models read the channels as frames: moving-mnist-actions' 10 frames of 32x32
          "lstm": (10, 32, 32), "tt-lstm": (10, 32, 32), "tr-lstm": (10, 32, 32)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mlp", choices=sorted(MODELS))
    parser.add_argument("--hidden", default="100,50", help="MLP hidden sizes (default: NITRO-D's 100,50)")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50, help="steps per timed median")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--error-rounding", default="stochastic", choices=("nearest", "stochastic"))
    args = parser.parse_args()
    if not native.available():
        parser.exit(2, "native_speed.py: the C kernels did not build here (no C compiler?)\n")

    shape = SHAPES.get(args.model, (3, 32, 32))
    hidden = [int(h) for h in args.hidden.split(",")] if args.model == "mlp" else None
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 128, (args.batch, *shape), generator=generator).to(torch.int8)
    labels = torch.randint(0, 10, (args.batch,), generator=generator)
    x = QTensor.of(pixels, -7)

    def trainer() -> Niti:
        model = build_int_model(args.model, shape, 10, seed=0, width=args.width, hidden=hidden)
        return Niti(model, NitiOptions(mu_schedule="0:4", error_rounding=args.error_rounding), seed=0)

    with_c, without_c = trainer(), trainer()
    torch.manual_seed(0)
    float_model = build_float_model(args.model, shape, 10, width=args.width, hidden=hidden)
    float_trainer = FloatTwin(float_model, FloatOptions(lr=0.01), total_steps=10**6)
    x_float = pixels.to(torch.float32) / 128
    step = {"with": 0, "without": 0}

    def int_steps(side: str, method: Niti) -> None:
        for _ in range(args.steps):
            method.train_step(x, labels, step[side], 0)
            step[side] += 1

    def c_side() -> None:
        int_steps("with", with_c)

    def torch_side() -> None:
        with mock.patch.object(native, "library", lambda: None):
            int_steps("without", without_c)

    def float_side() -> None:
        for i in range(args.steps):
            float_trainer.train_step(x_float, labels, i, 0)

    sides = {"C kernels": c_side, "PyTorch rounding": torch_side, "float32 twin": float_side}
    times: dict[str, list[float]] = {name: [] for name in sides}
    for name, fn in sides.items():
        fn()  # warm-up (and the kernels' build, once per machine)
    for _ in range(args.rounds):
        for name, fn in sides.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) / args.steps)
        same = all(torch.equal(a.weight, b.weight)
                   for a, b in zip(weighted_layers(with_c.model), weighted_layers(without_c.model)))
        if not same:
            raise SystemExit("native_speed.py: the two integer trainers differ: a kernel is not bit-exact")
    best = {name: min(values) for name, values in times.items()}
    spread = {name: statistics.median(values) for name, values in times.items()}
    print(f"{args.model} (hidden {args.hidden if hidden else '-'}, width {args.width}), batch {args.batch}, "
          f"{torch.get_num_threads()} threads, error rounding {args.error_rounding}")
    for name in sides:
        print(f"  {name:18s} {best[name] * 1e3:8.3f} ms/step (median of rounds {spread[name] * 1e3:8.3f})")
    print(f"  C kernels / PyTorch rounding {best['C kernels'] / best['PyTorch rounding']:.2f}x,"
          f"  C kernels / float32 {best['C kernels'] / best['float32 twin']:.2f}x,"
          f"  weights equal after {step['with']} steps")


if __name__ == "__main__":
    main()
