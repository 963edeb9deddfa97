"""scikit-learn digits loader and the integer pixel conversion (pixels_to_int8)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from intrain.data import PIXEL_EXPONENT, DataError, load_dataset, pixels_to_int8


# ---------------------------------------------------------------- digits

@pytest.fixture(scope="module")
def sk_digits():
    from sklearn.datasets import load_digits
    return load_digits()


def test_digits_split_shapes_and_values(sk_digits):
    s = load_dataset("digits", data_dir="/ignored/for/digits")
    assert s.eval_name == "test" and s.channel_mean is None
    assert (len(s.train), len(s.eval)) == (1437, 360)
    assert s.train.images.shape == (1437, 1, 8, 8) and s.eval.images.shape == (360, 1, 8, 8)
    assert s.train.images.dtype == torch.uint8 and s.train.labels.dtype == torch.int64
    is_test = np.arange(1797) % 5 == 0
    allx = torch.cat([s.train.images, s.eval.images])
    assert int(allx.min()) == 0 and int(allx.max()) == 255
    v = np.concatenate([sk_digits.images[~is_test], sk_digits.images[is_test]]).astype(np.int64)
    expect = np.array([x * 255 // 16 for x in range(17)])[v]   # Python-int reference table
    assert np.array_equal(allx[:, 0].numpy(), expect)
    assert s.train.labels.tolist() == sk_digits.target[~is_test].tolist()
    assert s.eval.labels.tolist() == sk_digits.target[is_test].tolist()
    assert sorted(set(np.unique(allx.numpy()).tolist())) == sorted({x * 255 // 16 for x in np.unique(v)})


def test_digits_val_split_and_limit(sk_digits):
    s = load_dataset("digits", val_split=100, train_limit=50)
    assert (len(s.train), len(s.eval), s.eval_name) == (50, 100, "validation")
    train_labels = sk_digits.target[np.arange(1797) % 5 != 0]
    assert s.eval.labels.tolist() == train_labels[1337:1437].tolist()
    assert s.train.labels.tolist() == train_labels[:50].tolist()
    s = load_dataset("digits", val_split=1436)
    assert len(s.train) == 1
    with pytest.raises(DataError, match="--val-split"):
        load_dataset("digits", val_split=1437)
    with pytest.raises(DataError, match="--train-limit"):
        load_dataset("digits", train_limit=0)
    assert len(load_dataset("digits", train_limit=10**6).train) == 1437


# ---------------------------------------------------------------- pixels_to_int8

def ref_pixel(p: int, m: int | None) -> int:
    """Hand-written Python-int reference: halve (p - m), rounding toward zero."""
    d = p if m is None else p - m
    q = abs(d) // 2
    return q if d >= 0 else -q


class DtypeRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.dtypes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.dtypes.add(t.dtype)
        return out


def test_pixels_no_mean_exhaustive():
    assert PIXEL_EXPONENT == -7
    x = torch.arange(256, dtype=torch.int64).to(torch.uint8).view(1, 1, 16, 16)
    y = pixels_to_int8(x)
    assert y.dtype == torch.int8 and y.shape == x.shape
    got = y.flatten().tolist()
    assert got == [ref_pixel(p, None) for p in range(256)]
    assert min(got) == 0 and max(got) == 127
    # real value v * 2**-7 is within 2**-8 below p / 256
    assert all(0 <= p - 2 * v <= 1 for p, v in zip(range(256), got))


def test_pixels_all_means_exhaustive():
    # channel c has mean c; every channel holds all 256 pixel values -> all (p, m) pairs
    p = torch.arange(256, dtype=torch.int64).to(torch.uint8)
    x = p.view(1, 1, 1, 256).expand(2, 256, 1, 256).contiguous()
    mean = tuple(range(256))
    y = pixels_to_int8(x, mean)
    assert y.dtype == torch.int8 and y.shape == x.shape
    assert torch.equal(y[0], y[1])
    got = y[0, :, 0, :].tolist()
    ref = [[ref_pixel(pp, m) for pp in range(256)] for m in range(256)]
    assert got == ref
    flat = [v for row in got for v in row]
    assert min(flat) == -127 and max(flat) == 127
    for m in range(256):
        for pp in range(256):
            v, d = got[m][pp], pp - m
            assert abs(2 * v - d) <= 1
            if 0 <= m - (pp - m) <= 255:          # mirror pixel 2m - p: odd symmetry
                assert got[m][2 * m - pp] == -v


def test_pixels_mean_per_channel_and_zero_mean():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (4, 3, 5, 5), generator=g, dtype=torch.uint8)
    assert torch.equal(pixels_to_int8(x, (0, 0, 0)), pixels_to_int8(x))
    y = pixels_to_int8(x, (10, 128, 250))
    for c, m in enumerate((10, 128, 250)):
        assert y[:, c].flatten().tolist() == [ref_pixel(int(p), m) for p in x[:, c].flatten()]


def test_pixels_never_create_float():
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    with DtypeRecorder() as rec:
        pixels_to_int8(x)
        pixels_to_int8(x, (1, 2, 3))
    assert rec.dtypes and not any(dt.is_floating_point or dt.is_complex for dt in rec.dtypes), rec.dtypes


def test_pixels_bad_inputs():
    x = torch.zeros(1, 3, 2, 2, dtype=torch.uint8)
    with pytest.raises(TypeError, match="uint8"):
        pixels_to_int8(x.to(torch.int16))
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        pixels_to_int8(x[0])
    with pytest.raises(ValueError, match="3 ints"):
        pixels_to_int8(x, (1, 2))
    with pytest.raises(ValueError, match="0..255"):
        pixels_to_int8(x, (1, 2, 256))
