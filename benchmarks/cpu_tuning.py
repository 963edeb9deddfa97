"""The cpu backend's tuned constants (intrain.kernels.CpuSettings) against their alternatives.

Records the integer products of one real training step (after a few steps, so that weights
and errors are those of training: LeNet-5 at batch 256, VGG-small-7 at width 1 and batch 64,
random pixels and labels as in speed.py), then for each constant replays the products it
affects on cpu backends that differ only in that constant, in the same process. A value's time
is the sum over the products of each product's best of ``--repeats`` runs or more (until
``--min-seconds`` are timed; the values take turns, so that drifting machine load hits them
alike), printed as a ratio against the chosen
value (< 1: faster than the chosen value). With one thread (OMP_NUM_THREADS=1) runs are timed
in process CPU time, which other processes on a shared machine inflate far less than wall
time; rows where a constant cannot change anything show the noise that remains. Constants
that trade memory for time also print the peak tensor memory of the replay (PyTorch profiler,
as speed.py's "peak"). Constants of the float path are measured on it (``use_int8_gemm=False``:
what a CPU without AMX-INT8 runs); those of the int8 GEMM path under the automatic choice,
which takes it only on CPUs with AMX-INT8. Constants of the float path's block plans are also
measured with the errors replaced by dense uniform ones ("dense d" rows): the recorded errors
fit one float32 block almost everywhere, so the plans these constants choose between arise
only with denser errors.

    python benchmarks/cpu_tuning.py                                # every constant (minutes)
    python benchmarks/cpu_tuning.py --only grouped_max_columns --only mm_grains
    python benchmarks/cpu_tuning.py --only float_chunk_bytes --model lenet5 --repeats 5
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, fields, replace

import torch

from intrain.kernels import PRODUCTS, Backend, CpuBackend, CpuSettings
from intrain.kernels.cpu import has_amx
from intrain.kernels.cpu.calibrate import int8_gemm_pays
from intrain.methods.niti import Niti, NitiOptions
from intrain.models import build_int_model
from intrain.numeric.qtensor import QTensor
from speed import _cpu_name, _peak_live_bytes

#: model -> (input shape, batch, width): the steps the constants were chosen on.
STEPS = {"lenet5": ((1, 28, 28), 256, 1.0), "vgg-small-7": ((3, 32, 32), 64, 1.0)}

CONV = ("conv2d_forward", "conv2d_backward_input", "conv2d_backward_weight")
LINEAR = ("linear_forward", "linear_backward_input", "linear_backward_weight")
WEIGHT_GRAD = ("conv2d_backward_weight",)
NEVER = 2**40  # a threshold or size no layer reaches (shown as "inf")
DENSE = " dense d"  # the name of a step with dense errors: its model's name and this
FLOAT_PATH = {"use_int8_gemm": False}


@dataclass(frozen=True)
class Tuning:
    """How one CpuSettings field is measured."""

    values: tuple  # the alternatives, the chosen value among them
    products: tuple[str, ...]  # the products it can change
    base: dict  # the settings it is measured under (besides the defaults)
    memory: bool = False  # also measure the peak memory
    int8_units_only: bool = False  # where the int8 GEMM does not pay, the automatic choice never reaches it
    dense: bool = False  # also on the steps with dense errors (see with_dense_errors)


TUNINGS = {
    "use_int8_gemm": Tuning((None, False, True), PRODUCTS, {}),
    "int8_gemm_min_channels": Tuning((1, 16, 32, 64, NEVER), CONV, {}, int8_units_only=True),
    "int8_gemm_chunk_bytes": Tuning((2**20, 2**22, 2**24, 2**26, 2**28), CONV, {}, memory=True,
                                    int8_units_only=True),
    "direct_conv_max_columns": Tuning((0, 9, 25, 32), CONV, {}, memory=True),
    "max_f32_blocks_mm": Tuning((1, 2, 3, 4, 8, 64), LINEAR, FLOAT_PATH),
    "max_f32_blocks_conv": Tuning((1, 4, 8, 16, 32, 64), CONV, FLOAT_PATH, dense=True),
    "min_samples_per_block": Tuning((1, 2, 3, 4, 8, NEVER), WEIGHT_GRAD, FLOAT_PATH, dense=True),
    "grouped_min_blocks": Tuning((0, 2, 4, 8, 16), WEIGHT_GRAD, FLOAT_PATH, dense=True),
    "grouped_max_columns": Tuning((0, 25, 32, 150, NEVER), WEIGHT_GRAD, FLOAT_PATH, dense=True),
    "grouped_max_samples": Tuning((0, 1, 2, 4, 16), WEIGHT_GRAD, FLOAT_PATH, dense=True),
    "grouped_chunk_bytes": Tuning((2**19, 2**20, 2**21, 2**22, 2**24, 2**26), WEIGHT_GRAD,
                                  FLOAT_PATH, memory=True, dense=True),
    "split_min_blocks": Tuning((2, 4, 8, 16, NEVER), WEIGHT_GRAD, FLOAT_PATH, dense=True),
    "mm_grains": Tuning((8, 16, 32, 64, 128, 256), LINEAR, FLOAT_PATH),
    "float_chunk_bytes": Tuning((2**20, 2**21, 2**22, 2**24, 2**26, NEVER), CONV, FLOAT_PATH,
                                memory=True),
}
assert list(TUNINGS) == [f.name for f in fields(CpuSettings)]  # every tuned constant, in order


@dataclass(frozen=True)
class Call:
    """One product of the recorded step: ``requantised`` ones went through product_to_int8."""

    label: str
    product: str
    args: tuple
    requantised: bool

    def run(self, backend: Backend) -> None:
        if self.requantised:
            backend.product_to_int8(self.product, *self.args)
        else:
            getattr(backend, self.product)(*self.args)


def _label(product: str, args: tuple) -> str:
    """Which layer a product belongs to, from its operands' shapes."""
    a, b = args[0], args[1]
    if product.startswith("linear"):
        width = {"linear_forward": (a.shape[1], b.shape[0]),
                 "linear_backward_input": (b.shape[1], b.shape[0]),
                 "linear_backward_weight": (b.shape[1], a.shape[1])}[product]
        layer = f"linear {width[0]}->{width[1]}"
    elif product == "conv2d_forward":
        layer = f"conv {a.shape[1]}->{b.shape[0]} {a.shape[2]}x{a.shape[3]}"
    elif product == "conv2d_backward_input":
        layer = f"conv {b.shape[1]}->{b.shape[0]} {args[2][0]}x{args[2][1]}"
    else:
        layer = f"conv {b.shape[1]}->{a.shape[1]} {b.shape[2]}x{b.shape[3]}"
    return f"{layer} {product.split('_', 1)[1].replace('_', ' ')}"


class Recorder(Backend):
    """A cpu backend that records the products it computes while ``calls`` is a list."""

    name = "cpu-recorder"

    def __init__(self) -> None:
        self.inner = CpuBackend()
        self.calls: list[Call] | None = None

    def _record(self, product: str, args: tuple, requantised: bool) -> None:
        if self.calls is not None:
            copies = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
            self.calls.append(Call(_label(product, args), product, copies, requantised))

    def product_to_int8(self, product: str, *args, reduce_max=None, shifts=(0, 0), rectify=False, bias=None):
        # replayed without ``rectify`` and ``bias``: their clamp and addition are the same passes on
        # every path the constants choose
        self._record(product, args, True)
        return self.inner.product_to_int8(product, *args, reduce_max=reduce_max, shifts=shifts, rectify=rectify,
                                          bias=bias)


def _recording(product: str):
    def method(self: Recorder, *args):
        self._record(product, args, False)
        return getattr(self.inner, product)(*args)
    return method


for _product in PRODUCTS:
    setattr(Recorder, _product, _recording(_product))


def record_step(model_name: str, steps_before: int, seed: int = 0) -> list[Call]:
    """The products of training step ``steps_before`` (counting from 0) of ``model_name``."""
    shape, batch, width = STEPS[model_name]
    gen = torch.Generator().manual_seed(seed)
    recorder = Recorder()
    model = build_int_model(model_name, shape, 10, seed=seed, backend=recorder, width=width)
    trainer = Niti(model, NitiOptions(mu_schedule="0:4", weight_average="none"), seed=seed)
    for step in range(steps_before + 1):
        pixels = torch.randint(0, 128, (batch, *shape), generator=gen).to(torch.int8)
        labels = torch.randint(0, 10, (batch,), generator=gen)
        recorder.calls = [] if step == steps_before else None
        trainer.train_step(QTensor.of(pixels, -7), labels, step, 0)
    return recorder.calls


def clock():
    """The clock runs are timed by: with one thread, the CPU time of this process, which other
    processes taking turns on the cores inflate far less than wall time (the machines here are
    shared); with more threads, wall time."""
    return time.process_time if torch.get_num_threads() == 1 else time.perf_counter


def with_dense_errors(calls: list[Call], seed: int = 0) -> list[Call]:
    """The same products with every error tensor (the first operand of a backward product)
    replaced by uniform values in [-127, 127]: dense, large errors, whose exactness bounds need
    more float32 blocks (or the grouped product, or the split of d) where the errors of the
    recorded steps, sparse after ReLU and pooling, fit one block almost everywhere."""
    gen = torch.Generator().manual_seed(seed)
    dense = []
    for call in calls:
        if "backward" in call.product:
            d = torch.randint(-127, 128, call.args[0].shape, generator=gen, dtype=torch.int8)
            call = Call(call.label, call.product, (d,) + call.args[1:], call.requantised)
        dense.append(call)
    return dense


def best_times(calls: list[Call], backends: list[Backend], repeats: int, min_seconds: float
               ) -> list[list[float]]:
    """[backend][call] best seconds of at least ``repeats`` runs, and of more until each backend
    has been timed for ``min_seconds`` (short products vary most). The backends take turns, so
    that drifting load hits them alike; in each turn a backend runs the calls twice in the order
    of the step and only the second pass is timed: the memory the allocator holds is then what
    this backend leaves behind, as in training, not what the previous one did (which alone made
    the same float-path convolution 1.3x slower when it followed the int8 GEMM one)."""
    now = clock()
    best = [[float("inf")] * len(calls) for _ in backends]
    timed = [0.0] * len(backends)
    turn = 0
    while turn < repeats or min(timed) < min_seconds:
        turn += 1
        for b, backend in enumerate(backends):
            for call in calls:
                call.run(backend)
            for c, call in enumerate(calls):
                start = now()
                call.run(backend)
                seconds = now() - start
                best[b][c] = min(best[b][c], seconds)
                timed[b] += seconds
    return best


def _show(value) -> str:
    if value is None:
        return "auto"
    if isinstance(value, bool):
        return "on" if value else "off"
    if value == NEVER:
        return "inf"
    if value >= 2**19 and value & (value - 1) == 0:
        return f"{value / 2**20:g}MiB"
    return str(value)


def measure(name: str, steps: dict[str, list[Call]], repeats: int, min_seconds: float) -> None:
    """Print the table of constant ``name``: ``steps`` maps a name to its recorded products
    (names ending in DENSE: with dense errors, measured for the constants marked so)."""
    tuning = TUNINGS[name]
    chosen = getattr(CpuSettings(), name)
    assert chosen in tuning.values, (name, chosen)
    base = replace(CpuSettings(), **tuning.base)
    backends = [CpuBackend(replace(base, **{name: value})) for value in tuning.values]
    at = tuning.values.index(chosen)
    under = ", ".join(f"{k}={_show(v)}" for k, v in tuning.base.items()) or "the defaults"
    print(f"\n== {name} = {_show(chosen)} (measured under {under}; "
          f"python benchmarks/cpu_tuning.py --only {name})")
    if tuning.int8_units_only and not int8_gemm_pays():
        print("   the int8 GEMM measured below 2x float32 here: the automatic choice never takes it, "
              "so this constant changes nothing on this CPU")
    header = "".join(f"{_show(v) + ('*' if i == at else ''):>9}"
                     for i, v in enumerate(tuning.values))
    print(f"   {'time / time at the chosen value (*)':56s}{header}   chosen")
    for model_name, recorded in steps.items():
        if model_name.endswith(DENSE) and not tuning.dense:
            continue
        calls = [c for c in recorded if c.product in tuning.products]
        if not calls:
            continue
        best = best_times(calls, backends, repeats, min_seconds)
        rows: dict[str, list[float]] = {}
        for c, call in enumerate(calls):
            row = rows.setdefault(call.label, [0.0] * len(backends))
            for b in range(len(backends)):
                row[b] += best[b][c]
        rows[f"{model_name} total"] = [sum(times) for times in best]
        for label, times in rows.items():
            ratios = "".join(f"{t / times[at]:9.2f}" for t in times)
            prefix = label if label.endswith("total") else f"{model_name} {label}"
            print(f"   {prefix:56s}{ratios}   {times[at] * 1e3:8.2f} ms")
        if tuning.memory:
            peaks = [_peak_live_bytes(lambda be=be: lambda: [c.run(be) for c in calls])
                     for be in backends]
            ratios = "".join(f"{p / peaks[at]:9.2f}" for p in peaks)
            print(f"   {model_name + ' peak memory':56s}{ratios}   {peaks[at] / 2**20:8.2f} MiB")


def _cpu_flag(flag: str) -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return "yes" if any(flag in line.split() for line in info
                                if line.startswith("flags")) else "no"
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=list(TUNINGS), metavar="NAME",
                        help="measure this constant (repeatable; default: all of them): "
                             + ", ".join(TUNINGS))
    parser.add_argument("--model", action="append", choices=list(STEPS),
                        help="record this model's step (repeatable; default: both)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs per value at least, the best kept")
    parser.add_argument("--min-seconds", type=float, default=1.0,
                        help="more runs until each value has been timed this long")
    parser.add_argument("--steps-before", type=int, default=3,
                        help="training steps before the recorded one")
    args = parser.parse_args()
    print(f"CPU: {_cpu_name()}, AMX-INT8: {'yes' if has_amx() else 'no'}, AVX-512 VNNI: "
          f"{_cpu_flag('avx512_vnni')}, {torch.get_num_threads()} threads "
          f"({'process CPU' if clock() is time.process_time else 'wall'} time), "
          f"PyTorch {torch.__version__}")
    steps = {}
    for model_name in args.model or list(STEPS):
        _, batch, width = STEPS[model_name]
        steps[model_name] = record_step(model_name, args.steps_before)
        print(f"recorded step {args.steps_before} of {model_name} (width {width:g}) at batch "
              f"{batch}: {len(steps[model_name])} products")
    for model_name in list(steps):
        steps[model_name + DENSE] = with_dense_errors(steps[model_name])
    for name in args.only or list(TUNINGS):
        measure(name, steps, args.repeats, args.min_seconds)


if __name__ == "__main__":
    main()
