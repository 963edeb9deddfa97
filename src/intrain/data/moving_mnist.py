"""Moving-MNIST actions: 10-frame clips in which one MNIST digit performs one of 8 actions.

Clip ``i`` of a split is made from digit ``i`` of the matching IDX file (training clips from the
training digits, test clips from the test digits) and is a pure function of ``(split, i, digit
i)``: its action and pose come from the counter-based generator (``numeric.rng``) keyed by the
fixed ``DATA_SEED``, the split and the clip index, so any subset of clips (``--train-limit``,
``--val-split``) is generated alone and equals the same clips of the whole set. Every number is
an integer: positions in 1/16 pixel, angles in 1/256 turn, sine and cosine by Bhaskara's integer
rational approximation (error below 0.002), bilinear sampling with 8-bit fractions.

Actions (labels): 0 move right, 1 move left, 2 move down, 3 move up, 4 rotate counter-clockwise,
5 rotate clockwise, 6 zoom in, 7 zoom out. Speeds per frame: S/16 pixels (2 at 32x32), 10/256
turn, 6/64 of the size range (digit height from 7/16 to 14/16 of the frame side S).

Why a single frame says nothing about the action: every pose parameter lives on a circle and
each action moves one of them at a constant speed around it. Positions wrap around the frame (a
torus: what leaves on the right re-enters on the left), angles wrap at a full turn, and the
size wraps from the largest back to the smallest. The start of every parameter is uniform on its
circle and independent of the action, so in every frame the pose is uniform and independent of
the action too: the Bayes-optimal classifier of one frame is at chance (1/8). Only the change
between frames tells the actions apart (``tests/test_moving_mnist.py`` trains a single-frame
classifier to show it).

Storage: a clip of T grayscale frames is an ``ImageDataset`` image with T channels (uint8
``[N, T, S, S]``), so batching, pixel conversion, integrity fingerprints and checkpoints take
clips unchanged; recurrent models read axis 1 as time (``layers.recurrent``). Augmentation is
refused for this data set (a mirror would turn left into right).
"""

from __future__ import annotations

import os

import torch

from intrain.data.dataset import DatasetSplits, ImageDataset, check_split_args
from intrain.data.errors import DataError
from intrain.data.idx import TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS, _find_pair, _load_pair
from intrain.numeric import rng

FRAMES = 10
FRAME_SIZES = (32, 64)
DEFAULT_FRAME_SIZE = 32
ACTIONS = ("move right", "move left", "move down", "move up", "rotate ccw", "rotate cw", "zoom in", "zoom out")
#: The data set's own seed (not the run's): every run sees the same clips.
DATA_SEED = 14
STREAM_CLIPS = 7
_SPLIT_IDS = {"train": 0, "test": 1}

SUBPIXEL = 16            # positions in 1/16 pixel
TURN = 256               # angles in 1/256 turn
ANGLE_SPEED = 10
SIZE_LEVELS = 64         # size phase: height (7/16 + 7/16 * z / 64) of the frame side
SIZE_SPEED = 6
TRIG_ONE = 1 << 14       # sine and cosine in Q14
DIGIT = 28
#: Draws per clip: action, x, y, angle, size phase.
_DRAWS = 5
#: Clips rendered at once: the int64 temporaries of a chunk stay near 100 MB at 64x64.
_CHUNK = 64


def _draws(split: str, index: torch.Tensor) -> torch.Tensor:
    """[len(index), _DRAWS] uniform 32-bit integers (int64) for the clips ``index`` of ``split``."""
    k1, k2 = rng.derive_key(DATA_SEED, _SPLIT_IDS[split], STREAM_CLIPS)
    counter = index.unsqueeze(1) * _DRAWS + torch.arange(_DRAWS, dtype=torch.int64)
    return rng.mix32(rng.mix32(counter ^ k1) ^ k2)


def sine_q14(angle: torch.Tensor) -> torch.Tensor:
    """``sin(2 pi angle / 256)`` in Q14 (int64) by Bhaskara I's approximation on each half turn,
    ``16 y (128 - y) / (5 * 128**2 - 4 y (128 - y))`` for ``y = angle mod 128``: integer division
    only, |error| < 0.0017 (of 1), exact 0 and 1 at multiples of a quarter turn."""
    a = angle % TURN
    y = a % (TURN // 2)
    p = y * (TURN // 2 - y)
    s = (16 * p * TRIG_ONE) // (5 * (TURN // 2) ** 2 - 4 * p)
    return torch.where(a >= TURN // 2, -s, s)


def _poses(draws: torch.Tensor, size: int) -> tuple[torch.Tensor, ...]:
    """Per clip and frame: centre x, y (1/16 pixel), angle (1/256 turn), size phase, all int64
    [clips, FRAMES], and the action [clips]."""
    action = draws[:, 0] % len(ACTIONS)
    span = size * SUBPIXEL
    x0, y0 = draws[:, 1] % span, draws[:, 2] % span
    a0, z0 = draws[:, 3] % TURN, draws[:, 4] % SIZE_LEVELS
    t = torch.arange(FRAMES, dtype=torch.int64)
    move = size  # size / 16 pixels per frame in 1/16 pixel
    step = {"x": torch.zeros_like(action), "y": torch.zeros_like(action),
            "a": torch.zeros_like(action), "z": torch.zeros_like(action)}
    for label, (axis, speed) in enumerate((("x", move), ("x", -move), ("y", move), ("y", -move),
                                           ("a", ANGLE_SPEED), ("a", -ANGLE_SPEED),
                                           ("z", SIZE_SPEED), ("z", -SIZE_SPEED))):
        step[axis] = torch.where(action == label, speed, step[axis])
    x = (x0.unsqueeze(1) + step["x"].unsqueeze(1) * t) % span
    y = (y0.unsqueeze(1) + step["y"].unsqueeze(1) * t) % span
    a = (a0.unsqueeze(1) + step["a"].unsqueeze(1) * t) % TURN
    z = (z0.unsqueeze(1) + step["z"].unsqueeze(1) * t) % SIZE_LEVELS
    return x, y, a, z, action


def render(digits: torch.Tensor, x, y, a, z, size: int) -> torch.Tensor:
    """Frames uint8 [clips, FRAMES, size, size] of ``digits`` (uint8 [clips, 28, 28]) at the poses
    (int64 [clips, FRAMES]) on a torus of side ``size``, by inverse mapping and bilinear sampling.

    Pixel centre ``p`` (1/16 pixel) is taken relative to the digit centre ``c`` modulo the side,
    into [-size/2, size/2); rotated back by the angle (Q14 trigonometry), divided by the
    magnification ``m = size * 4 * (64 + z) / 64`` / 256 (Q8; 0.5..1 at 32x32) and shifted to the
    digit's pixel grid; the four neighbours are weighted by 8-bit fractions and the sum rounded:
    ``|value| <= 255`` (the weights sum to 2**16)."""
    clips = digits.shape[0]
    span = size * SUBPIXEL
    grid = torch.arange(size, dtype=torch.int64) * SUBPIXEL + SUBPIXEL // 2
    dx = (grid.view(1, 1, 1, size) - x.view(clips, FRAMES, 1, 1) + span // 2) % span - span // 2
    dy = (grid.view(1, 1, size, 1) - y.view(clips, FRAMES, 1, 1) + span // 2) % span - span // 2
    cos = sine_q14(a + TURN // 4).view(clips, FRAMES, 1, 1)
    sin = sine_q14(a).view(clips, FRAMES, 1, 1)
    magnification = (size * 4 * (SIZE_LEVELS + z) // SIZE_LEVELS).view(clips, FRAMES, 1, 1)  # Q8
    # (dx, dy) is in 1/16 pixel and the rotation in Q14: the rotated offset is in 2**-18 pixel;
    # dividing by magnification / 2**8 and keeping 8 fraction bits divides by 4 * magnification.
    half_digit = (DIGIT * 256) // 2 - 128  # the digit's centre on its pixel grid (pixel i at i + 1/2), Q8
    u = torch.div(cos * dx + sin * dy, 4 * magnification, rounding_mode="floor") + half_digit
    v = torch.div(cos * dy - sin * dx, 4 * magnification, rounding_mode="floor") + half_digit
    col, fu = u >> 8, u & 255
    row, fv = v >> 8, v & 255
    flat = digits.reshape(clips, 1, DIGIT * DIGIT).to(torch.int64).expand(clips, FRAMES, DIGIT * DIGIT)
    total = torch.zeros_like(u)
    for dr, wr in ((0, 256 - fv), (1, fv)):
        for dc, wc in ((0, 256 - fu), (1, fu)):
            r, c = row + dr, col + dc
            inside = (r >= 0) & (r < DIGIT) & (c >= 0) & (c < DIGIT)
            index = (r.clamp(0, DIGIT - 1) * DIGIT + c.clamp(0, DIGIT - 1)).reshape(clips, FRAMES, -1)
            pixel = torch.gather(flat, 2, index).view_as(u)
            total += torch.where(inside, pixel, 0) * wr * wc
    return ((total + (1 << 15)) >> 16).clamp(0, 255).to(torch.uint8)


def make_clips(digits: torch.Tensor, split: str, index: torch.Tensor, size: int = DEFAULT_FRAME_SIZE
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips uint8 [len(index), FRAMES, size, size] and their actions (int64) for clip numbers
    ``index`` of ``split``, clip ``i`` made from ``digits[i]`` (uint8 [N, 28, 28])."""
    if size not in FRAME_SIZES:
        raise DataError(f"moving-mnist-actions frames are {' or '.join(map(str, FRAME_SIZES))} pixels square, "
                        f"got --image-size {size}")
    clips = torch.empty((len(index), FRAMES, size, size), dtype=torch.uint8)
    labels = torch.empty(len(index), dtype=torch.int64)
    for start in range(0, len(index), _CHUNK):
        part = index[start:start + _CHUNK]
        x, y, a, z, action = _poses(_draws(split, part), size)
        clips[start:start + len(part)] = render(digits[part], x, y, a, z, size)
        labels[start:start + len(part)] = action
    return clips, labels


def _clip_set(digits: torch.Tensor, split: str, start: int, stop: int, size: int) -> ImageDataset:
    clips, labels = make_clips(digits, split, torch.arange(start, stop, dtype=torch.int64), size)
    return ImageDataset(clips, labels, len(ACTIONS), "moving-mnist-actions")


def load_moving_mnist_actions(data_dir: str, size: int = DEFAULT_FRAME_SIZE, val_split: int | None = None,
                              train_limit: int | None = None, tune_split: int | None = None) -> DatasetSplits:
    """The clips of the MNIST IDX files in ``data_dir``, with ``make_splits``' meaning of
    ``val_split`` (the last N training clips), ``tune_split`` (the M clips before those) and
    ``train_limit`` (the first N of the rest); only the clips used are generated."""
    check_split_args(val_split, train_limit, tune_split)
    if size not in FRAME_SIZES:
        raise DataError(f"moving-mnist-actions frames are {' or '.join(map(str, FRAME_SIZES))} pixels square, "
                        f"got --image-size {size}")
    if not os.path.isdir(data_dir):
        raise DataError(f"data directory {data_dir} is not a folder: pass --data-dir pointing at the MNIST IDX files")
    where = "--data-dir pointing at the folder with the MNIST IDX files"
    train_digits = _load_pair(*_find_pair(data_dir, (TRAIN_IMAGES, TRAIN_LABELS),
                                          lambda s: f"training file {os.path.join(data_dir, s)}[.gz] missing: pass {where}"),
                              "mnist").images[:, 0]
    n = train_digits.shape[0]
    if tune_split is not None:
        end = n - (val_split or 0)
        if val_split is not None and val_split >= n:
            raise DataError(f"--val-split must be smaller than the {n} training clips, got {val_split}")
        if tune_split >= end:
            raise DataError(f"--tune-split must be smaller than the {end} training clips"
                            f"{' left by --val-split' if val_split else ''}, got {tune_split}")
        stop = end - tune_split if train_limit is None else min(train_limit, end - tune_split)
        evaluation, eval_name = _clip_set(train_digits, "train", end - tune_split, end, size), "tuning"
    elif val_split is not None:
        if val_split >= n:
            raise DataError(f"--val-split must be smaller than the {n} training clips, got {val_split}")
        stop = n - val_split if train_limit is None else min(train_limit, n - val_split)
        evaluation, eval_name = _clip_set(train_digits, "train", n - val_split, n, size), "validation"
    else:
        test_paths = _find_pair(data_dir, (TEST_IMAGES, TEST_LABELS),
                                lambda s: f"no test split in {data_dir} ({s}[.gz] missing): pass --val-split N")
        test_digits = _load_pair(*test_paths, "mnist").images[:, 0]
        stop = n if train_limit is None else min(train_limit, n)
        evaluation, eval_name = _clip_set(test_digits, "test", 0, test_digits.shape[0], size), "test"
    return DatasetSplits(train=_clip_set(train_digits, "train", 0, stop, size), eval=evaluation,
                         eval_name=eval_name, channel_mean=None)
