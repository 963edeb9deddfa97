"""Default training recipes: epochs, batch size, int8 mu schedule and float learning rate.

One place holds the numbers a run uses when the command line does not say otherwise, so that
a run's defaults can be looked up (and tuned) without reading the training loop.

The small-image int8 schedules decay mu like a learning rate over 20 epochs (digits: 4, 3 from
epoch 10, 2 from epoch 15; MNIST formats: 5, 4 from epoch 8, 3 from epoch 14, at batch 256 on
MNIST and 128 on Fashion-MNIST), and
int8 runs evaluate and save the mean weights of the current mu phase (``--weight-average``, see
``intrain.methods.averaging``); measured results are in BENCHMARKS.md. The CIFAR-10 one is NITI's
published schedule (mu 5, then 4 from epoch 100, then 3 from epoch 150, 200 epochs, batch 256).
The float learning rate is 0.05 at batch 64 and scales linearly with the batch size (the usual
linear-scaling rule for SGD with momentum), so a changed ``--batch-size`` keeps a sound recipe.
Some int8 recipes replace NITI's update by that SGD recipe on integer masters (``--update sgd``,
``_INT8_OPTIONS_BY_MODEL``): they train at the int8 batch size with the float rate scaled to it,
or with their own rate, and without weight averaging; the TR-LSTM's takes the float twin's AdamW
recipe on integer masters (``--update adamw``) at the twin's AdamW rate. Label smoothing is a
setting of the loss target, so a recipe takes it for every arithmetic or for none
(``_LABEL_SMOOTHING``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from intrain.models.zoo import RECURRENT_MODELS, VGG_SMALL_STAGES

#: Float learning rate at the reference batch size ``LR_REFERENCE_BATCH``.
BASE_LR = 0.05
LR_REFERENCE_BATCH = 64


@dataclass(frozen=True)
class Recipe:
    """Defaults for one (dataset, model, method): epochs, batch size, and the method's options
    (``options_for`` scales a learning rate ``lr`` given at ``batch_size`` to another batch)."""

    epochs: int
    batch_size: int
    options: dict = field(default_factory=dict)

    def options_for(self, batch_size: int) -> dict:
        """The method options for training at ``batch_size`` (linear learning-rate scaling, of the
        AdamW rate an int8 recipe names for ``--update adamw`` too)."""
        return {name: value * batch_size / self.batch_size if name in _RATES else value
                for name, value in self.options.items()}


#: Recipe options that are learning rates (scaled linearly with the batch size).
_RATES = ("lr", "adamw_lr")


def scaled_lr(batch_size: int) -> float:
    """``BASE_LR`` scaled linearly from batch ``LR_REFERENCE_BATCH`` to ``batch_size``."""
    return BASE_LR * batch_size / LR_REFERENCE_BATCH


# (epochs, batch_size, int8 mu schedule) per dataset, for every model without its own entry below.
_BY_DATASET = {
    "digits": (20, 32, "0:4,10:3,15:2"),
    "mnist": (20, 64, "0:5,8:4,14:3"),
    "fashion-mnist": (20, 64, "0:5,8:4,14:3"),
    "cifar10": (200, 256, "0:5,100:4,150:3"),
    "moving-mnist-actions": (20, 64, "0:4"),  # 20 epochs: see _FLOAT_OPTIMIZER
}
_FALLBACK = (20, 64, "0:5")

# The int8 engine's update is normalised to mu bits, so its step size does not shrink with the
# gradient; larger batches average out more rounding and sampling noise per step. Measured on
# MNIST LeNet-5 (BENCHMARKS.md): batch 64 with mu 4-3-2 peaked near 98.6 % and then degraded,
# batch 256 with mu 5-4-3 kept improving. On Fashion-MNIST, where int8 under-fits, batch 128
# (twice the steps, with weight averaging to absorb their noise) ended 0.46-0.89 points below
# float on three seeds against 0.90-1.34 at batch 256 (validation split). The float twin keeps
# its own best batch of 64. The SGD update (``--update sgd``) takes the same int8 batch, with the
# float twin's rate scaled to it unless a model's entry below says otherwise: Fashion-MNIST
# LeNet-5 at batch 128 and rate 0.1 ended at a mean tuning accuracy of 91.46 % over seeds 0-4,
# at the float twin's 64 and 0.05 at 91.22 %, at 256 and 0.2 at 90.97 %.
_INT8_BATCH = {"mnist": 256, "fashion-mnist": 128}

# int8 mu by (dataset, model) where it differs from the dataset's. The tensor LSTMs change
# every core by up to 2**mu steps at once, and the cores multiply: at mu 4 the int8 TR-LSTM
# stayed near chance for 2 epochs (15.1 %, 10,000 clips, validation split), at mu 2 it reached
# 34.0 % (the dense LSTM at mu 4: 61.9 %). Dropping mu by one for the last third of the run is
# what made the 3-epoch runs on that split train (TR-LSTM, NITI's update, mu 3 then 2: 63.70,
# 58.55, 63.50 % on seeds 0-2 against 52.70 % at mu 3 throughout; TT-LSTM mu 2 then 1: 55.45 against
# 49.15 %); the recipe's 20 epochs drop at epoch 14 in the same proportion (measured at neither
# 10 nor 20 epochs).
# The TR-LSTM's other layers keep the dense LSTM's mu 4; its cores have their own schedule below.
_INT8_MU = {("moving-mnist-actions", "tt-lstm"): "0:2,14:1", ("moving-mnist-actions", "tr-lstm"): "0:4"}

# int8 update of tensor cores by (dataset, model) where it is not NITI's (``methods.update``),
# with the cores' own mu schedule. TR-LSTM rank 8, 3 epochs, validation split: the sign rule with
# mu 2 then 1 ended at 63.00, 62.10 and 60.45 % (seeds 0-2), NITI's rule with mu 3 then 2 at
# 63.70, 58.55 and 63.50 %: the same mean (61.85 against 61.92 %), half the spread, and a faster
# start (epoch 2: 52.60 against 35.25 % on seed 0). With the other layers at the dense LSTM's mu 4
# and the cores signed at mu 2 then 1: 63.45, 66.70 and 62.90 % (mean 64.35 %). TT-LSTM: the sign
# rule did worse (37.75 against 49.15 % at mu 2), so it keeps NITI's.
# At the recipe's length, after the gate errors of all steps kept 8 more bits (``layers.recurrent``;
# 10 epochs of the 50,000 clips before the 10,000 validation ones, seeds 0 and 1, epoch averaging
# below): the cores' drop from mu 2 to 1 at epoch 4 ended at 95.17 and 87.28 %, at epoch 7 at
# 92.45 and 87.46 %, mu 1 throughout at 74.23 and 87.27 % (BENCHMARKS.md, 2026-12-03). At 20
# epochs (seed 0) the drop at epoch 4 led the drop at epoch 8 at every epoch from the fifth to the
# fifteenth, where the second run was stopped (98.80 against 98.52 %; BENCHMARKS.md, 2026-12-04),
# so it stays at epoch 4.
_INT8_CORE_UPDATE = {("moving-mnist-actions", "tr-lstm"): ("sign", "0:2,4:1")}  # rule, the cores' mu

# int8 weight averaging by dataset where it is not the mean of the current mu phase. The recurrent
# models' non-core layers keep mu 4 for the whole run, so a phase average reaches back to the first
# steps; the mean of each epoch (10 epochs of the 50,000 clips before the 10,000 validation ones,
# seed 1, the code with wide gate errors): TR-LSTM 87.46 % against 74.68 % (cores dropping at epoch
# 7), dense LSTM 87.95 % against 77.34 % (BENCHMARKS.md, 2026-12-03). The TT-LSTM follows its
# data set; it was measured with epoch averaging only (73.90 %).
_INT8_WEIGHT_AVERAGE = {"moving-mnist-actions": "epoch"}


# int8 options by (dataset, model) where they are not NITI's (its update, nearest error rounding,
# int8 weights, no weight decay), all chosen on a tuning split (issue 17: the 5,000 Fashion-MNIST
# training images before the 10,000 validation ones, LeNet-5, 20 epochs; BENCHMARKS.md). An entry
# names the options of both updates; ``methods.niti`` keeps those of the update it runs:
# - the SGD update (the float twin's recipe on int32 masters, ``methods.sgd_fixed``), batch 128,
#   rate 0.14: tuning accuracy 91.46 / 91.60 / 91.40 / 91.38 / 91.62 on seeds 0-4 (mean 91.49, the
#   float twin's) against NITI's update with the options below 91.32 / 91.14 / 90.90 / 90.50 /
#   91.26 (mean 91.02); means of other rates at batch 128: 0.07 91.21, 0.1 (the float twin's 0.05
#   scaled linearly) 91.46, 0.2 91.03; at batch 64 and 0.05 91.22, at 256 and 0.2 90.97; nearest
#   error rounding (batch 64, seeds 0-1) no better than stochastic;
# - stochastic error rounding ended 0.20, 0.10 and 0.40 points above nearest on seeds 0-2 (an
#   earlier session; gap to float 0.42 / 1.10 / 0.76 against 0.62 / 1.20 / 1.16);
# - with NITI's update, int16 master weights and integer weight decay at K = 18
#   (``methods.update``): tuning accuracy 91.32 / 91.14 / 90.90 / 90.50 / 91.26 on seeds 0-4 (mean
#   91.02, gap to float 0.46) against 91.06 / 90.40 / 90.52 / 90.82 / 90.68 without either (mean
#   90.70, gap 0.79); K = 16 ended at a mean of 90.99, the masters without decay at 90.48 / 90.54
#   (seeds 0-1), the decay without masters at K = 17 and 20 no better than without (int8 weights
#   decay by whole steps).
# - ``relu_scale="positive"`` (the layers before a ReLU scale their output from its largest positive
#   value; ``numeric.formats``), on the 10,000 training images before the validation ones
#   (``--val-split 10000 --tune-split 10000``, seeds 0-4): 91.55 / 90.94 / 91.21 / 91.40 / 91.26
#   (mean 91.27, every seed within 0.27 of the float twin) against 91.39 / 90.22 / 91.46 / 91.14 /
#   91.05 with NITI's scale (mean 91.05); float32 91.67 / 91.20 / 91.48 / 91.40 / 91.42.
# - integer biases (``--biases on``, ``layers.base``) on the same split and seeds, the rest of the
#   entry unchanged: 91.74 / 91.22 / 91.39 / 91.39 / 91.56 (mean 91.46, +0.19 over the entry without
#   them, each seed -0.01 to +0.30); at rate 0.1 91.15 / 91.25 / 91.34 / 91.73 / 91.68 (mean 91.43,
#   +0.20 over rate 0.1 without them). The float twin has biases; trained without them (and from the
#   integer models' Kaiming-scale start) it scored 91.30 (BENCHMARKS.md, thirtieth and thirty-first
#   sessions).
# - not adopted on the same split and seeds (thirty-sixth session): stochastic activation rounding
#   (``--activation-rounding stochastic``) mean 91.28 (every seed below), batch 256 at rate 0.2
#   90.26 (at the linear 0.28 one seed diverged; the float twin at batch 256 and rate 0.2 never left
#   chance on three seeds of five, thirty-seventh session: the rate, not the arithmetic).
# The MLP 784-512-256-10 on Fashion-MNIST (same split, 20 epochs, batch 128, seeds 0-2): the SGD
# update with stochastic error rounding 90.14 / 89.94 / 90.24 (mean 90.11, gap to float 0.38)
# against NITI's 89.64 / 89.64 / 89.56 (mean 89.61) and NITI's with the LeNet-5 options above
# 89.44 / 89.48 / 89.60.
# ResNet-18 (width 0.25) on MNIST, one epoch of 6,000 images, evaluated on 5,000 carved from the
# training images (``--val-split 5000 --train-limit 6000``, batch 64, the test split unseen): the
# SGD update at the float twin's rate 0.05 reached 96.02 / 96.52 % (seeds 0-1) against 90.36 /
# 92.92 % with NITI's update at mu 1 (the recipe's) and 97.30 % for the float twin (seed 0). Its
# rate, 3 epochs of 20,000 images on the same kind of split (``--val-split 5000 --train-limit 20000
# --epochs 3``, seeds 0-1, statistics rebuilt as evaluation now does): 0.025 98.74 / 98.82 %,
# 0.05 99.08 / 98.96 %, 0.1 98.96 / 99.18 %: level, so the float twin's 0.05 stays.
# ResNet-18 (width 0.25) on Fashion-MNIST, 3 epochs of 20,000 images, evaluated on the tuning split
# (``--val-split 10000 --tune-split 5000 --train-limit 20000 --epochs 3``, batch 64): the SGD
# update at rate 0.05 90.80 / 90.50 % (seeds 0-1) against NITI's update (mu 1) 86.16 / 85.28 %.
# Its errors are rounded stochastically, chosen on training images alone (no held-out accuracy):
# on ResNet-18 weights from mid-training (epoch 5 of a DFP16 run), the int8 weight gradients of 24
# batches of 64 training images, summed, against those of a 16-bit exact-sum model holding the
# same int8 weights, had cosines 0.53-0.74 in the first five layers with nearest rounding (a bias
# that summing does not remove) and 0.94-0.97 with stochastic (``python
# benchmarks/gradient_fidelity.py --run RUN --checkpoint``; BENCHMARKS.md, "Nearest error rounding
# biases ResNet-18's int8 gradients").
# VGG-small-7 width 0.25 on Fashion-MNIST (tuning split, 20 epochs, ``--val-split 10000
# --tune-split 5000``): with the integer dropout scaling its kept values as the float twin's does
# (since commit 25d1337) the SGD update at batch 128 and rate 0.1 (the float twin's 0.05 scaled)
# with stochastic error rounding reached 93.50 / 93.28 % (seeds 0-1) against NITI's update 92.78 /
# 92.98 % (training loss 0.06 against 0.11-0.12); float32 93.40 % (seed 0). Before that change the
# two updates were level (SGD 93.20 / 93.44, NITI 93.30 / 93.18). The stochastic error rounding of
# the entry also applies when ``--update niti`` is given; with NITI's update it was measured with
# nearest rounding only (the figures above), and on VGG-small-7's gradients the two roundings were
# alike (``benchmarks/gradient_fidelity.py``; BENCHMARKS.md).
# VGG-small-7's integer biases (``--biases on``), on the 10,000-image tuning split (``--val-split
# 10000 --tune-split 10000``, 20 epochs): 93.21 / 93.28 % (seeds 0-1) against 93.09 / 93.22 %
# without them; the float twin 93.16 / 93.73 % (its epochs: ``_INT8_EPOCHS``; BENCHMARKS.md,
# thirty-second session). Not adopted, on the same split with its 30 epochs (rule: a mean over
# seeds 0-3 at least 0.1 above the recipe's 93.38 / 93.57 / 93.43 / 93.56 %): twice the float twin's
# weight decay (``--weight-decay 0.001``) 93.33 / 93.52 % and the twin's batch (``--batch-size
# 64``, rate 0.05) 93.15 / 93.16 %, each stopped after seeds 0-1 as it could no longer pass
# (BENCHMARKS.md, thirty-fourth session); the mean of the masters at the ends of the last 10 epochs
# (``--weight-average last:10``) 93.55 / 93.61 / 93.55 / 93.52 % (seeds 0-3, +0.07) and of the last
# 15 93.47 / 93.66 / 93.46 / 93.63 % (+0.07), measured on the recipe's runs with
# ``benchmarks/epoch_average.py`` (BENCHMARKS.md, thirty-fifth session).
# Nor, on the same split and rule (thirty-sixth session), stochastic activation rounding
# (``--activation-rounding stochastic``) 93.38 / 93.27 % and batch 256 at rate 0.14 93.26 / 93.36 %
# (each stopped after seeds 0-1), or the rate at batch 128: 0.07 93.24 / 93.45 %, 0.14 93.21 /
# 93.39 % (seeds 0-1, below the recipe on both).
# Label smoothing 0.1 (``--label-smoothing``, thirty-ninth session, seeds 0-3 of the same split) lifted
# int8 and its float twin alike, so both recipes take it: ``_LABEL_SMOOTHING``.
# TR-LSTM on moving-mnist-actions (validation split: the 50,000 training clips before the last
# 10,000, 40 epochs, seeds 1-3, the seeds on which NITI's update with the sign rule for the cores
# stalled at 87.49 / 74.98 / 87.69 %): the AdamW update (the float twin's optimiser and rate, 3e-3 at
# batch 64, ``methods.adamw_fixed``) reached 98.94 / 90.32 / 95.19 % (mean 94.82 against 83.39;
# training accuracy 99.96 / 97.08 / 99.36 %); the int8 products with a float64 AdamW on float
# masters (a throwaway patch) had first left the same stall on seed 1 (99.16 % at epoch 30 of 40;
# BENCHMARKS.md, "int8 TR-LSTM: the float twin's AdamW as the update"). Its cores' NITI options stay for
# ``--update niti`` (``_INT8_CORE_UPDATE``). The TT-LSTM takes it too (validation split, 20 epochs,
# seeds 1-2: 81.34 / 88.95 % against NITI's update 76.38 / 79.84 %, whose runs ended with actions
# unlearnt, training accuracy 77.19 / 79.30 %; BENCHMARKS.md, "The int8 TR-LSTM rows with the LSTM
# fix"). The dense LSTM keeps NITI's update (not measured with AdamW; with NITI's its test rows are
# within 1.2 points of its float twin's or above them).
# Other models keep NITI's until they are measured the same way.
_INT8_OPTIONS_BY_MODEL = {
    ("fashion-mnist", "lenet5"): {"update": "sgd", "lr": 0.14, "error_rounding": "stochastic", "weight_bits": 16,
                                  "weight_decay_shift": 18, "relu_scale": "positive", "biases": "on"},
    ("fashion-mnist", "mlp"): {"update": "sgd", "error_rounding": "stochastic"},
    ("mnist", "resnet18"): {"update": "sgd"},
    ("fashion-mnist", "resnet18"): {"update": "sgd", "error_rounding": "stochastic"},
    ("fashion-mnist", "vgg-small-7"): {"update": "sgd", "error_rounding": "stochastic", "biases": "on"},
    ("moving-mnist-actions", "tr-lstm"): {"update": "adamw"},
    ("moving-mnist-actions", "tt-lstm"): {"update": "adamw"},
}

# The int8 TR-LSTM's AdamW rate falls with the ring's rank above 8: ``x min(1, 8 / rank)``
# (``int8_adamw_rank_factor``). Chosen on the validation split at rank 16, 40 epochs, with the
# integer LSTM as it is now (``layers.recurrent`` adds the input map's term unclipped since
# 2026-12-05): seed 0 99.20 % at the twin's 3e-3 and 98.86 % at 1.5e-3; seed 1 88.17 % at 3e-3
# (one pair of actions never learnt: 87.0-87.8 % from epoch 8 to 29) and 97.43 % at 1.5e-3; mean
# 93.69 against 98.15 % (BENCHMARKS.md, "The int8 TR-LSTM rows with the LSTM fix"). Before that fix
# the factor had been chosen against a collapse at 3e-3 that the fix removed (seed 0: 61.56 % after
# epoch 11, 73.95 % at the end). A core's entries start at a scale that falls with the rank
# (``layers.tensor_ring``: fan-in ``2 r D`` or ``2 r``), and AdamW moves each entry by about the
# rate whatever its scale, so the same rate is a larger relative step at a larger rank. Ranks 4
# and 8 keep the rate they were measured at; the factor's form (8 / rank rather than its square
# root) was not measured. The TT-LSTM's AdamW rate stays the twin's at every rank (not measured).
ADAMW_REFERENCE_RANK = 8


def int8_adamw_rank_factor(model: str, rank: int | None) -> float:
    """The factor on the int8 TR-LSTM's AdamW rate at tensor-ring ``rank`` (None: the default 8; a
    rank below 1 is refused where the model is built)."""
    if model != "tr-lstm" or rank is None or rank < 1:
        return 1.0
    return min(1.0, ADAMW_REFERENCE_RANK / rank)


# Float optimiser and peak rate at batch 64 by dataset. On moving-mnist-actions (10,000 clips,
# validation split) the dense float LSTM stayed near chance for 5 epochs with SGD at 0.05 (14.7 %),
# and the tensor-ring LSTM with SGD at 0.5 (11.9 % after 2 epochs; 2 and 8 diverged), while
# Adam at 3e-3 reached 60.9 % in one epoch (BENCHMARKS.md). Every recurrent model takes 3e-3.
# The float TR-LSTM took 1e-2 for a while, chosen at 3 epochs of 10,000 clips (validation split:
# 69.45, 64.00 and 66.80 % on seeds 0-2, where 3e-3 swung from 38 to 67 %); at the recipe's length
# (10 epochs of the 50,000 training clips before the 10,000 validation ones) 1e-2 collapsed on
# seed 1 (40.90 %), with the gradient clipped to norm 1 it ended at 74.85, 91.41 and 71.95 %, and
# 3e-3 at 75.04, 89.63 and 87.70 % (BENCHMARKS.md). Seeds ending near 75 % had not learnt which
# way a digit turns or zooms; on seed 0 neither other input factors (4x8x4x8: 75.19 %), nor no
# weight decay (74.66 %), nor 1e-3 (86.84 %) did what twice the steps did: 20 epochs at 3e-3
# reached 98.08, 96.94 and 94.75 % (seeds 0-2), and the int8 TR-LSTM at 20 epochs 99.27 and
# 87.96 % (seeds 0-1, against 95.17 and 87.28 % at 10; BENCHMARKS.md, 2026-12-04). So the data
# set's recipe runs 20 epochs, for every model (the dense and TT-LSTMs were not tuned at 20), and
# the TR-LSTM 40 (``_BY_DATASET_AND_MODEL``). DFP16 takes the same optimiser and rate (Das et al.
# keep the float recipe; with SGD at 0.05 the DFP16 TR-LSTM stayed near chance, BENCHMARKS.md
# "DFP16 takes the float twin's AdamW").
_FLOAT_OPTIMIZER = {"moving-mnist-actions": ("adamw", 3e-3)}

# Float initialisation by model where it is not PyTorch's default (``methods.float_twin``). The
# VGG-small models are plain ReLU stacks without normalisation, which the default's sixth of
# Kaiming's variance shrinks at every layer: VGG-small-7 width 0.5 on Fashion-MNIST (seed 0,
# batch 64, rate 0.05) stayed at chance (training loss 2.29 and 2.30 in epochs 1 and 2; the
# integer models start from Kaiming's scale, ``layers.init``). Kaiming-uniform is the usual
# choice for such networks; the other float models keep the default they were measured with.
_FLOAT_INIT_BY_MODEL = {f"vgg-small-{depth}": "kaiming" for depth in VGG_SMALL_STAGES}


# Label smoothing of the cross-entropy target by (dataset, model), for every arithmetic alike: it
# regularises float32 and int8 training the same way, so a recipe takes it for all three or none
# (int8 alone would be measured against a twin without it, and DFP16 keeps the float recipe).
# VGG-small-7 on Fashion-MNIST, the 10,000-image tuning split (``--val-split 10000 --tune-split
# 10000``, width 0.25, seeds 0-3, each arithmetic at its recipe): 0.1 lifted int8 from 93.38 /
# 93.57 / 93.43 / 93.56 to 93.68 / 93.57 / 93.49 / 93.87 % (mean +0.17) and the float32 twin from
# 93.60 / 93.72 / 93.60 / 93.52 to 93.77 / 93.98 / 93.56 / 93.75 % (+0.16), by a rule written
# before the runs (BENCHMARKS.md, "label smoothing lifts VGG-small-7's int8 and float32 alike").
# Reported once on the validation split (nothing chosen on it; seeds 0-4, float32 on an Intel Xeon):
# int8 93.69 / 93.81 / 93.73 / 94.06 / 93.80 %, the float32 twin 93.82 / 93.98 / 93.82 / 93.71 / 93.91 %
# (mean gap -0.03; before it int8 93.05 / 93.07 / 93.55 / 93.22 / 93.05 %; BENCHMARKS.md, forty-first
# session); integer-only DFP16 with it 93.81 / 93.89 % (seeds 0-1, the twin 93.82 / 93.98 %). Other
# models keep none (not measured).
_LABEL_SMOOTHING = {("fashion-mnist", "vgg-small-7"): 0.1}


# int8 epochs by (dataset, model) where they are more than the float twin's, at no more than the
# float twin's cost. VGG-small-7 on Fashion-MNIST: an int8 epoch (the recipe's batch 128, biases)
# took 0.59-0.73x a float32 epoch (batch 64) on an AMD Zen 5, at one and at two threads (12,800
# images, ``intrain train ... --model vgg-small-7 --width 0.25 --train-limit 12800 --epochs 1``),
# so 30 int8 epochs cost about what float32's 20 do there (on a CPU without int8 dot products an
# int8 step of VGG-small-7 took 1.04-1.10x float32's, so there they cost about 1.5x: BENCHMARKS.md,
# "On a CPU without int8 dot products: AMD EPYC Zen 3"). On the 10,000-image tuning
# split (width 0.25, with biases) 30 epochs reached 93.38 / 93.57 % (seeds 0-1) against 93.21 /
# 93.28 % at 20 (BENCHMARKS.md, thirty-second session). Only the SGD update's schedule stretches
# with the epochs; ``--update niti`` keeps the data set's mu schedule, which names epochs.
_INT8_EPOCHS = {("fashion-mnist", "vgg-small-7"): 30}


# (epochs, batch_size for both arithmetics, int8 mu schedule) for a (dataset, model) pair whose
# numbers differ from its dataset's. ResNet-18 with integer batch normalisation (layers.norm):
# the epochs issue 11 names, batch 64, and mu 1: of mu 2, 1 and 0 it was best after one epoch
# of 6,000 images (BENCHMARKS.md: validation split carved from MNIST's training images). The
# drop to mu 0 (8-bit weights cannot go lower) at 40 % of the epochs copies the dataset
# recipes' shape; it has not been measured yet.
# The tensor-ring LSTM runs 40 epochs (both arithmetics): at 20 the float TR-LSTM had not learnt
# which way a digit turns or zooms on 3 of 8 seeds (validation split, the 50,000 training clips
# before the last 10,000: 76.10 / 78.36 / 75.86 % on seeds 3, 4, 7, where seeds 0-2, 5, 6 reached
# 94.75-98.08 %); at 40 the same seeds reached 99.05 / 96.81 / 85.67 %. The int8 TR-LSTM's seed 1,
# stuck at 87.96 % after 20 epochs, ended at 87.49 % after 40 (no better, no worse); its schedules
# name epochs, so they are unchanged (BENCHMARKS.md, "TR-LSTM: what the forget-gate bias and the
# run's length do"). The dense and TT-LSTMs keep the data set's 20 (not measured at 40).
_BY_DATASET_AND_MODEL = {
    ("mnist", "resnet18"): (10, 64, "0:1,4:0"),
    ("fashion-mnist", "resnet18"): (15, 64, "0:1,6:0"),
    ("moving-mnist-actions", "tr-lstm"): (40, 64, "0:4"),
}


# Models with batch normalisation evaluate the latest int8 weights: the running statistics
# gathered in training (layers.norm) followed the latest weights, and the mean weights of a phase
# did not match them (MNIST tuning split, ResNet-18, mu 1, 6,000 images: 30.16 % with phase
# averaging against 69.80 % training accuracy in the same epoch; BENCHMARKS.md). Evaluation now
# rebuilds the statistics from the weights it evaluates (run.loop.latest_statistics); averaging
# with NITI's update has not been measured again (the recipes take the SGD update, which refuses it).
_NORMALISED_MODELS = ("resnet18",)

# DFP16 keeps the float recipe unchanged (Das et al.), and its network: biases in every convolution
# and linear layer where the float twin has them (not before batch normalisation, not in the LSTMs,
# ``models.build.biases_refused``). On Fashion-MNIST LeNet-5's tuning split (``--val-split 10000
# --tune-split 10000``, 20 epochs, seeds 0-2) integer-only DFP16 with biases reached 91.82 / 91.10 /
# 91.41 % (mean 91.44) against 91.34 / 90.61 / 91.22 % (mean 91.06) without them (BENCHMARKS.md,
# thirty-first session).
_DFP16_WITHOUT_BIASES = _NORMALISED_MODELS + RECURRENT_MODELS


def default_recipe(dataset: str, model: str, method: str, rank: int | None = None) -> Recipe:
    """The default recipe for training ``model`` on ``dataset`` with ``method`` ("int8", "dfp16" or
    "float"; DFP16 keeps the float twin's recipe unchanged, as Das et al. do).

    A (dataset, model) pair with its own numbers takes them (``_BY_DATASET_AND_MODEL``); every
    other model shares its dataset's. Unknown datasets get a generic recipe rather than an error
    (the CLI validates names before it gets here). An int8 recipe names the options of both
    updates (``methods.niti`` keeps the chosen one's); the SGD update's learning rate is the float
    twin's, scaled linearly to the int8 batch size; the int8 TR-LSTM's AdamW rate also falls with the
    ring's ``rank`` above 8 (``int8_adamw_rank_factor``).
    """
    if (dataset, model) in _BY_DATASET_AND_MODEL:
        epochs, batch_size, mu = _BY_DATASET_AND_MODEL[dataset, model]
    else:
        epochs, batch_size, mu = _BY_DATASET.get(dataset, _FALLBACK)
        if method == "int8":
            batch_size = _INT8_BATCH.get(dataset, batch_size)
    if method == "int8":
        options = {"mu_schedule": _INT8_MU.get((dataset, model), mu), "lr": scaled_lr(batch_size)}
        if _FLOAT_OPTIMIZER.get(dataset, ("sgd",))[0] == "adamw":  # --update adamw's rate: the float twin's
            options["adamw_lr"] = (_FLOAT_OPTIMIZER[dataset][1] * batch_size / LR_REFERENCE_BATCH
                                   * int8_adamw_rank_factor(model, rank))
        options.update(_INT8_OPTIONS_BY_MODEL.get((dataset, model), {}))
        if (dataset, model) in _INT8_CORE_UPDATE:
            rule, core_mu = _INT8_CORE_UPDATE[dataset, model]
            options.update(core_update=rule, core_mu_schedule=core_mu)
        if model in _NORMALISED_MODELS:
            options["weight_average"] = "none"
        if dataset in _INT8_WEIGHT_AVERAGE:
            options["weight_average"] = _INT8_WEIGHT_AVERAGE[dataset]
        options.update(_label_smoothing(dataset, model))
        return Recipe(epochs=_INT8_EPOCHS.get((dataset, model), epochs), batch_size=batch_size, options=options)
    options = {"lr": scaled_lr(batch_size)}
    if dataset in _FLOAT_OPTIMIZER:  # DFP16 takes the float twin's optimiser too: its recipe unchanged
        optimizer, lr = _FLOAT_OPTIMIZER[dataset]
        options = {"lr": lr * batch_size / LR_REFERENCE_BATCH, "optimizer": optimizer}
    if method == "float" and model in _FLOAT_INIT_BY_MODEL:  # DFP16 starts from the integer initialisation
        options["weight_init"] = _FLOAT_INIT_BY_MODEL[model]
    if method == "dfp16" and model not in _DFP16_WITHOUT_BIASES:
        options["biases"] = "on"
    options.update(_label_smoothing(dataset, model))
    return Recipe(epochs=epochs, batch_size=batch_size, options=options)


def _label_smoothing(dataset: str, model: str) -> dict:
    """The recipe's ``label_smoothing`` option where ``_LABEL_SMOOTHING`` names one, else none."""
    return {"label_smoothing": _LABEL_SMOOTHING[dataset, model]} if (dataset, model) in _LABEL_SMOOTHING else {}
