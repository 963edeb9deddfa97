"""IDX files (MNIST, Fashion-MNIST): reading and validation.

``read_idx`` returns a uint8 tensor (values 0..255) with the shape stored in the
header. The MNIST-format loaders guarantee images uint8 ``[N, 1, 28, 28]`` and
labels int64 ``[N]`` in [0, 9], with equal image and label counts. Any malformed
input (bad magic, short header, truncated or over-long payload, corrupt gzip) is
reported as a one-line ``DataError`` naming the file.
"""

from __future__ import annotations

import gzip
import os
import zlib

import numpy as np
import torch

from intrain.data.dataset import DatasetSplits, ImageDataset, check_split_args, make_splits
from intrain.data.errors import DataError

__all__ = ["read_idx", "find_idx", "load_mnist_format", "TRAIN_IMAGES", "TRAIN_LABELS",
           "TEST_IMAGES", "TEST_LABELS"]

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
UBYTE = 0x08


def find_idx(data_dir: str, stem: str) -> str | None:
    """Path of ``stem`` or ``stem.gz`` in ``data_dir`` (raw file preferred), or None."""
    for name in (stem, stem + ".gz"):
        path = os.path.join(data_dir, name)
        if os.path.isfile(path):
            return path
    return None


def _read_bytes(path: str) -> bytes:
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        with open(path, "rb") as f:
            return f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(f"{path}: corrupt or truncated gzip file ({e or type(e).__name__}): "
                        "download it again") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read file ({e.strerror or e})") from None


def read_idx(path: str, ndim: int | None = None) -> torch.Tensor:
    """Read an unsigned-byte IDX file (raw or ``.gz``) into a uint8 tensor.

    With ``ndim`` the magic number must be ``0x0000080{ndim}`` (0x803 images,
    0x801 labels). The payload must hold exactly prod(dims) bytes.
    """
    data = _read_bytes(path)
    if len(data) < 4:
        raise DataError(f"{path}: {len(data)} bytes is too short for an IDX header (not an IDX file?)")
    magic = int.from_bytes(data[:4], "big")
    if data[0] != 0 or data[1] != 0:
        raise DataError(f"{path}: bad IDX magic number 0x{magic:08X} (not an IDX file?)")
    if data[2] != UBYTE:
        raise DataError(f"{path}: IDX element type 0x{data[2]:02X} is not supported "
                        f"(only unsigned byte 0x08); magic 0x{magic:08X}")
    nd = data[3]
    if ndim is not None and nd != ndim:
        raise DataError(f"{path}: bad IDX magic number 0x{magic:08X}, expected "
                        f"0x{(UBYTE << 8) | ndim:08X} ({ndim}-dimensional data)")
    header = 4 + 4 * nd
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header ({len(data)} bytes, need {header} "
                        f"for {nd} dimensions)")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(nd)]
    expected = 1
    for d in dims:
        expected *= d
    got = len(data) - header
    if got != expected:
        what = "truncated" if got < expected else "too long"
        raise DataError(f"{path}: IDX payload {what}: {got} bytes, dims {dims} need {expected}: "
                        "download the file again")
    arr = np.frombuffer(data, dtype=np.uint8, count=expected, offset=header).reshape(dims).copy()
    return torch.from_numpy(arr)


def _find_pair(data_dir: str, stems: tuple[str, str], missing_msg) -> tuple[str, str]:
    paths = []
    for stem in stems:
        p = find_idx(data_dir, stem)
        if p is None:
            raise DataError(missing_msg(stem))
        paths.append(p)
    return paths[0], paths[1]


def _load_pair(images_path: str, labels_path: str, name: str) -> ImageDataset:
    images = read_idx(images_path, ndim=3)
    labels = read_idx(labels_path, ndim=1)
    if tuple(images.shape[1:]) != (28, 28):
        raise DataError(f"{images_path}: {name} images must be 28x28, got "
                        f"{images.shape[1]}x{images.shape[2]}")
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{images_path} has {images.shape[0]} images but {labels_path} has "
                        f"{labels.shape[0]} labels: the files do not belong together")
    if labels.numel() and int(labels.max()) > 9:
        raise DataError(f"{labels_path}: label {int(labels.max())} out of range [0, 9]")
    return ImageDataset(images.unsqueeze(1), labels.to(torch.int64), 10, name)


def load_mnist_format(data_dir: str, name: str, val_split: int | None = None,
                      train_limit: int | None = None, tune_split: int | None = None) -> DatasetSplits:
    """Load MNIST / Fashion-MNIST IDX files from ``data_dir`` (``.gz`` or raw).

    Without ``val_split`` or ``tune_split`` the eval set is the t10k test split, which must exist.
    ``channel_mean`` is None (inputs are p >> 1 in [0, 127]).
    """
    check_split_args(val_split, train_limit, tune_split)
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise DataError(f"data directory {data_dir} is a file, not a directory: pass --data-dir "
                        "pointing at the folder with the IDX files")
    if not os.path.isdir(data_dir):
        raise DataError(f"data directory {data_dir} does not exist: pass --data-dir pointing "
                        "at the folder with the IDX files")
    train_paths = _find_pair(
        data_dir, (TRAIN_IMAGES, TRAIN_LABELS),
        lambda s: f"training file {os.path.join(data_dir, s)}[.gz] missing: pass "
                  f"--data-dir pointing at the folder with the {name} IDX files")
    test_paths = None
    if val_split is None and tune_split is None:  # check before the (slow) reading of the training files
        test_paths = _find_pair(
            data_dir, (TEST_IMAGES, TEST_LABELS),
            lambda s: f"no test split in {data_dir} ({s}[.gz] missing): pass "
                      "--val-split N to hold out N training images for validation")
    train = _load_pair(*train_paths, name)
    test = _load_pair(*test_paths, name) if test_paths else None
    return make_splits(train, test, val_split=val_split, train_limit=train_limit, tune_split=tune_split)
