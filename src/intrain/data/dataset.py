"""In-memory image datasets and train/eval splits.

Guarantees: ``ImageDataset.images`` is a uint8 tensor ``[N, C, H, W]`` (values
0..255), ``labels`` is an int64 tensor ``[N]`` with every value in
``[0, num_classes)``. Nothing here creates floating-point data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from intrain.data.errors import DataError

__all__ = ["ImageDataset", "DatasetSplits", "check_split_args", "make_splits"]


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class ImageDataset(torch.utils.data.Dataset):
    """Images (uint8 ``[N, C, H, W]``) with int64 labels in ``[0, num_classes)``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int, name: str):
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
            raise DataError(f"{name}: images must be a uint8 tensor [N, C, H, W], got "
                            f"{getattr(images, 'dtype', type(images).__name__)} "
                            f"{tuple(getattr(images, 'shape', ()))}")
        if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.dim() != 1:
            raise DataError(f"{name}: labels must be an int64 tensor [N], got "
                            f"{getattr(labels, 'dtype', type(labels).__name__)} "
                            f"{tuple(getattr(labels, 'shape', ()))}")
        if labels.shape[0] != images.shape[0]:
            raise DataError(f"{name}: {images.shape[0]} images but {labels.shape[0]} labels")
        if not _is_int(num_classes) or num_classes < 1:
            raise DataError(f"{name}: num_classes must be a positive int, got {num_classes!r}")
        if labels.numel() > 0:
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= num_classes:
                raise DataError(f"{name}: labels must lie in [0, {num_classes - 1}], "
                                f"found values in [{lo}, {hi}]")
        self.images = images
        self.labels = labels
        self.num_classes = num_classes
        self.name = name

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])

    def subset(self, start: int, stop: int) -> "ImageDataset":
        """Contiguous slice ``[start, stop)``; shares memory with this dataset."""
        n = len(self)
        if not (_is_int(start) and _is_int(stop) and 0 <= start <= stop <= n):
            raise DataError(f"{self.name}: subset [{start}, {stop}) outside [0, {n}]")
        return ImageDataset(self.images[start:stop], self.labels[start:stop],
                            self.num_classes, self.name)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def __repr__(self) -> str:
        return (f"ImageDataset(name={self.name!r}, n={len(self)}, "
                f"image_shape={self.image_shape}, num_classes={self.num_classes})")


@dataclass(frozen=True)
class DatasetSplits:
    """Training set plus the set to evaluate on (test split or held-out validation)."""

    train: ImageDataset
    eval: ImageDataset
    eval_name: str  # "test", "validation" or "tuning"
    channel_mean: tuple[int, ...] | None  # per-channel integer mean (0..255) to subtract, or None

    def __post_init__(self):
        if self.eval_name not in ("test", "validation", "tuning"):
            raise DataError(f"eval_name must be 'test', 'validation' or 'tuning', got {self.eval_name!r}")
        if self.channel_mean is not None:
            c = self.train.image_shape[0]
            if len(self.channel_mean) != c or not all(
                    _is_int(m) and 0 <= m <= 255 for m in self.channel_mean):
                raise DataError(f"channel_mean must be {c} ints in 0..255, got {self.channel_mean!r}")


def check_split_args(val_split: int | None, train_limit: int | None, tune_split: int | None = None) -> None:
    """Cheap argument checks to run before loading anything (upper bounds come later)."""
    if val_split is not None and (not _is_int(val_split) or val_split < 1):
        raise DataError(f"--val-split must be an integer >= 1, got {val_split!r}")
    if tune_split is not None and (not _is_int(tune_split) or tune_split < 1):
        raise DataError(f"--tune-split must be an integer >= 1, got {tune_split!r}")
    if train_limit is not None and (not _is_int(train_limit) or train_limit < 1):
        raise DataError(f"--train-limit must be an integer >= 1, got {train_limit!r}")


def make_splits(full_train: ImageDataset, test: ImageDataset | None, val_split: int | None = None,
                train_limit: int | None = None,
                channel_mean: tuple[int, ...] | None = None, tune_split: int | None = None) -> DatasetSplits:
    """Apply the shared ``val_split`` / ``tune_split`` / ``train_limit`` semantics.

    ``val_split=N`` holds out the LAST N images of ``full_train`` as the validation
    set (1 <= N < len(full_train)); otherwise ``test`` is the eval set.
    ``tune_split=M`` holds out the M images just before the validation set (the last M when
    there is none) and evaluates on them instead: the split recipes are chosen on, so the
    validation or test split that results are reported on is never seen while choosing (the
    validation images are then neither trained nor evaluated on).
    ``train_limit=N`` (N >= 1) keeps the first N remaining training images (all of
    them if fewer are available). Slices share memory with ``full_train``.
    """
    check_split_args(val_split, train_limit, tune_split)
    n = len(full_train)
    if val_split is not None and val_split >= n:
        raise DataError(f"--val-split must be smaller than the {n} training images of "
                        f"{full_train.name}, got {val_split}")
    if tune_split is not None:
        end = n - (val_split or 0)
        if tune_split >= end:
            raise DataError(f"--tune-split must be smaller than the {end} training images of {full_train.name}"
                            f"{' left by --val-split' if val_split else ''}, got {tune_split}")
        train, ev, eval_name = full_train.subset(0, end - tune_split), full_train.subset(end - tune_split, end), "tuning"
    elif val_split is not None:
        train, ev, eval_name = full_train.subset(0, n - val_split), full_train.subset(n - val_split, n), "validation"
    else:
        if test is None:
            raise DataError(f"{full_train.name} has no test split: pass --val-split N "
                            "to hold out N training images for validation")
        train, ev, eval_name = full_train, test, "test"
    if train_limit is not None and train_limit < len(train):
        train = train.subset(0, train_limit)
    return DatasetSplits(train=train, eval=ev, eval_name=eval_name, channel_mean=channel_mean)
