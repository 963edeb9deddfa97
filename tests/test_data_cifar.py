import os
import pickle

import numpy as np
import pytest
import torch

from cifar_files import expected_arrays, py2_pickle_dumps, write_cifar10_bin, write_cifar10_py
from intrain.data.cifar import channel_mean_u8, load_cifar10
from intrain.data.errors import DataError


def _mean_ref(images: np.ndarray) -> tuple[int, ...]:
    out = []
    for c in range(images.shape[1]):
        s = int(images[:, c].astype(np.int64).sum())
        cnt = images.shape[0] * images.shape[2] * images.shape[3]
        q, r = divmod(s, cnt)
        out.append(q + (1 if 2 * r >= cnt else 0))
    return tuple(out)


def _check(splits, per_batch=8, test_size=None):
    tx, ty, ex, ey = expected_arrays(per_batch, test_size)
    assert splits.eval_name == "test"
    assert splits.train.images.dtype == torch.uint8 and splits.train.images.shape == (5 * per_batch, 3, 32, 32)
    assert splits.train.labels.dtype == torch.int64
    assert np.array_equal(splits.train.images.numpy(), tx)
    assert np.array_equal(splits.train.labels.numpy(), ty)
    assert np.array_equal(splits.eval.images.numpy(), ex)
    assert np.array_equal(splits.eval.labels.numpy(), ey)
    assert splits.train.num_classes == 10
    assert splits.channel_mean == _mean_ref(tx)


def test_py_format(tmp_path):
    write_cifar10_py(tmp_path, per_batch=8, test_size=5)
    _check(load_cifar10(tmp_path), 8, 5)


def test_bin_format(tmp_path):
    write_cifar10_bin(tmp_path, per_batch=6)
    _check(load_cifar10(tmp_path), 6)


def test_folder_itself_and_str_path(tmp_path):
    folder = write_cifar10_py(tmp_path, per_batch=4)
    _check(load_cifar10(str(folder)), 4)
    bfolder = write_cifar10_bin(tmp_path / "b", per_batch=3)
    _check(load_cifar10(bfolder), 3)


def test_prefers_py_when_both(tmp_path):
    write_cifar10_py(tmp_path, per_batch=4)
    write_cifar10_bin(tmp_path, per_batch=3)
    assert len(load_cifar10(tmp_path).train) == 20


def test_channel_layout_is_rgb_planes(tmp_path):
    folder = write_cifar10_py(tmp_path, per_batch=2)
    # pixel (row 1, col 2) of channel G sits at 1024 + 1*32 + 2 in the flat record
    with open(folder / "data_batch_1", "rb") as f:
        d = pickle.load(f, encoding="bytes")
    img = load_cifar10(tmp_path).train.images[0]
    assert int(img[1, 1, 2]) == int(d[b"data"][0, 1024 + 32 + 2])
    assert int(img[2, 31, 31]) == int(d[b"data"][0, 3071])


def test_val_split_and_train_limit(tmp_path):
    write_cifar10_py(tmp_path, per_batch=4)
    tx, ty, _, _ = expected_arrays(4)
    s = load_cifar10(tmp_path, val_split=5)
    assert s.eval_name == "validation"
    assert np.array_equal(s.eval.images.numpy(), tx[-5:])
    assert np.array_equal(s.train.labels.numpy(), ty[:-5])
    assert s.channel_mean == _mean_ref(tx[:-5])
    s = load_cifar10(tmp_path, val_split=5, train_limit=3)
    assert len(s.train) == 3 and len(s.eval) == 5
    assert np.array_equal(s.train.images.numpy(), tx[:3])
    assert s.channel_mean == _mean_ref(tx[:3])
    with pytest.raises(DataError):
        load_cifar10(tmp_path, val_split=20)
    with pytest.raises(DataError):
        load_cifar10(tmp_path, val_split=0)
    with pytest.raises(DataError):
        load_cifar10(tmp_path, train_limit=0)


def test_channel_mean_rounds_half_up():
    x = torch.zeros(2, 3, 1, 1, dtype=torch.uint8)
    x[:, 0, 0, 0] = torch.tensor([0, 1], dtype=torch.uint8)       # 0.5 -> 1
    x[:, 1, 0, 0] = torch.tensor([254, 255], dtype=torch.uint8)   # 254.5 -> 255
    x[:, 2, 0, 0] = torch.tensor([10, 10], dtype=torch.uint8)
    assert channel_mean_u8(x) == (1, 255, 10)
    y = torch.zeros(3, 1, 1, 1, dtype=torch.uint8)
    y[:, 0, 0, 0] = torch.tensor([0, 0, 1], dtype=torch.uint8)    # 1/3 -> 0
    assert channel_mean_u8(y) == (0,)


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(DataError, match="intrain download cifar10 --data-dir"):
        load_cifar10(tmp_path / "nope")
    with pytest.raises(DataError, match="intrain download cifar10 --data-dir"):
        load_cifar10(tmp_path)
    folder = write_cifar10_py(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3") as ei:
        load_cifar10(tmp_path)
    assert f"--data-dir {tmp_path}" in str(ei.value) and "\n" not in str(ei.value)
    bfolder = write_cifar10_bin(tmp_path / "b")
    (bfolder / "test_batch.bin").unlink()
    with pytest.raises(DataError, match="test_batch.bin"):
        load_cifar10(tmp_path / "b")


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_refuses_malicious_pickle(tmp_path):
    folder = write_cifar10_py(tmp_path)
    marker = str(tmp_path / "pwned")
    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump({b"data": _Evil(marker), b"labels": []}, f, protocol=2)
    with pytest.raises(DataError, match="refusing to unpickle"):
        load_cifar10(tmp_path)
    assert not os.path.exists(marker)


def test_protocol5_numpy_pickle_accepted(tmp_path):
    folder = write_cifar10_py(tmp_path, per_batch=3)
    with open(folder / "data_batch_1", "rb") as f:
        d = pickle.load(f, encoding="bytes")
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump(d, f, protocol=5)
    _check(load_cifar10(tmp_path), 3)


def _rewrite(folder, name, changes):
    with open(folder / name, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    d.update(changes)
    (folder / name).write_bytes(py2_pickle_dumps(d))


@pytest.mark.parametrize("change, msg", [
    ({b"data": np.zeros((8, 3000), np.uint8)}, "uint8"),
    ({b"data": np.zeros((8, 3072), np.int16)}, "uint8"),
    ({b"labels": [0] * 7}, "8 images but 7 labels"),
    ({b"labels": [0] * 7 + [10]}, "0..9"),
    ({b"labels": [0] * 7 + [-1]}, "0..9"),
    ({b"labels": [0.0] * 8}, "list of ints"),
])
def test_corrupt_py_batches(tmp_path, change, msg):
    folder = write_cifar10_py(tmp_path)
    _rewrite(folder, "data_batch_4", change)
    with pytest.raises(DataError, match=msg):
        load_cifar10(tmp_path)


def test_truncated_or_garbage_pickle(tmp_path):
    folder = write_cifar10_py(tmp_path)
    raw = (folder / "test_batch").read_bytes()
    (folder / "test_batch").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="test_batch"):
        load_cifar10(tmp_path)
    (folder / "test_batch").write_bytes(b"not a pickle at all")
    with pytest.raises(DataError, match="test_batch"):
        load_cifar10(tmp_path)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump([1, 2, 3], f)
    with pytest.raises(DataError, match="not a CIFAR-10 batch"):
        load_cifar10(tmp_path)


def test_corrupt_bin(tmp_path):
    folder = write_cifar10_bin(tmp_path)
    path = folder / "data_batch_5.bin"
    raw = path.read_bytes()
    path.write_bytes(raw[:-1])
    with pytest.raises(DataError, match="multiple of 3073"):
        load_cifar10(tmp_path)
    path.write_bytes(b"")
    with pytest.raises(DataError, match="multiple of 3073"):
        load_cifar10(tmp_path)
    bad = bytearray(raw)
    bad[3073] = 10  # label byte of the second record
    path.write_bytes(bytes(bad))
    with pytest.raises(DataError, match="0..9"):
        load_cifar10(tmp_path)


def test_load_dataset_dispatch(tmp_path):
    from intrain.data import load_dataset
    write_cifar10_bin(tmp_path, per_batch=2)
    _check(load_dataset("cifar10", str(tmp_path)), 2)
