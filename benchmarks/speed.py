"""Training-step speed and memory: an integer method (NITI int8 or DFP16) against its float32 twin, in
one process.

Prints, per model, the median time of a whole training step (integer, float32, and on CUDA float32
under bf16 autocast) and the ratios, per-layer forward+backward times, and for int8 and float32
the bytes a step keeps alive between forward and update (weights, optimizer state, weight
gradients, tensors saved for backward: "held") and the peak of all tensor memory alive during
one step, weights, optimizer state and temporaries included ("peak"; on CPU from the PyTorch
profiler's memory timeline, which is made from the building of the model on).
Machines here are noisy, so all sides are measured alternately in the same process and only
ratios are meant to be compared. On a GPU (``--device cuda``) every timed call ends with a device synchronisation.

    python benchmarks/speed.py                          # lenet5 at batch 256, CPU
    python benchmarks/speed.py --model mlp --batch 256 --repeats 20
    python benchmarks/speed.py --model vgg-small-7 --batch 256 --device cuda
    python benchmarks/speed.py --model vgg-small-7 --batch 64 --int8-gemm off   # float path only
    python benchmarks/speed.py --model vgg-small-7 --batch 64 --arith dfp16      # DFP16, int32 masters, SGD
    python benchmarks/speed.py --model tr-lstm --batch 64 --arith dfp16 --optimizer adamw
    python benchmarks/speed.py --model lenet5 --batch 128 --update sgd --biases on   # integer biases
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time
import warnings

import torch

from intrain.methods.dfp16 import MASTERS, Dfp16, Dfp16Options
from intrain.methods.niti import Niti, NitiOptions
from intrain.methods.float_twin import OPTIMIZERS, FloatOptions, FloatTwin
from intrain.kernels import BACKENDS, Backend, CpuSettings, get_backend
from intrain.kernels.cpu import has_amx
from intrain.kernels.cpu.calibrate import INT8_GEMM_MIN_SPEEDUP, int8_gemm_speedup, isa_limit_label
from intrain.layers import StepContext
from intrain.methods.loss import cross_entropy_grad
from intrain.models import MODELS, build_float_model, build_int_model
from intrain.numeric.qtensor import QTensor
from intrain.layers import weighted_layers

SHAPES = {"mlp": (1, 28, 28), "lenet5": (1, 28, 28),
          # the recurrent models read the channels as frames: moving-mnist-actions' 10 frames of 32x32
          "lstm": (10, 32, 32), "tt-lstm": (10, 32, 32), "tr-lstm": (10, 32, 32)}


def _median_seconds(fn, repeats: int, device: torch.device) -> float:
    def timed() -> float:
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    timed()
    return statistics.median(timed() for _ in range(repeats))


def _saved_bytes_int(model, trainer) -> int:
    """Bytes an integer step holds after forward: weights, the method's state (DFP16's master
    weights and momentum), and tensors kept for backward (each storage counted once: a ReLU and
    the layer after it keep the same tensor)."""
    storages = {}
    state = torch.utils._pytree.tree_flatten(trainer.state_dict())[0]
    tensors = list(model.buffers()) + [t for t in state if isinstance(t, torch.Tensor)]
    for layer in model.layers:
        for name in ("_saved_input", "_output", "_argmax", "_keep"):
            kept = getattr(layer, name, None)
            tensors.append(getattr(kept, "v", kept))
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _weight_grad_bytes_int(model, x, y, seed, fmt) -> int:
    """Bytes of the weight gradients a step holds between backward and the update (int32 or
    int64, as the layers store them), measured by running forward, loss gradient and backward."""
    ctx = StepContext(seed, 0)
    model.train()
    error = cross_entropy_grad(model(x, ctx), y, seed, 0, fmt)
    model.backward(error, ctx)
    total = 0
    for layer in weighted_layers(model):
        total += layer.weight_grad.numel() * layer.weight_grad.element_size()
        layer.weight_grad = layer.weight_grad_exp = None
    return total


def _peak_live_bytes(make_step) -> int:
    """Peak of the tensor memory alive during a training step on CPU: everything PyTorch's CPU
    allocator holds for the model, the method's state, saved activations and every temporary,
    from the PyTorch profiler's memory timeline. The profile starts before ``make_step()`` builds
    the model and trainer and covers two steps after it: the timeline knows only the memory
    allocated inside it, so starting later would leave out the weights and optimizer state and
    count a tensor the step replaces (an update written to a new tensor) without its release."""
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                    profile_memory=True, record_shapes=True, with_stack=True) as prof:
            step = make_step()
            step()
            step()
        path = os.path.join(folder, "timeline.json")
        prof.export_memory_timeline(path, device="cpu")
        with open(path) as timeline:
            _, sizes = json.load(timeline)
    return max(sum(by_category) for by_category in sizes)


def _saved_bytes_float(model, x, y) -> int:
    """Bytes a float step holds after forward: parameters, gradients, momentum, saved tensors."""
    seen, saved = set(), 0

    def pack(t):
        nonlocal saved
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            saved += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return saved + 3 * params  # parameters, their gradients, momentum buffers


def _integer_trainer(arith: str, dfp16_master: str, model_name: str, shape, seed: int, backend: Backend,
                     device: torch.device, niti_options: dict | None = None, optimizer: str = "sgd",
                     biases: str = "off"):
    """(method, model) of the integer side: NITI int8 as the earlier figures measured it (mu 4, no
    weight averaging: its int64 sums are 8x the weights; ``niti_options`` adds to those, e.g. a
    recipe's int16 masters and weight decay), or DFP16 with the float twin's learning rate and
    ``optimizer``; ``biases`` "on": with integer biases (their add costs the fused requantisation)."""
    if arith == "dfp16":
        options = Dfp16Options(lr=0.01, backend=backend.name, dfp16_master=dfp16_master, optimizer=optimizer,
                               biases=biases)
        model = build_int_model(model_name, shape, 10, seed=seed, backend=backend, device=device, fmt=options.fmt,
                                biases=biases == "on")
        return Dfp16(model, options, seed=seed, total_steps=10**6), model
    niti_options = dict(niti_options or {})
    if niti_options.get("update") in ("sgd", "adamw"):  # the float twin's recipe on int32 masters: a rate, no mu
        niti_options["lr"] = 0.01
    else:
        niti_options["mu_schedule"] = "0:4"
    options = NitiOptions(**{"weight_average": "none", **niti_options, "biases": biases})
    model = build_int_model(model_name, shape, 10, seed=seed, backend=backend, device=device, fmt=options.fmt,
                            biases=biases == "on")
    return Niti(model, options, seed=seed, total_steps=10**6), model


#: Every int8 option's default (``NitiOptions``: NITI's own method); the label names only the
#: options given other values.
_OPTION_DEFAULTS = {f.name: f.default for f in dataclasses.fields(NitiOptions)}
#: The int8-only options this benchmark takes, at their defaults: the command line's defaults, and
#: the other arithmetics refuse any other value.
NITI_DEFAULTS = {name: _OPTION_DEFAULTS[name] for name in
                 ("update", "weight_bits", "error_rounding", "weight_decay_shift", "relu_scale", "activation_rounding")}


def bench(model_name: str, batch: int, repeats: int, device: torch.device, backend: Backend,
          bf16: bool, seed: int = 0, image_size: int | None = None, arith: str = "int8",
          dfp16_master: str = "int32", niti_options: dict | None = None, optimizer: str = "sgd",
          biases: str = "off") -> None:
    """Time one training step of ``arith`` against the float32 twin's. The float side takes AdamW
    where the integer side does (``--update adamw`` for int8, ``optimizer`` for DFP16)."""
    shape = SHAPES.get(model_name, (3, 32, 32))
    if image_size is not None:  # e.g. 224: ResNet-18 and AlexNet take the ImageNet layout
        shape = (shape[0], image_size, image_size)
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 128, (batch, *shape), generator=gen).to(torch.int8)
    labels = torch.randint(0, 10, (batch,), generator=gen).to(device)
    x_float = (pixels.to(torch.float32) / 128).to(device)

    def make_int_step():
        trainer, model = _integer_trainer(arith, dfp16_master, model_name, shape, seed, backend, device, niti_options,
                                          optimizer, biases)
        x = type(trainer).network_input(QTensor.of(pixels.to(device), -7))
        steps = iter(range(10**9))
        return trainer, model, x, lambda: trainer.train_step(x, labels, next(steps), 0)

    def make_float_step():
        torch.manual_seed(seed)
        model = build_float_model(model_name, shape, 10).to(device)
        adamw = (niti_options or {}).get("update") == "adamw" if arith == "int8" else optimizer == "adamw"
        trainer = FloatTwin(model, FloatOptions(lr=0.01, optimizer="adamw" if adamw else "sgd"), total_steps=10**6)
        steps = iter(range(10**9))
        return trainer, model, lambda: trainer.train_step(x_float, labels, next(steps), 0)

    int_trainer, int_model, x_int, int_step = make_int_step()
    float_trainer, float_model, float_step = make_float_step()

    def bf16_step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            float_trainer.train_step(x_float, labels, 0, 0)

    sides = [(arith, int_step), ("float32", float_step)] + ([("bf16", bf16_step)] if bf16 else [])
    times = {key: [] for key, _ in sides}
    for _ in range(3):  # interleave, so drifting machine load hits every side alike
        for key, fn in sides:
            times[key].append(_median_seconds(fn, repeats, device))
    t_int, t_float = min(times[arith]), min(times["float32"])
    where = f"{torch.get_num_threads()} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    master = f" ({dfp16_master} masters, {optimizer}{', biases' if biases == 'on' else ''})" if arith == "dfp16" else ""
    chosen = {k: v for k, v in {**(niti_options or {}), "biases": biases}.items()
              if _OPTION_DEFAULTS[k] != v}
    if arith == "int8" and chosen:
        master = " (" + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in chosen.items()) + ")"
    print(f"\n{model_name}, batch {batch}, {where}, {arith}{master}, integer kernels: "
          f"{weighted_layers(int_model)[0].backend.name}")
    print(f"  training step  {arith:>5s} {t_int * 1e3:8.2f} ms   float32 {t_float * 1e3:8.2f} ms   ratio {t_int / t_float:5.2f}x")
    if bf16:
        t_bf16 = min(times["bf16"])
        print(f"                                    bf16 autocast {t_bf16 * 1e3:8.2f} ms   ratio {t_int / t_bf16:5.2f}x")

    int_model.train()
    int_model(x_int, StepContext(seed, 0))
    mem_int = _saved_bytes_int(int_model, int_trainer) + _weight_grad_bytes_int(int_model, x_int, labels, seed,
                                                                   weighted_layers(int_model)[0].fmt)
    int_model.clear_saved()
    mem_float = _saved_bytes_float(float_model, x_float, labels)
    print(f"  held memory    {arith:>5s} {mem_int / 2**20:8.2f} MiB  float32 {mem_float / 2**20:8.2f} MiB  ratio {mem_int / mem_float:5.2f}x")
    if device.type == "cpu":
        peak_int = _peak_live_bytes(lambda: make_int_step()[-1])
        peak_float = _peak_live_bytes(lambda: make_float_step()[-1])
        print(f"  peak memory    {arith:>5s} {peak_int / 2**20:8.2f} MiB  float32 {peak_float / 2**20:8.2f} MiB  ratio {peak_int / peak_float:5.2f}x")
    else:
        peaks = []
        for fn in (int_step, float_step):
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            fn()
            torch.cuda.synchronize(device)
            peaks.append(torch.cuda.max_memory_allocated(device) - base)
        print(f"  peak above start {arith} {peaks[0] / 2**20:8.2f} MiB  float32 {peaks[1] / 2**20:8.2f} MiB  ratio {peaks[0] / peaks[1]:5.2f}x")

    if len(int_model.layers) != len(float_model):
        # e.g. ResNet's float twin has BatchNorm layers the integer model does not: no pairing.
        print("  per layer: not paired (the float twin has layers the integer model has not)")
        return
    print("  per layer (forward + backward):")
    q, f = x_int, x_float
    for int_layer, float_layer in zip(int_model.layers, float_model):
        f_in = f.detach().requires_grad_()

        def int_layer_step(layer=int_layer, inp=q):
            layer.train()
            ctx = StepContext(seed, 0)
            out = layer(inp, ctx)
            limit = layer.fmt.limit if hasattr(layer, "fmt") else 127
            layer.backward(QTensor(out.v.clamp(-limit, limit).to(out.v.dtype), out.e), ctx)

        def float_layer_step(layer=float_layer, inp=f_in):
            out = layer(inp)
            out.backward(torch.ones_like(out))

        ti = _median_seconds(int_layer_step, repeats, device)
        tf = _median_seconds(float_layer_step, repeats, device)
        print(f"    {type(int_layer).__name__:14s} {arith:>5s} {ti * 1e3:8.3f} ms   float32 {tf * 1e3:8.3f} ms   ratio {ti / tf:5.2f}x")
        int_layer.eval()
        q = int_layer(q)
        f = float_layer(f)
        int_layer.train()


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", choices=MODELS,
                        help="model to measure (repeatable; default: lenet5)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=None,
                        help="side of square images (default: 28 for MNIST models, 32 otherwise)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--backend", choices=BACKENDS + ("auto",), default="auto",
                        help="int8 kernels (default: auto, the fastest for the device)")
    parser.add_argument("--int8-gemm", choices=("auto", "on", "off"), default="auto",
                        help="cpu backend: int8 products through torch._int_mm (auto: where it "
                             "measured at least 2x float32 on this machine, for wide enough layers), or "
                             "always, or never (off: the float path and the direct C kernels of first layers, as on CPUs "
                             "without such units)")
    parser.add_argument("--arith", choices=("int8", "dfp16"), default="int8",
                        help="integer method to time against the float32 twin: NITI int8 (default) or DFP16")
    parser.add_argument("--dfp16-master", choices=tuple(MASTERS), default="int32",
                        help="with --arith dfp16: int32 master weights and momentum (integer-only, the "
                             "default) or float32 (Das et al.)")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd",
                        help="with --arith dfp16: the float twin's optimiser, on both sides (default: sgd)")
    parser.add_argument("--update", choices=("niti", "sgd", "adamw"), default=NITI_DEFAULTS["update"],
                        help="int8: NITI's update (mu 4), or the float twin's SGD or AdamW recipe on int32 masters "
                             "(with adamw the float side takes AdamW too)")
    parser.add_argument("--weight-bits", type=int, choices=(8, 16), default=NITI_DEFAULTS["weight_bits"],
                        help="int8: 16 adds int16 master weights (default: 8)")
    parser.add_argument("--error-rounding", choices=("nearest", "stochastic"), default=NITI_DEFAULTS["error_rounding"],
                        help="int8: rounding of the errors sent down (default: nearest)")
    parser.add_argument("--activation-rounding", choices=("nearest", "stochastic"),
                        default=NITI_DEFAULTS["activation_rounding"],
                        help="int8: rounding of convolution and linear outputs in the step (default: nearest)")
    parser.add_argument("--relu-scale", choices=("magnitude", "positive"), default=NITI_DEFAULTS["relu_scale"],
                        help="int8: output exponent of the layers before a ReLU from their largest magnitude "
                             "(NITI's, default) or largest positive value")
    parser.add_argument("--weight-decay-shift", type=int, default=NITI_DEFAULTS["weight_decay_shift"], metavar="K",
                        help="int8: integer weight decay of 2**(mu - K) per step (mu is 4 here; default: off)")
    parser.add_argument("--biases", choices=("off", "on"), default=_OPTION_DEFAULTS["biases"],
                        help="integer biases in the convolution and linear layers, as the float twin has (int8: "
                             "with --update sgd or adamw; default: off)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="also time the float step under bf16 autocast (default: on CUDA only; "
                             "CPUs without bf16 units make it very slow)")
    args = parser.parse_args()
    niti_options = {"update": args.update, "weight_bits": args.weight_bits, "error_rounding": args.error_rounding,
                    "weight_decay_shift": args.weight_decay_shift, "relu_scale": args.relu_scale,
                    "activation_rounding": args.activation_rounding}
    if args.arith != "int8" and niti_options != NITI_DEFAULTS:
        parser.error("--update, --weight-bits, --error-rounding, --activation-rounding, --relu-scale and "
                     "--weight-decay-shift apply to --arith int8 only")
    if args.arith != "dfp16" and args.optimizer != "sgd":
        parser.error("--optimizer applies to --arith dfp16 only (int8 takes --update sgd or adamw)")
    if args.update != "niti" and (args.weight_bits != 8 or args.weight_decay_shift is not None):
        parser.error("--weight-bits 16 and --weight-decay-shift belong to NITI's update: leave them out with "
                     f"--update {args.update}")
    if args.biases == "on" and args.arith == "int8" and args.update == "niti":
        parser.error("--biases on needs --update sgd or adamw with --arith int8 (NITI's update keeps exponents fixed)")
    if args.weight_decay_shift is not None and args.weight_decay_shift <= 4:
        parser.error(f"--weight-decay-shift {args.weight_decay_shift} must exceed the benchmark's mu of 4")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to PyTorch here")
    settings = None
    if args.int8_gemm != "auto":
        settings = CpuSettings(use_int8_gemm=args.int8_gemm == "on")
    try:
        backend = get_backend(args.backend, args.device, settings)
    except (TypeError, ValueError) as err:
        parser.error(f"--backend {args.backend} --int8-gemm {args.int8_gemm}: {err}")
    speedup = int8_gemm_speedup()
    limits = isa_limit_label().replace("|", ", ")
    print(f"CPU: {_cpu_name()}{limits}, AMX-INT8: {'yes' if has_amx() else 'no'}, int8 GEMM measured {speedup:.1f}x "
          f"float32 (auto {'takes' if speedup >= INT8_GEMM_MIN_SPEEDUP else 'skips'} it), "
          f"int8 GEMM: {args.int8_gemm}, threads {torch.get_num_threads()}, PyTorch {torch.__version__}")
    for name in args.model or ["lenet5"]:
        bf16 = args.device == "cuda" if args.bf16 is None else args.bf16
        bench(name, args.batch, args.repeats, torch.device(args.device), backend, bf16,
              image_size=args.image_size, arith=args.arith, dfp16_master=args.dfp16_master,
              niti_options=niti_options, optimizer=args.optimizer, biases=args.biases)


if __name__ == "__main__":
    main()
