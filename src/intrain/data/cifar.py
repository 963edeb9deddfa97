"""CIFAR-10 loader for the official python (pickle) and binary distributions.

``load_cifar10(data_dir)`` accepts a folder that is, or contains, ``cifar-10-batches-py/``
(preferred) or ``cifar-10-batches-bin/``. Guarantees: images are uint8 ``[N, 3, 32, 32]``
(values 0..255, channels R, G, B), labels int64 in 0..9, and ``channel_mean`` is a tuple of three
ints in 0..255: the per-channel mean of the training split, rounded half up, computed with int64
sums (at most 255 * N * 1024, far below 2**63). Pickles are read with a restricted unpickler that
only rebuilds numpy arrays; anything else is refused.
"""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import numpy as np
import torch

from intrain.data.dataset import DatasetSplits, ImageDataset, check_split_args, make_splits
from intrain.data.errors import DataError

__all__ = ["load_cifar10", "channel_mean_u8", "NUM_CLASSES", "PY_FOLDER", "BIN_FOLDER"]

NUM_CLASSES = 10
PY_FOLDER = "cifar-10-batches-py"
BIN_FOLDER = "cifar-10-batches-bin"
_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
_TEST = "test_batch"
_PIXELS = 3 * 32 * 32
_RECORD = 1 + _PIXELS


def _allowed_globals() -> dict[tuple[str, str], object]:
    """Exactly the globals a pickled numpy array needs, under numpy 1.x and 2.x module names."""
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for mod in ("numpy.core", "numpy._core"):
        allowed[(f"{mod}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{mod}.numeric", "_frombuffer")] = numeric._frombuffer  # protocol-5 numpy pickles
    return allowed


_ALLOWED = _allowed_globals()


class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module, name):
        obj = _ALLOWED.get((module, name))
        if obj is None:
            raise DataError(f"{self._path}: refusing to unpickle {module}.{name}; "
                            "not a CIFAR-10 batch file")
        return obj


def _hint(root: Path) -> str:
    return f"run `intrain download cifar10 --data-dir {root}`"


def _find(data_dir: Path) -> tuple[str, Path, Path]:
    """``(format, folder, root)`` where root is the folder to pass to ``intrain download``."""
    if data_dir.name in (PY_FOLDER, BIN_FOLDER) and data_dir.is_dir():
        return ("py" if data_dir.name == PY_FOLDER else "bin"), data_dir, data_dir.parent
    for fmt, sub in (("py", PY_FOLDER), ("bin", BIN_FOLDER)):
        if (data_dir / sub).is_dir():
            return fmt, data_dir / sub, data_dir
    if (data_dir / _TRAIN[0]).is_file():
        return "py", data_dir, data_dir
    if (data_dir / f"{_TRAIN[0]}.bin").is_file():
        return "bin", data_dir, data_dir
    if not data_dir.is_dir():
        raise DataError(f"CIFAR-10 data folder {data_dir} does not exist: {_hint(data_dir)}")
    raise DataError(f"no {PY_FOLDER}/ or {BIN_FOLDER}/ in {data_dir}: {_hint(data_dir)}")


def _check_labels(labels: np.ndarray, path: Path) -> np.ndarray:
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DataError(f"{path}: labels must lie in 0..{NUM_CLASSES - 1}, found "
                        f"{int(labels.min())}..{int(labels.max())}; the file is corrupt")
    return labels.astype(np.int64)


def _read_py(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = _SafeUnpickler(f, path).load()
    except DataError:
        raise
    except Exception as exc:  # truncated / not a pickle / bad numpy state
        raise DataError(f"{path}: cannot read CIFAR-10 batch ({type(exc).__name__}: {exc}); "
                        "the file is corrupt, download it again") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{path}: not a CIFAR-10 batch (expected a dict with b'data' and b'labels')")
    data, labels = batch[b"data"], batch[b"labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != _PIXELS or data.shape[0] < 1:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: b'data' must be uint8 [n, {_PIXELS}] with n >= 1, got {got}")
    if isinstance(labels, np.ndarray):
        lab = labels
    elif isinstance(labels, list) and all(type(x) is int for x in labels):
        lab = np.array(labels, dtype=np.int64) if labels else np.zeros(0, np.int64)
    else:
        raise DataError(f"{path}: b'labels' must be a list of ints")
    if lab.ndim != 1 or lab.dtype.kind not in "iu":
        raise DataError(f"{path}: b'labels' must be a 1-D list of ints, got {lab.dtype} {lab.shape}")
    if lab.shape[0] != data.shape[0]:
        raise DataError(f"{path}: {data.shape[0]} images but {lab.shape[0]} labels; the file is corrupt")
    return data, _check_labels(lab, path)


def _read_bin(path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % _RECORD:
        raise DataError(f"{path}: size {raw.size} bytes is not a positive multiple of {_RECORD}; "
                        "the file is corrupt or truncated, download it again")
    records = raw.reshape(-1, _RECORD)
    return np.ascontiguousarray(records[:, 1:]), _check_labels(records[:, 0], path)


def _read_split(folder: Path, fmt: str, names: list[str], root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    datas, labels = [], []
    for name in names:
        path = folder / (name if fmt == "py" else f"{name}.bin")
        if not path.is_file():
            raise DataError(f"missing CIFAR-10 file {path}: {_hint(root)}")
        d, y = (_read_py if fmt == "py" else _read_bin)(path)
        datas.append(d)
        labels.append(y)
    images = torch.from_numpy(np.concatenate(datas).reshape(-1, 3, 32, 32))
    return images, torch.from_numpy(np.concatenate(labels))


def channel_mean_u8(images: torch.Tensor) -> tuple[int, ...]:
    """Per-channel mean of uint8 ``[N, C, H, W]`` images, rounded half up, integer ops only."""
    n, c, h, w = images.shape
    count = n * h * w
    if count == 0:
        raise DataError("cannot compute the channel mean of an empty training set")
    if images.device.type == "cpu":  # numpy reduces uint8 into int64 without an int64 copy
        sums = [int(v) for v in np.add.reduce(images.numpy(), axis=(0, 2, 3), dtype=np.int64)]
    else:
        sums = [int(v) for v in images.sum(dim=(0, 2, 3), dtype=torch.int64).tolist()]
    return tuple((2 * s + count) // (2 * count) for s in sums)


def load_cifar10(data_dir, val_split: int | None = None, train_limit: int | None = None,
                 tune_split: int | None = None) -> DatasetSplits:
    """Load CIFAR-10 from ``data_dir``; see the module docstring for the guarantees."""
    check_split_args(val_split, train_limit, tune_split)
    fmt, folder, root = _find(Path(data_dir))
    for name in _TRAIN + [_TEST]:  # report a missing file before reading anything large
        path = folder / (name if fmt == "py" else f"{name}.bin")
        if not path.is_file():
            raise DataError(f"missing CIFAR-10 file {path}: {_hint(root)}")
    train_x, train_y = _read_split(folder, fmt, _TRAIN, root)
    test_x, test_y = _read_split(folder, fmt, [_TEST], root)
    splits = make_splits(ImageDataset(train_x, train_y, NUM_CLASSES, "cifar10-train"),
                         ImageDataset(test_x, test_y, NUM_CLASSES, "cifar10-test"),
                         val_split=val_split, train_limit=train_limit, tune_split=tune_split)
    return dataclasses.replace(splits, channel_mean=channel_mean_u8(splits.train.images))
