"""scikit-learn's bundled 8x8 digits (1797 images, no download).

Source values v are 0..16; they become uint8 pixels ``p = v * 255 // 16``
(integer arithmetic; v=0 -> 0, v=16 -> 255), images ``[N, 1, 8, 8]``, labels
int64 in [0, 9]. Fixed split: every fifth image (indices 0, 5, 10, ...) is the 360-image
test set and the other 1437 are training data, in their original order. The file is ordered
by writer, so this interleaved split puts every writer on both sides, as a random split would,
without depending on a seed. ``val_split=N`` instead holds out the last N of the 1437
training images as validation. ``channel_mean`` is None.
"""

from __future__ import annotations

import numpy as np
import torch

from intrain.data.dataset import DatasetSplits, ImageDataset, check_split_args, make_splits
from intrain.data.errors import DataError

__all__ = ["load_digits", "DIGITS_TRAIN", "DIGITS_TEST"]

DIGITS_TRAIN = 1437
DIGITS_TEST = 360


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits as sk_load_digits

    d = sk_load_digits()
    raw = np.asarray(d.images)
    v = raw.astype(np.int64)
    if raw.shape != (DIGITS_TRAIN + DIGITS_TEST, 8, 8) or not np.array_equal(v, raw) \
            or v.min() < 0 or v.max() > 16:
        raise DataError("scikit-learn's digits data is not 1797 8x8 images with integer values "
                        "0..16: reinstall scikit-learn")
    p = (v * 255) // 16
    return p.astype(np.uint8), np.asarray(d.target).astype(np.int64)


def load_digits(val_split: int | None = None, train_limit: int | None = None,
                tune_split: int | None = None) -> DatasetSplits:
    """Digits splits as described in the module docstring."""
    check_split_args(val_split, train_limit, tune_split)
    images, labels = _digits_arrays()
    full = ImageDataset(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels), 10, "digits")
    is_test = torch.arange(len(full)) % 5 == 0
    train = ImageDataset(full.images[~is_test], full.labels[~is_test], 10, "digits")
    test = ImageDataset(full.images[is_test], full.labels[is_test], 10, "digits")
    return make_splits(train, test, val_split=val_split, train_limit=train_limit, tune_split=tune_split)
