"""What a training run depends on: ``TrainConfig``, the names of its choices, and the checks
that need no data (each raising ``ConfigError`` with one line saying what is wrong and what to do).

A config holds the options every run has (data, model, epochs, batch, seed, device, output) and,
in ``options``, those of its method (``--arith``; see ``intrain.methods``), by field name.
``TrainConfig.resolved()`` fills every ``None`` from the recipe (``intrain.run.recipes``), makes
the data folder an absolute path (so that the run can be resumed and evaluated from any current
folder), and checks the method's options: one given to a method that does not take it is an error.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields, replace

import torch

from intrain.data import DATASETS, default_data_dir
from intrain.data.imagefolder import DEFAULT_IMAGE_SIZE
from intrain.data.moving_mnist import DEFAULT_FRAME_SIZE, FRAME_SIZES
from intrain.methods import METHODS, MethodOptionError, get_method
from intrain.models import MODELS
from intrain.models.build import LSTM_KEEPS_BIASES
from intrain.models.zoo import DEFAULT_FORGET_BIAS, RECURRENT_MODELS, RecurrentOptions, check_hidden
from intrain.run.recipes import default_recipe

DEVICES = ("cpu", "cuda")
#: Options that may differ on resume: they do not change any number a run computes.
RESUME_FREE = ("workers", "checkpoint_every")


class ConfigError(ValueError):
    """Bad user input; the message is one line saying what is wrong and what to do."""


@dataclass
class TrainConfig:
    """Everything a training run depends on. ``None`` means "the recipe's default"."""

    dataset: str = "digits"
    model: str = "mlp"
    arith: str = "int8"  # the method, a key of intrain.methods.METHODS
    data_dir: str | None = None
    epochs: int | None = None
    batch_size: int | None = None
    seed: int = 0
    val_split: int | None = None
    tune_split: int | None = None  # evaluate on the images just before the validation split (recipe tuning)
    train_limit: int | None = None
    device: str = "cpu"
    out: str | None = None  # default: runs/<dataset>-<model>-<arith>-<k>, first free k
    overwrite: bool = False
    width: float = 1.0  # multiplies every layer's channel / unit count
    hidden: list[int] | None = None  # the MLP's hidden layer sizes; None: models.zoo.MLP_HIDDEN
    augment: bool | None = None  # random crop + flip; default: on for cifar10 and imagefolder
    workers: int = 0  # data loader processes; results are identical for any number
    checkpoint_every: int | None = None  # also checkpoint every N global steps
    image_size: int | None = None  # imagefolder: side of the square crops; default 224 (None elsewhere)
    tr_rank: int | None = None  # tt-lstm / tr-lstm: tensor rank (models.zoo.RecurrentOptions)
    tr_input_factors: str | None = None  # tt-lstm / tr-lstm: factors of the frame size, "4x8x8x4"
    tr_hidden_factors: str | None = None  # tt-lstm / tr-lstm: factors of the hidden size, "4x8x4"
    lstm_forget_bias: float | None = None  # every LSTM: the forget gate's bias (models.zoo.RecurrentOptions)
    options: dict = field(default_factory=dict)  # the method's own options; None = recipe default

    @property
    def method(self):
        """The method class (``ConfigError`` for an unknown name)."""
        try:
            return get_method(self.arith)
        except MethodOptionError as err:
            raise ConfigError(str(err)) from None

    @property
    def recurrent(self) -> RecurrentOptions:
        """The recurrent models' options (``models.zoo``)."""
        return RecurrentOptions(self.tr_rank, self.tr_input_factors, self.tr_hidden_factors, self.lstm_forget_bias)

    def method_options(self):
        """The method's options object (``ConfigError`` when one does not fit the method)."""
        try:
            return self.method.make_options(self.options, {})
        except (MethodOptionError, TypeError, ValueError) as err:
            raise ConfigError(str(err)) from None

    def resolved(self) -> "TrainConfig":
        """A copy with every recipe default filled in and the method's options checked."""
        method = self.method
        recipe = default_recipe(self.dataset, self.model, self.arith, self.tr_rank)
        batch = recipe.batch_size if self.batch_size is None else self.batch_size
        try:
            options = method.make_options(self.options, recipe.options_for(batch))
        except (MethodOptionError, TypeError, ValueError) as err:
            raise ConfigError(str(err)) from None
        data_dir = self.data_dir
        if data_dir is None and self.dataset in DATASETS and self.dataset != "digits":  # digits: bundled
            data_dir = default_data_dir(self.dataset)
        if data_dir is not None:
            data_dir = os.path.abspath(data_dir)
        return replace(
            self,
            data_dir=data_dir,
            epochs=recipe.epochs if self.epochs is None else self.epochs,
            batch_size=batch,
            augment=(self.dataset in ("cifar10", "imagefolder")) if self.augment is None else bool(self.augment),
            image_size=(self.image_size if self.image_size is not None
                        else DEFAULT_IMAGE_SIZE if self.dataset == "imagefolder"
                        else DEFAULT_FRAME_SIZE if self.dataset == "moving-mnist-actions" else None),
            lstm_forget_bias=(DEFAULT_FORGET_BIAS if self.lstm_forget_bias is None and self.model in RECURRENT_MODELS
                              else self.lstm_forget_bias),
            options=method.options_dict(options),
        )

    def as_flat_dict(self) -> dict:
        """The common fields and the method's options side by side (config.json's layout)."""
        flat = asdict(self)
        options = flat.pop("options")
        return {**flat, **options}

    @classmethod
    def from_dict(cls, saved: dict) -> "TrainConfig":
        """The config saved as ``asdict`` (with ``options``) or, by checkpoints of intrain 0.1, as one
        flat dict holding every method's options (those of other methods are dropped)."""
        common = {f.name for f in fields(cls)} - {"options"}
        unknown = set(saved) - common - {"options"} - {n for m in METHODS.values() for n in m.option_names()}
        if unknown:
            raise TypeError(f"unknown config fields {', '.join(sorted(unknown))}")
        config = cls(**{k: v for k, v in saved.items() if k in common})
        if "options" in saved:
            options = dict(saved["options"])
            if config.arith == "int8" and "mu_schedule" in options and "core_update" not in options:
                # Saved before --core-update existed: those runs updated every core with NITI's rule
                # and the one mu schedule (the tr-lstm recipe now says otherwise).
                options.update(core_update="niti", core_mu_schedule=options["mu_schedule"])
            options.setdefault("label_smoothing", 0.0)  # saved before --label-smoothing existed (recipes may say 0.1)
            if config.arith in ("int8", "dfp16"):
                options.setdefault("biases", "off")  # saved before --biases existed: no biases (recipes may say on)
            if config.arith == "dfp16":
                options.setdefault("optimizer", "sgd")  # saved before DFP16 took the float twin's optimiser
            if config.arith == "int8":
                options.setdefault("update", "niti")  # saved before --update existed: NITI's was the only one
                options.setdefault("relu_scale", "magnitude")  # saved before --relu-scale existed: NITI's scale
                options.setdefault("activation_rounding", "nearest")  # saved before --activation-rounding existed
            return replace(config, options=options)
        names = config.method.option_names()
        options = {k: v for k, v in saved.items() if k in names}
        options["label_smoothing"] = 0.0  # intrain 0.1 had no label smoothing
        if options.get("weight_bits") == 16 and options.get("mu_schedule"):
            # intrain 0.1 counted mu in bits of the int16 master, 0.2 counts int8 steps (methods.update)
            from intrain.methods.update import MuSchedule

            options["mu_schedule"] = str(MuSchedule.parse(options["mu_schedule"]).shifted(-8))
        if config.arith == "int8":  # the flat dict's lr is the float twin's: 0.1 had NITI's update only
            options.pop("lr", None)
            options.update(update="niti", relu_scale="magnitude", biases="off", activation_rounding="nearest")
        return replace(config, options=options)


def check_args(c: TrainConfig) -> None:
    """Argument checks that need no data (the CLI's argparse does most of them too)."""
    if c.dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {c.dataset!r}: choose one of {', '.join(DATASETS)}")
    if c.model not in MODELS:
        raise ConfigError(f"unknown model {c.model!r}: choose one of {', '.join(MODELS)}")
    c.method_options()  # the method name and its options
    if c.options.get("float_params") == "integer" and c.model in RECURRENT_MODELS:
        raise ConfigError(f"--float-params integer is for the feed-forward models ({c.model}): {LSTM_KEEPS_BIASES}")
    if c.epochs < 0:
        raise ConfigError(f"--epochs must be 0 or more, got {c.epochs}")
    if c.batch_size < 1:
        raise ConfigError(f"--batch-size must be 1 or more, got {c.batch_size}")
    if c.seed < 0:
        raise ConfigError(f"--seed must be 0 or more, got {c.seed}")
    if not (c.width > 0 and c.width != float("inf")):
        raise ConfigError(f"--width must be a positive number, got {c.width}")
    try:
        check_hidden(c.model, c.hidden)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if c.workers < 0:
        raise ConfigError(f"--workers must be 0 or more, got {c.workers}")
    if c.dataset == "imagefolder":
        if isinstance(c.image_size, bool) or not isinstance(c.image_size, int) or c.image_size < 1:
            raise ConfigError(f"--image-size must be an integer >= 1, got {c.image_size!r}")
    elif c.dataset == "moving-mnist-actions":
        if c.image_size not in FRAME_SIZES:
            raise ConfigError(f"--image-size of moving-mnist-actions frames must be "
                              f"{' or '.join(map(str, FRAME_SIZES))}, got {c.image_size!r}")
        if c.augment:
            raise ConfigError("--augment does not apply to moving-mnist-actions (a mirrored clip would turn "
                              "left into right): leave it out")
    elif c.image_size is not None:
        raise ConfigError(f"--image-size applies to --dataset imagefolder only ({c.dataset} images have a fixed "
                          "size): leave it out")
    if c.checkpoint_every is not None and c.checkpoint_every < 1:
        raise ConfigError(f"--checkpoint-every must be 1 or more, got {c.checkpoint_every}")
    if c.device not in DEVICES:
        raise ConfigError(f"unknown device {c.device!r}: choose one of {', '.join(DEVICES)}")
    if c.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is available: use --device cpu")
