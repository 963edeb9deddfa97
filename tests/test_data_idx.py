"""IDX reading, MNIST-format loading, split semantics and the dataset registry."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from intrain.data import (DATASETS, DataError, DatasetSplits, ImageDataset, default_data_dir,
                          find_idx, load_dataset, read_idx)
from intrain.data.idx import load_mnist_format

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def idx_bytes(arr: np.ndarray, magic: int | None = None) -> bytes:
    arr = np.asarray(arr, dtype=np.uint8)
    if magic is None:
        magic = 0x0800 | arr.ndim
    return struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in arr.shape) + arr.tobytes()


def write(path: Path, data: bytes, gz: bool) -> Path:
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def make_set(d: Path, n_train=20, n_test=6, gz=True, test=True, seed=0):
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    tr_x = rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
    tr_y = (np.arange(n_train) * 7 % 10).astype(np.uint8)
    write(d / "train-images-idx3-ubyte", idx_bytes(tr_x), gz)
    write(d / "train-labels-idx1-ubyte", idx_bytes(tr_y), gz)
    te_x = rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8)
    te_y = (np.arange(n_test) * 3 % 10).astype(np.uint8)
    if test:
        write(d / "t10k-images-idx3-ubyte", idx_bytes(te_x), gz)
        write(d / "t10k-labels-idx1-ubyte", idx_bytes(te_y), gz)
    return tr_x, tr_y, te_x, te_y


# ---------------------------------------------------------------- read_idx

@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_roundtrip_exact(tmp_path, gz):
    arr = np.arange(2 * 3 * 5, dtype=np.int64).reshape(2, 3, 5) * 37 % 256
    p = write(tmp_path / "x-idx3-ubyte", idx_bytes(arr), gz)
    t = read_idx(str(p))
    assert t.dtype == torch.uint8 and tuple(t.shape) == (2, 3, 5)
    assert torch.equal(t, torch.from_numpy(arr.astype(np.uint8)))
    lab = np.array([0, 9, 3, 255], dtype=np.uint8)
    p = write(tmp_path / "y-idx1-ubyte", idx_bytes(lab), gz)
    assert read_idx(str(p), ndim=1).tolist() == [0, 9, 3, 255]


def test_find_idx(tmp_path):
    assert find_idx(str(tmp_path), "a") is None
    (tmp_path / "a.gz").write_bytes(b"")
    assert find_idx(str(tmp_path), "a") == os.path.join(str(tmp_path), "a.gz")
    (tmp_path / "a").write_bytes(b"")
    assert find_idx(str(tmp_path), "a") == os.path.join(str(tmp_path), "a")


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("delta,word", [(-1, "truncated"), (1, "too long")])
def test_payload_size_mismatch(tmp_path, gz, delta, word):
    data = idx_bytes(np.zeros((3, 4, 4), np.uint8))
    data = data[:delta] if delta < 0 else data + b"\x00"
    p = write(tmp_path / "img", data, gz)
    with pytest.raises(DataError, match=word) as e:
        read_idx(str(p))
    assert str(p) in str(e.value)


def test_truncated_header(tmp_path):
    p = write(tmp_path / "img", idx_bytes(np.zeros((3, 4, 4), np.uint8))[:9], False)
    with pytest.raises(DataError, match="truncated IDX header") as e:
        read_idx(str(p))
    assert str(p) in str(e.value)
    p.write_bytes(b"\x00\x00")
    with pytest.raises(DataError, match="too short"):
        read_idx(str(p))


@pytest.mark.parametrize("magic,pattern", [
    (0x1F8B0803, "bad IDX magic number 0x1F8B0803"),
    (0x00000D03, "element type 0x0D"),
    (0x00000802, "expected 0x00000803"),
])
def test_wrong_magic(tmp_path, magic, pattern):
    p = write(tmp_path / "img", idx_bytes(np.zeros((2, 2, 2), np.uint8), magic=magic)[:4] +
              b"\x00\x00\x00\x02" * 3 + b"\x00" * 8, False)
    with pytest.raises(DataError, match=pattern) as e:
        read_idx(str(p), ndim=3)
    assert str(p) in str(e.value)


def test_corrupt_gzip(tmp_path):
    good = gzip.compress(idx_bytes(np.arange(200, dtype=np.uint8).reshape(2, 10, 10)))
    cases = {
        "notgz.gz": b"this is not gzip data at all",
        "cut.gz": good[: len(good) // 2],
        "crc.gz": good[:-8] + bytes([good[-8] ^ 0xFF]) + good[-7:],
        "body.gz": good[:12] + bytes(b ^ 0x55 for b in good[12:30]) + good[30:],
    }
    for name, data in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(DataError) as e:
            read_idx(str(p))
        msg = str(e.value)
        assert str(p) in msg and "\n" not in msg, (name, msg)


# ---------------------------------------------------------------- MNIST-format loader

@pytest.mark.parametrize("gz", [False, True])
def test_load_exact_content(tmp_path, gz):
    tr_x, tr_y, te_x, te_y = make_set(tmp_path, gz=gz)
    s = load_dataset("mnist", str(tmp_path))
    assert isinstance(s, DatasetSplits) and s.eval_name == "test" and s.channel_mean is None
    assert s.train.images.shape == (20, 1, 28, 28) and s.train.images.dtype == torch.uint8
    assert s.train.labels.dtype == torch.int64 and s.train.num_classes == 10
    assert torch.equal(s.train.images[:, 0], torch.from_numpy(tr_x))
    assert s.train.labels.tolist() == tr_y.tolist()
    assert torch.equal(s.eval.images[:, 0], torch.from_numpy(te_x))
    assert s.eval.labels.tolist() == te_y.tolist()
    img, lab = s.train[3]
    assert img.shape == (1, 28, 28) and lab == int(tr_y[3]) and isinstance(lab, int)
    assert s.train.image_shape == (1, 28, 28) and len(s.eval) == 6


def test_val_split_and_train_limit(tmp_path):
    tr_x, tr_y, _, _ = make_set(tmp_path, test=False)
    s = load_dataset("fashion-mnist", str(tmp_path), val_split=5)
    assert s.eval_name == "validation" and len(s.train) == 15 and len(s.eval) == 5
    assert torch.equal(s.eval.images[:, 0], torch.from_numpy(tr_x[-5:]))
    assert s.eval.labels.tolist() == tr_y[-5:].tolist()
    assert torch.equal(s.train.images[:, 0], torch.from_numpy(tr_x[:15]))
    s = load_dataset("fashion-mnist", str(tmp_path), val_split=5, train_limit=4)
    assert len(s.train) == 4 and len(s.eval) == 5
    assert s.train.labels.tolist() == tr_y[:4].tolist()
    assert torch.equal(s.eval.images[:, 0], torch.from_numpy(tr_x[-5:]))
    s = load_dataset("fashion-mnist", str(tmp_path), val_split=5, train_limit=1000)
    assert len(s.train) == 15                       # more than available: use all
    s = load_dataset("fashion-mnist", str(tmp_path), val_split=19)
    assert len(s.train) == 1


def test_tune_split_never_touches_the_reported_split(tmp_path):
    """The tuning split lies just before the validation split (the last images without one): the
    images results are reported on are neither trained nor evaluated on while choosing a recipe."""
    tr_x, tr_y, _, _ = make_set(tmp_path, test=False)
    s = load_dataset("fashion-mnist", str(tmp_path), val_split=5, tune_split=4)
    assert s.eval_name == "tuning" and len(s.train) == 11 and len(s.eval) == 4
    assert torch.equal(s.eval.images[:, 0], torch.from_numpy(tr_x[11:15]))
    assert s.eval.labels.tolist() == tr_y[11:15].tolist()
    assert torch.equal(s.train.images[:, 0], torch.from_numpy(tr_x[:11]))
    s = load_dataset("fashion-mnist", str(tmp_path), val_split=5, tune_split=4, train_limit=3)
    assert torch.equal(s.train.images[:, 0], torch.from_numpy(tr_x[:3]))
    assert torch.equal(s.eval.images[:, 0], torch.from_numpy(tr_x[11:15]))
    # MNIST reports on its test split: the tuning split is the last training images, and the
    # test files need not be there
    s = load_dataset("mnist", str(tmp_path), tune_split=6)
    assert s.eval_name == "tuning" and torch.equal(s.eval.images[:, 0], torch.from_numpy(tr_x[14:]))
    assert len(s.train) == 14


def test_train_limit_with_test_split(tmp_path):
    tr_x, tr_y, te_x, _ = make_set(tmp_path)
    s = load_dataset("mnist", str(tmp_path), train_limit=7)
    assert len(s.train) == 7 and len(s.eval) == 6 and s.eval_name == "test"
    assert torch.equal(s.train.images[:, 0], torch.from_numpy(tr_x[:7]))


@pytest.mark.parametrize("kw,pattern", [
    (dict(val_split=0), "--val-split"), (dict(val_split=20), "--val-split"),
    (dict(val_split=-3), "--val-split"), (dict(val_split=2.0), "--val-split"),
    (dict(train_limit=0), "--train-limit"), (dict(val_split=3, train_limit=-1), "--train-limit"),
    (dict(tune_split=0), "--tune-split"), (dict(tune_split=20), "--tune-split must be smaller than the 20 "),
    (dict(val_split=15, tune_split=5), "--tune-split must be smaller than the 5 training images of mnist left by"),
])
def test_bad_split_args(tmp_path, kw, pattern):
    make_set(tmp_path)
    with pytest.raises(DataError, match=pattern):
        load_dataset("mnist", str(tmp_path), **kw)


def test_missing_dir(tmp_path):
    d = tmp_path / "nope"
    with pytest.raises(DataError, match="--data-dir") as e:
        load_dataset("mnist", str(d))
    assert str(e.value) == (f"data directory {d} does not exist: pass --data-dir pointing at the "
                            "folder with the IDX files")


def test_missing_train_file(tmp_path):
    make_set(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="train-labels-idx1-ubyte") as e:
        load_dataset("mnist", str(tmp_path))
    assert "--data-dir" in str(e.value)


def test_missing_test_split(tmp_path):
    make_set(tmp_path, test=False)
    with pytest.raises(DataError) as e:
        load_dataset("fashion-mnist", str(tmp_path))
    assert str(e.value) == (f"no test split in {tmp_path} (t10k-images-idx3-ubyte[.gz] missing): "
                            "pass --val-split N to hold out N training images for validation")
    make_set(tmp_path / "b")
    (tmp_path / "b" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\[\.gz\] missing.*--val-split"):
        load_dataset("mnist", str(tmp_path / "b"))


def test_label_out_of_range(tmp_path):
    make_set(tmp_path, gz=False)
    y = np.zeros(20, np.uint8)
    y[11] = 10
    write(tmp_path / "train-labels-idx1-ubyte", idx_bytes(y), False)
    with pytest.raises(DataError, match=r"label 10 out of range \[0, 9\]") as e:
        load_dataset("mnist", str(tmp_path))
    assert "train-labels-idx1-ubyte" in str(e.value)


def test_count_mismatch(tmp_path):
    make_set(tmp_path, gz=False)
    write(tmp_path / "t10k-labels-idx1-ubyte", idx_bytes(np.zeros(5, np.uint8)), False)
    with pytest.raises(DataError, match="6 images but .*t10k-labels-idx1-ubyte has 5 labels"):
        load_dataset("mnist", str(tmp_path))


def test_wrong_image_size(tmp_path):
    make_set(tmp_path, gz=False)
    write(tmp_path / "train-images-idx3-ubyte", idx_bytes(np.zeros((20, 27, 28), np.uint8)), False)
    with pytest.raises(DataError, match="must be 28x28, got 27x28"):
        load_dataset("mnist", str(tmp_path))


def test_labels_file_with_image_magic(tmp_path):
    make_set(tmp_path, gz=False)
    write(tmp_path / "train-labels-idx1-ubyte", idx_bytes(np.zeros((20, 1, 1), np.uint8)), False)
    with pytest.raises(DataError, match="expected 0x00000801") as e:
        load_dataset("mnist", str(tmp_path))
    assert "train-labels-idx1-ubyte" in str(e.value)


# ---------------------------------------------------------------- ImageDataset / registry

def test_image_dataset_validation_and_subset():
    x = torch.arange(4 * 2 * 2, dtype=torch.uint8).view(4, 1, 2, 2)
    y = torch.tensor([0, 1, 2, 1])
    ds = ImageDataset(x, y, 3, "t")
    sub = ds.subset(1, 3)
    assert len(sub) == 2 and sub.labels.tolist() == [1, 2]
    assert sub.images.data_ptr() == x[1].data_ptr()       # shares memory
    with pytest.raises(DataError, match=r"labels must lie in \[0, 1\]"):
        ImageDataset(x, y, 2, "t")
    with pytest.raises(DataError, match="uint8"):
        ImageDataset(x.to(torch.int16), y, 3, "t")
    with pytest.raises(DataError, match="int64"):
        ImageDataset(x, y.to(torch.int32), 3, "t")
    with pytest.raises(DataError, match="4 images but 3 labels"):
        ImageDataset(x, y[:3], 3, "t")
    with pytest.raises(DataError, match="subset"):
        ds.subset(2, 5)


def test_registry(tmp_path, monkeypatch):
    assert DATASETS == ("digits", "mnist", "fashion-mnist", "cifar10", "imagefolder", "moving-mnist-actions")
    assert default_data_dir("mnist") == os.path.join("data", "mnist")
    with pytest.raises(DataError, match="digits, mnist, fashion-mnist, cifar10, imagefolder, moving-mnist-actions"):
        load_dataset("svhn")
    make_set(tmp_path / "data" / "mnist")
    monkeypatch.chdir(tmp_path)
    assert len(load_dataset("mnist").train) == 20        # default data dir


def test_cifar_dispatch(monkeypatch):
    import sys
    import types

    calls = []
    fake = types.ModuleType("intrain.data.cifar")
    fake.load_cifar10 = lambda data_dir, val_split=None, train_limit=None, tune_split=None: calls.append(
        (data_dir, val_split, train_limit, tune_split)) or "splits"
    monkeypatch.setitem(sys.modules, "intrain.data.cifar", fake)
    assert load_dataset("cifar10", "somewhere", val_split=3, train_limit=9, tune_split=4) == "splits"
    assert load_dataset("cifar10") == "splits"
    assert calls == [("somewhere", 3, 9, 4), (os.path.join("data", "cifar10"), None, None, None)]


# ---------------------------------------------------------------- real data

@pytest.fixture(scope="module")
def real_mnist():
    d = REAL / "mnist"
    if not (d / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"real MNIST not found at {d} (shared data folder absent)")
    return load_mnist_format(str(d), "mnist")


def test_real_mnist(real_mnist):
    s = real_mnist
    assert len(s.train) == 60000 and len(s.eval) == 10000 and s.eval_name == "test"
    counts = torch.bincount(s.train.labels, minlength=10).tolist()
    assert counts == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert s.train.labels[:5].tolist() == [5, 0, 4, 1, 9]
    assert s.eval.images.shape == (10000, 1, 28, 28)
    total = int(s.train.images.sum(dtype=torch.int64))
    assert round(total / s.train.images.numel(), 3) == 33.318


def test_real_fashion_mnist():
    d = REAL / "fashion-mnist-train"
    if not (d / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"real Fashion-MNIST not found at {d} (shared data folder absent)")
    with pytest.raises(DataError, match=r"no test split in .*t10k-images-idx3-ubyte\[\.gz\] missing"):
        load_dataset("fashion-mnist", str(d))
    s = load_dataset("fashion-mnist", str(d), val_split=10000)
    assert (len(s.train), len(s.eval), s.eval_name) == (50000, 10000, "validation")
    full = torch.cat([s.train.labels, s.eval.labels])
    assert torch.bincount(full, minlength=10).tolist() == [6000] * 10
