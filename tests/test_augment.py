import pytest
import torch

from intrain.data.augment import AugmentedLoader, crop_flip_params, in_order, random_crop_flip
from intrain.data.dataset import ImageDataset


def _images(n, c=3, h=8, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.int64).to(torch.uint8)


def _reference(img, dy, dx, flip, p):
    """Slow per-image reference: pad with zeros, crop, flip."""
    c, h, w = img.shape
    out = torch.zeros_like(img)
    for ch in range(c):
        for y in range(h):
            for x in range(w):
                sx = w - 1 - x if flip else x
                py, px = y + dy - p, sx + dx - p
                if 0 <= py < h and 0 <= px < w:
                    out[ch, y, x] = img[ch, py, px]
    return out


@pytest.mark.parametrize("padding", [0, 1, 4])
def test_matches_reference(padding):
    x = _images(24, h=7, w=9)
    ids = torch.arange(100, 124, dtype=torch.int64)
    out = random_crop_flip(x, ids, seed=3, epoch=2, padding=padding)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    dy, dx, flip = crop_flip_params(ids, 3, 2, padding)
    for i in range(len(ids)):
        ref = _reference(x[i], int(dy[i]), int(dx[i]), int(flip[i]), padding)
        assert torch.equal(out[i], ref)


def test_param_ranges_and_coverage():
    ids = torch.arange(20000, dtype=torch.int64)
    dy, dx, flip = crop_flip_params(ids, 7, 0, 4)
    for t in (dy, dx, flip):
        assert t.dtype == torch.int64
    assert int(dy.min()) == 0 and int(dy.max()) == 8
    assert int(dx.min()) == 0 and int(dx.max()) == 8
    assert set(flip.tolist()) == {0, 1}
    # roughly uniform: every offset pair and both flips are used
    counts = torch.bincount(dy * 9 + dx, minlength=81)
    assert int(counts.min()) > 150
    assert 9000 < int(flip.sum()) < 11000
    # crop and flip are not tied to each other
    n0, f0 = int((dy == 0).sum()), int(flip[dy == 0].sum())
    assert 4 * n0 < 10 * f0 < 6 * n0


def test_determinism_and_seed_epoch_dependence():
    x = _images(64)
    ids = torch.arange(64, dtype=torch.int64)
    a = random_crop_flip(x, ids, seed=1, epoch=0)
    assert torch.equal(a, random_crop_flip(x, ids, seed=1, epoch=0))
    assert not torch.equal(a, random_crop_flip(x, ids, seed=2, epoch=0))
    assert not torch.equal(a, random_crop_flip(x, ids, seed=1, epoch=1))


def test_independent_of_batch_composition():
    x = _images(10)
    ids = torch.arange(50, 60, dtype=torch.int64)
    full = random_crop_flip(x, ids, seed=5, epoch=3)
    perm = torch.tensor([7, 2, 9, 0], dtype=torch.int64)
    part = random_crop_flip(x[perm], ids[perm], seed=5, epoch=3)
    assert torch.equal(part, full[perm])


def test_padding_zero_only_flips():
    x = _images(16)
    ids = torch.arange(16, dtype=torch.int64)
    out = random_crop_flip(x, ids, seed=0, epoch=0, padding=0)
    _, _, flip = crop_flip_params(ids, 0, 0, 0)
    for i in range(16):
        assert torch.equal(out[i], x[i].flip(-1) if flip[i] else x[i])


def test_bad_arguments():
    x = _images(2)
    ids = torch.arange(2, dtype=torch.int64)
    with pytest.raises(ValueError):
        random_crop_flip(x.to(torch.int16), ids, 0, 0)
    with pytest.raises(ValueError):
        random_crop_flip(x, ids[:1], 0, 0)
    with pytest.raises(ValueError):
        random_crop_flip(x, ids, -1, 0)
    with pytest.raises(ValueError):
        random_crop_flip(x, ids.to(torch.int32), 0, 0)
    with pytest.raises(ValueError):
        random_crop_flip(x, ids, 0, 0, padding=-1)


def _dataset(n=37):
    labels = torch.arange(n, dtype=torch.int64) % 10
    return ImageDataset(_images(n, h=6, w=6, seed=1), labels, 10, "toy")


def _collect(loader):
    return [tuple(t.clone() for t in batch) for batch in loader]


@pytest.mark.parametrize("augment", [False, True])
def test_loader_batches(augment):
    ds = _dataset()
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))
    loader = AugmentedLoader(ds, order, batch_size=8, seed=4, epoch=1, augment=augment)
    batches = _collect(loader)
    assert len(loader) == 5 and len(batches) == 5
    assert [b[0].shape[0] for b in batches] == [8, 8, 8, 8, 5]
    for k, (xb, yb, ib) in enumerate(batches):
        assert xb.dtype == torch.uint8 and yb.dtype == torch.int64 and ib.dtype == torch.int64
        assert torch.equal(ib, order[8 * k: 8 * k + 8])
        assert torch.equal(yb, ds.labels[ib])
        expect = random_crop_flip(ds.images[ib], ib, 4, 1) if augment else ds.images[ib]
        assert torch.equal(xb, expect)


def test_loader_same_for_any_num_workers_and_start_batch():
    ds = _dataset(53)
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(1))
    ref = _collect(AugmentedLoader(ds, order, 6, seed=9, epoch=2, augment=True, num_workers=0))
    got = _collect(AugmentedLoader(ds, order, 6, seed=9, epoch=2, augment=True, num_workers=2))
    assert len(ref) == len(got) == 9
    for a, b in zip(ref, got):
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    resumed = _collect(AugmentedLoader(ds, order, 6, seed=9, epoch=2, augment=True, start_batch=4))
    assert len(resumed) == 5
    for a, b in zip(ref[4:], resumed):
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    # resuming exactly at the end gives an empty epoch
    assert _collect(AugmentedLoader(ds, order, 6, 9, 2, True, start_batch=9)) == []


def test_loader_bad_arguments():
    ds = _dataset(10)
    order = torch.arange(10, dtype=torch.int64)
    with pytest.raises(ValueError):
        AugmentedLoader(ds, order, 0, 0, 0, True)
    with pytest.raises(ValueError):
        AugmentedLoader(ds, order, 4, 0, 0, True, start_batch=4)
    with pytest.raises(ValueError):
        AugmentedLoader(ds, torch.arange(11, dtype=torch.int64), 4, 0, 0, True)
    with pytest.raises(ValueError):
        AugmentedLoader(ds, order.to(torch.int32), 4, 0, 0, True)


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**40), epoch=st.integers(0, 10**6), padding=st.integers(0, 5),
       ids=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=6),
       h=st.integers(1, 6), w=st.integers(1, 6))
def test_property_matches_reference(seed, epoch, padding, ids, h, w):
    ids_t = torch.tensor(ids, dtype=torch.int64)
    x = _images(len(ids), c=2, h=h, w=w, seed=seed % 1000)
    out = random_crop_flip(x, ids_t, seed, epoch, padding)
    dy, dx, flip = crop_flip_params(ids_t, seed, epoch, padding)
    assert int(dy.min()) >= 0 and int(dy.max()) <= 2 * padding
    assert int(dx.min()) >= 0 and int(dx.max()) <= 2 * padding
    for i in range(len(ids)):
        assert torch.equal(out[i], _reference(x[i], int(dy[i]), int(dx[i]), int(flip[i]), padding))


@pytest.mark.parametrize("world", [2, 3, 6])
def test_loader_shards_are_the_whole_batches_cut_in_order(world):
    """Process r of a data-parallel run loads samples [floor(r*B/N), floor((r+1)*B/N)) of every
    batch, augmented as in the whole batch; a batch of fewer than N samples leaves empty shards."""
    ds = _dataset(37)
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(2))
    whole = _collect(AugmentedLoader(ds, order, batch_size=9, seed=4, epoch=1, augment=True, start_batch=1))
    shards = [_collect(AugmentedLoader(ds, order, batch_size=9, seed=4, epoch=1, augment=True, start_batch=1,
                                       shard=(rank, world))) for rank in range(world)]
    assert [len(s) for s in shards] == [len(whole)] * world
    assert whole[-1][0].shape[0] == 1  # 37 = 4 * 9 + 1
    for k, batch in enumerate(whole):
        for part in range(3):
            assert torch.equal(torch.cat([s[k][part] for s in shards]), batch[part])
    assert [s[-1][0].shape[0] for s in shards] == [0] * (world - 1) + [1]


def test_in_order_every_kth_batch():
    ds = _dataset(37)
    whole = [(x.clone(), y.clone()) for x, y in in_order(ds, 8)]
    for step in (1, 2, 3, 7):
        for first in range(step):
            part = [(x.clone(), y.clone()) for x, y in in_order(ds, 8, every=(first, step))]
            expected = whole[first::step]
            assert len(part) == len(expected)
            assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(part, expected))
