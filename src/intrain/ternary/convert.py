"""Converting a finished int8 or float run into an 8-2 model with residual ternary edges.

``ternarize_run(run_dir, out, settings)`` reads the run's ``config.json`` and ``model.pt`` (checked
for damage like ``intrain eval`` does), takes each weighted layer's real weights (int8 run:
``weight * 2**weight_exp``, exact, and its biases if it was trained with them; float run: the float32 weights and biases; a float model with
batch normalisation is refused: the integer layers have nothing to fold it into), decomposes
them into ``settings.max_edges`` residual ternary edges (``ternary.quantize``), ranks the residual
edges (``ternary.rank``) and keeps the first ``round(budget * groups)`` of them, where ``groups``
is the number of groups in the model: ``budget`` is the average number of residual edges per
group on top of the first edge (0: the plain 8-2 model). Unkept edges are not stored (alpha 0,
ternary 0). The result is the run's integer model with every weighted layer replaced by a
``layers.ternary.TernaryLayer``, saved as a run folder: ``config.json`` (the source's config plus a
``"ternary"`` section) and ``model.pt`` (same format and checksums as a training run's).

The perturbation ranking needs the network's sensitivity: it runs the float32 network with the
source weights (for an int8 run: its dequantised weights and biases, zero biases when it had
none; that network computes on the real values the int8 network rounds) on the first ``calibration_images`` training images.

Everything is computed and checked before the output folder is created: bad input writes nothing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from intrain.data import load_dataset, pixels_to_int8, PIXEL_EXPONENT
from intrain.kernels import get_backend
from intrain.layers import IntBias, IntConv2d, IntLinear, weighted_layers
from intrain.layers.ternary import TernaryLayer
from intrain.methods import get_method
from intrain.models import build_int_model
from intrain.models.build import build_float_model
from intrain.models.zoo import RECURRENT_MODELS
from intrain.run.config import ConfigError
from intrain.run.metrics import progress
from intrain.run.files import (check_out, make_out_dir, read_config, read_model, record_files, same_json,
                                save_json, save_model)
from intrain.ternary.quantize import THRESHOLD_RULES, decompose
from intrain.ternary.rank import RANKINGS, l2_gains, perturbation_gains, random_gains, rank_edges

#: Edges per group the converter computes and ranks (the first plus three residual ones): the
#: residual budget can reach 3. After three residual edges the relative l2 error of LeNet-5's
#: int8 weights is 1.6-1.7 % (groups of 16 or 64; of 4: 0.6 %), the order of int8's own
#: rounding error, so more edges would spend more bits than the 8-8 model to approach it.
MAX_EDGES = 4
#: A place no budget reaches: the rank of a residual edge that was not kept.
NOT_KEPT = 2**62


@dataclass(frozen=True)
class TernarySettings:
    group_size: int
    budget: float
    threshold: str = "optimal"
    ranking: str = "perturbation"
    calibration_images: int = 256
    max_edges: int = MAX_EDGES
    product: str = "dense"
    seed: int = 0

    def check(self) -> None:
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise ConfigError(f"group size must be an integer >= 1, got {self.group_size!r}")
        if not 0 <= self.budget <= self.max_edges - 1:
            raise ConfigError(f"budget must be between 0 and {self.max_edges - 1} residual edges per group, "
                              f"got {self.budget!r}")
        if self.threshold not in THRESHOLD_RULES:
            raise ConfigError(f"unknown threshold rule {self.threshold!r}: choose {', '.join(THRESHOLD_RULES)}")
        if self.ranking not in RANKINGS:
            raise ConfigError(f"unknown ranking {self.ranking!r}: choose {', '.join(RANKINGS)}")
        if self.calibration_images < 1:
            raise ConfigError(f"need at least one calibration image, got {self.calibration_images}")


@dataclass(frozen=True)
class SourceLayer:
    """One weighted layer of the source: its real weight and bias (None: no bias) and its float
    module in the calibration network."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    float_module: torch.nn.Module


def _real(layer) -> torch.Tensor:
    """An integer layer's weight (or an ``IntBias``'s bias) as its real values, exact in float64."""
    return layer.weight.to(torch.float64) * 2.0 ** int(layer.weight_exp)


def _float_weighted(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]


def load_source(cfg: dict, saved: dict, run_dir: Path) -> tuple[torch.nn.Module, torch.nn.Module, list[SourceLayer]]:
    """(integer model, float calibration network, layers) of a run (see the module docstring)."""
    shape, classes = tuple(cfg["image_shape"]), int(cfg["num_classes"])
    width = float(cfg.get("width") or 1.0)
    hidden = cfg.get("hidden")
    arith = cfg.get("arith")
    if cfg.get("model") in RECURRENT_MODELS:
        raise ConfigError(f"{run_dir} holds a recurrent model ({cfg['model']}): only feed-forward models "
                          "(their linear and convolution layers) can be ternarised")
    try:
        int_model = build_int_model(cfg["model"], shape, classes, seed=int(cfg["seed"]), backend="reference",
                                    width=width, hidden=hidden)
        float_net = build_float_model(cfg["model"], shape, classes, width=width, hidden=hidden).to(torch.float64)
        if any(isinstance(m, torch.nn.BatchNorm2d) for m in float_net.modules()):
            raise ConfigError(f"{cfg['model']} has batch normalisation, which the integer layers cannot hold: "
                              "only models without it can be ternarised")
        if arith == "float":
            float_net.load_state_dict(saved["state_dict"])
            float_net = float_net.to(torch.float64)
            sources = [(m.weight.detach().to(torch.float64), m.bias.detach().to(torch.float64))
                       for m in _float_weighted(float_net)]
        elif arith == "int8":
            method = get_method("int8")
            given = {k: cfg[k] for k in method.option_names() if cfg.get(k) is not None}
            given["backend"] = "reference"
            source = method.build_model(method.make_options(given, {}), cfg["model"], shape, classes,
                                        seed=int(cfg["seed"]), width=width, device="cpu", hidden=hidden)
            source.load_state_dict(saved["state_dict"])
            sources = [(_real(layer), None if layer.bias is None else _real(layer.bias))
                       for layer in weighted_layers(source) if not isinstance(layer, IntBias)]
            with torch.no_grad():
                for m, (w, b) in zip(_float_weighted(float_net), sources):
                    m.weight.copy_(w)
                    m.bias.copy_(b) if b is not None else m.bias.zero_()
        else:
            raise ConfigError(f"{run_dir} holds a {arith!r} run: only int8 and float runs can be ternarised")
    except (ValueError, RuntimeError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{run_dir / 'model.pt'} does not fit the model in {run_dir / 'config.json'} "
                          f"({first})") from None
    layers = [SourceLayer(w, b, fm) for (w, b), fm in zip(sources, _float_weighted(float_net))]
    return int_model, float_net.eval(), layers


def calibration_statistics(float_net: torch.nn.Module, layers: list[SourceLayer], x: torch.Tensor):
    """Per layer (input rows [M, K], summed squared logit gradients [M, O]) on the batch ``x``."""
    inputs, outputs = {}, {}

    def hook(module, args, out):
        inputs[module] = args[0].detach()
        outputs[module] = out

    handles = [layer.float_module.register_forward_hook(hook) for layer in layers]
    try:
        logits = float_net(x)
    finally:
        for h in handles:
            h.remove()
    sens = {layer.float_module: None for layer in layers}
    for c in range(logits.shape[1]):
        grads = torch.autograd.grad(logits[:, c].sum(), [outputs[layer.float_module] for layer in layers],
                                    retain_graph=True)
        for layer, g in zip(layers, grads):
            sq = g.detach() ** 2
            key = layer.float_module
            sens[key] = sq if sens[key] is None else sens[key] + sq
    stats = []
    for layer in layers:
        m = layer.float_module
        if isinstance(m, torch.nn.Conv2d):
            rows = F.unfold(inputs[m], m.kernel_size, padding=m.padding, stride=m.stride)  # [B, K, L]
            rows = rows.transpose(1, 2).reshape(-1, rows.shape[1])
            h = sens[m].permute(0, 2, 3, 1).reshape(-1, sens[m].shape[1])
        else:
            rows, h = inputs[m].reshape(inputs[m].shape[0], -1), sens[m]
        stats.append((rows, h))
    return stats


def ternary_skeleton(int_model: torch.nn.Module, group_size: int, edges: int, has_bias: bool,
                     backend: str = "auto", product: str = "dense") -> torch.nn.Module:
    """``int_model`` with every IntLinear / IntConv2d replaced by an empty TernaryLayer."""
    kernels = get_backend(backend, "cpu")
    parents = {child: (parent, name) for parent in int_model.modules() for name, child in parent.named_children()}
    for layer in weighted_layers(int_model):
        if isinstance(layer, IntConv2d):
            new = TernaryLayer("conv", tuple(layer.weight.shape), group_size, edges, kernels, product, has_bias,
                               stride=layer.stride, padding=layer.padding)
        elif isinstance(layer, IntLinear):
            new = TernaryLayer("linear", tuple(layer.weight.shape), group_size, edges, kernels, product, has_bias)
        else:
            raise ConfigError(f"cannot ternarise a {type(layer).__name__} layer")
        parent, name = parents[layer]
        setattr(parent, name, new)
    return int_model.eval()


def ternary_layers(model: torch.nn.Module) -> list[TernaryLayer]:
    return [m for m in model.modules() if isinstance(m, TernaryLayer)]


def _bias_to_int(b: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Real bias -> (int32 values below 2**15 in magnitude, exponent)."""
    top = float(b.abs().max())
    if top == 0:
        return torch.zeros(b.shape, dtype=torch.int32), 0
    e = int(torch.ceil(torch.log2(torch.tensor(top / (2**15 - 1), dtype=torch.float64))))
    return torch.round(b / 2.0**e).clamp(-(2**15 - 1), 2**15 - 1).to(torch.int32), e


def convert(int_model: torch.nn.Module, float_net: torch.nn.Module, layers: list[SourceLayer],
            settings: TernarySettings, calibration: torch.Tensor | None) -> tuple[torch.nn.Module, int]:
    """The ternary model and the number of residual edges kept (see the module docstring).
    ``calibration``: float network inputs (needed by the perturbation ranking only)."""
    settings.check()
    decompositions = []
    with progress(2 * len(layers), "ternarising") as bar:
        for layer in layers:
            decompositions.append(decompose(layer.weight, settings.group_size, settings.max_edges,
                                            settings.threshold))
            bar.update()
        if settings.ranking == "perturbation":
            stats = calibration_statistics(float_net, layers, calibration)
            gains = []
            for d, (rows, h) in zip(decompositions, stats):
                gains.append(perturbation_gains(d, rows, h))
                bar.update()
        elif settings.ranking == "l2":
            gains = [l2_gains(d) for d in decompositions]
        else:
            generator = torch.Generator().manual_seed(settings.seed)
            gains = [random_gains(d, generator) for d in decompositions]
    places = rank_edges(decompositions, gains)
    groups = sum(int(d.alpha.shape[1] * d.alpha.shape[2]) for d in decompositions)
    candidates = sum(p.numel() for p in places)
    kept = min(candidates, int(round(settings.budget * groups)))
    has_bias = layers[0].bias is not None
    model = ternary_skeleton(int_model, settings.group_size, settings.max_edges, has_bias, product=settings.product)
    for t_layer, d, place, source in zip(ternary_layers(model), decompositions, places, layers):
        keep = torch.cat([torch.ones_like(place[:1], dtype=torch.bool), place < kept])
        t_layer.ternary.copy_(d.ternary * keep[..., None])
        t_layer.alpha.copy_(d.alpha * keep)
        t_layer.alpha_exp.copy_(d.alpha_exp)
        rank = torch.cat([torch.full_like(place[:1], -1), torch.where(place < kept, place, NOT_KEPT)])
        t_layer.rank.copy_(rank)
        if has_bias:
            values, e = _bias_to_int(source.bias)
            t_layer.bias.copy_(values)
            t_layer.bias_exp.fill_(e)
    for t_layer in ternary_layers(model):
        t_layer.active_residuals = kept
    return model, kept


def calibration_batch(cfg: dict, count: int) -> torch.Tensor:
    """The first ``count`` training images of the run's data as float network inputs."""
    image_size = cfg.get("image_size") if cfg["dataset"] == "imagefolder" else None
    splits = load_dataset(cfg["dataset"], cfg.get("data_dir"), cfg.get("val_split"), cfg.get("train_limit"),
                          image_size)
    images = splits.train.images[:count]
    if not isinstance(images, torch.Tensor):
        raise ConfigError("calibration reads in-memory data sets only (not an image folder)")
    mean = cfg.get("channel_mean")
    v = pixels_to_int8(images, None if mean is None else tuple(int(m) for m in mean))
    return v.to(torch.float64) * 2.0**PIXEL_EXPONENT


def _source_accuracy(run_dir: Path) -> float | None:
    from intrain.run.metrics import read_metrics

    try:
        rows = read_metrics(run_dir / "metrics.csv")
    except (OSError, ValueError):
        return None
    return float(rows[-1]["eval_acc"]) if rows else None


def read_source(run_dir: Path) -> tuple[dict, dict]:
    """The run's config and model payload, checked (one-line ``ConfigError`` otherwise)."""
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} does not exist or is not a directory: pass a run to --run")
    cfg = read_config(run_dir)
    saved = read_model(run_dir)
    if not same_json(cfg, saved.get("config")):
        raise ConfigError(f"{run_dir / 'config.json'} differs from the config recorded in {run_dir / 'model.pt'}")
    if "ternary" in cfg:
        raise ConfigError(f"{run_dir} already holds a ternary model: ternarise the int8 or float run it came from")
    return cfg, saved


def ternarize_run(run_dir, out, settings: TernarySettings, overwrite: bool = False) -> dict:
    """Convert the run in ``run_dir`` and save it in ``out``; returns the ``"ternary"`` config section."""
    settings.check()
    run_dir, out = Path(run_dir), Path(out)
    if out.resolve() == run_dir.resolve():
        raise ConfigError("--out must differ from --run: the source run is kept as it is")
    cfg, saved = read_source(run_dir)
    check_out(str(out), overwrite)
    int_model, float_net, layers = load_source(cfg, saved, run_dir)
    calibration = calibration_batch(cfg, settings.calibration_images) if settings.ranking == "perturbation" else None
    model, kept = convert(int_model, float_net, layers, settings, calibration)
    section = dict(asdict(settings), source_run=str(run_dir.resolve()), source_arith=cfg["arith"],
                   source_eval_acc=_source_accuracy(run_dir), residual_edges=kept,
                   groups=sum(int(t.alpha.shape[1] * t.alpha.shape[2]) for t in ternary_layers(model)),
                   bias=layers[0].bias is not None)
    new_cfg = dict(cfg, out=str(out), ternary=section)
    folder, lock = make_out_dir(out, overwrite, "", command="intrain ternarize")
    with lock:
        record_files(folder, "config.json", "model.pt")
        save_json(folder / "config.json", new_cfg)
        save_model(folder / "model.pt", new_cfg, model)
    return section
