"""Data sets for intrain: uint8 images [N, C, H, W] (0..255), int64 labels.

``load_dataset(name, ...)`` returns ``DatasetSplits``: in-memory ``ImageDataset`` splits, or for
"imagefolder" (``intrain.data.imagefolder``) splits decoded from image files when a batch is read,
at ``image_size`` x ``image_size`` pixels. ``pixels_to_int8`` turns
uint8 pixels into int8 inputs with scale ``2**PIXEL_EXPONENT`` using integer
arithmetic only (range [0, 127] without a mean, [-127, 127] with one).
"""

from __future__ import annotations

import os

from intrain.data.dataset import DatasetSplits, ImageDataset
from intrain.data.errors import DataError
from intrain.data.idx import find_idx, read_idx
from intrain.data.pixels import PIXEL_EXPONENT, pixels_to_int8

__all__ = ["DATASETS", "DataError", "DatasetSplits", "ImageDataset", "PIXEL_EXPONENT",
           "default_data_dir", "find_idx", "load_dataset", "pixels_to_int8", "read_idx"]

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "imagefolder", "moving-mnist-actions")


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")


def default_data_dir(name: str) -> str:
    """``data/<name>`` relative to the current directory."""
    _check_name(name)
    return os.path.join("data", name)


def load_dataset(name: str, data_dir: str | None = None, val_split: int | None = None,
                 train_limit: int | None = None, image_size: int | None = None,
                 tune_split: int | None = None) -> DatasetSplits:
    """Load ``name`` (one of ``DATASETS``); ``data_dir`` defaults to ``data/<name>``
    and is ignored for "digits". See ``intrain.data.dataset.make_splits`` for
    ``val_split`` / ``tune_split`` / ``train_limit``. ``image_size`` is the side of the square images of
    "imagefolder" (default 224) or of the frames of "moving-mnist-actions" (32 or 64, default 32)
    and must be None for the other data sets."""
    _check_name(name)
    if name == "imagefolder":
        from intrain.data.imagefolder import DEFAULT_IMAGE_SIZE, load_imagefolder
        return load_imagefolder(default_data_dir(name) if data_dir is None else data_dir,
                                DEFAULT_IMAGE_SIZE if image_size is None else image_size,
                                val_split=val_split, train_limit=train_limit, tune_split=tune_split)
    if name == "moving-mnist-actions":
        from intrain.data.moving_mnist import DEFAULT_FRAME_SIZE, load_moving_mnist_actions
        return load_moving_mnist_actions(default_data_dir(name) if data_dir is None else data_dir,
                                         DEFAULT_FRAME_SIZE if image_size is None else image_size,
                                         val_split=val_split, train_limit=train_limit,
                                         tune_split=tune_split)
    if image_size is not None:
        raise DataError(f"--image-size applies to --dataset imagefolder only; {name} images have a fixed size")
    if name == "digits":
        from intrain.data.digits import load_digits
        return load_digits(val_split=val_split, train_limit=train_limit, tune_split=tune_split)
    if data_dir is None:
        data_dir = default_data_dir(name)
    if name == "cifar10":
        from intrain.data.cifar import load_cifar10
        return load_cifar10(data_dir, val_split=val_split, train_limit=train_limit, tune_split=tune_split)
    from intrain.data.idx import load_mnist_format
    return load_mnist_format(data_dir, name, val_split=val_split, train_limit=train_limit, tune_split=tune_split)
