"""Integer data augmentation (zero-padded random crop + horizontal flip), deterministic by seed.

The crop offsets and flip bit of an image are a pure function of ``(seed, epoch, sample_id)``,
drawn from the counter-based generator in ``intrain.numeric.rng`` (int64 tensors holding 32-bit values,
no intermediate reaches 2**63). So the augmented image depends only on its dataset index, never on
batch composition, batch size or the number of loader workers.

Guarantees: offsets ``dy, dx`` lie in ``[0, 2 * padding]``, ``flip`` in ``{0, 1}``; output images
are uint8 with the input's shape and values 0..255 (padding pixels are 0). Only integer tensor ops
(index arithmetic and gathers) are used.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from intrain.data.dataset import ImageDataset
from intrain.data.errors import DataError
from intrain.numeric.collective import shard_range
from intrain.numeric.rng import MASK32, STREAM_AUGMENT, derive_key, mix32

__all__ = ["crop_flip_params", "random_crop_flip", "AugmentedLoader", "in_order"]


def _check_nonneg_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return value


def _hash(sample_ids: torch.Tensor, key: tuple[int, int]) -> torch.Tensor:
    return mix32(mix32(sample_ids ^ key[0]) ^ key[1])


def crop_flip_params(sample_ids: torch.Tensor, seed: int, epoch: int, padding: int = 4):
    """``(dy, dx, flip)``, int64 tensors ``[B]``: offsets in ``[0, 2*padding]``, flip in {0, 1}."""
    _check_nonneg_int("seed", seed)
    _check_nonneg_int("epoch", epoch)
    _check_nonneg_int("padding", padding)
    if sample_ids.dtype != torch.int64 or sample_ids.dim() != 1:
        raise ValueError(f"sample_ids must be an int64 tensor [B], got {sample_ids.dtype} "
                         f"{tuple(sample_ids.shape)}")
    if sample_ids.numel() and (int(sample_ids.min()) < 0 or int(sample_ids.max()) > MASK32):
        raise ValueError("sample_ids must lie in [0, 2**32)")
    h_crop = _hash(sample_ids, derive_key(seed, epoch, STREAM_AUGMENT, 0))
    h_flip = _hash(sample_ids, derive_key(seed, epoch, STREAM_AUGMENT, 1))
    span = 2 * padding + 1
    dy = ((h_crop & 0xFFFF) * span) >> 16  # multiply-shift: uniform-ish in [0, span)
    dx = ((h_crop >> 16) * span) >> 16
    flip = h_flip >> 31
    return dy, dx, flip


def random_crop_flip(images_u8: torch.Tensor, sample_ids: torch.Tensor, seed: int, epoch: int,
                     padding: int = 4) -> torch.Tensor:
    """Zero-pad by ``padding``, crop back to ``H x W`` at a per-sample offset, maybe flip left-right."""
    if images_u8.dtype != torch.uint8 or images_u8.dim() != 4:
        raise ValueError(f"images must be a uint8 tensor [B, C, H, W], got {images_u8.dtype} "
                         f"{tuple(images_u8.shape)}")
    b, c, h, w = images_u8.shape
    if sample_ids.shape != (b,):
        raise ValueError(f"sample_ids must have shape [{b}], got {tuple(sample_ids.shape)}")
    dy, dx, flip = crop_flip_params(sample_ids.to(images_u8.device), seed, epoch, padding)
    p = padding
    hp, wp = h + 2 * p, w + 2 * p
    padded = images_u8.new_zeros((b, c, hp, wp))
    padded[:, :, p:p + h, p:p + w] = images_u8
    dev = images_u8.device
    ar_h = torch.arange(h, dtype=torch.int64, device=dev)
    ar_w = torch.arange(w, dtype=torch.int64, device=dev)
    rows = dy[:, None] + ar_h[None, :]                                                 # [B, H]
    cols = dx[:, None] + ar_w[None, :] + flip[:, None] * (w - 1 - 2 * ar_w[None, :])  # [B, W]
    flat = (rows[:, :, None] * wp + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return padded.view(b, c, hp * wp).gather(2, flat).view(b, c, h, w)

class _BatchSampler(Sampler):
    """Yields lists of dataset indices: consecutive slices of ``order``, from ``start_batch`` on,
    each cut to the samples of process ``rank`` of ``world`` (``numeric.collective.shard_range``)."""

    def __init__(self, order: torch.Tensor, batch_size: int, start_batch: int, rank: int = 0, world: int = 1):
        self.order = order
        self.batch_size = batch_size
        self.start_batch = start_batch
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        n = self.order.numel()
        return max(0, -(-n // self.batch_size) - self.start_batch)

    def __iter__(self):
        return (batch.tolist() for batch in self.index_tensors())

    def index_tensors(self):
        """The same batches as int64 tensors (views of ``order``), for reading in this process."""
        n = self.order.numel()
        for start in range(self.start_batch * self.batch_size, n, self.batch_size):
            batch = self.order[start:start + self.batch_size]
            first, stop = shard_range(batch.numel(), self.rank, self.world)
            yield batch[first:stop]


class _AugmentedBatches(Dataset):
    """Map-style view whose ``__getitems__`` builds a whole (augmented) batch at once."""

    def __init__(self, images, labels, seed, epoch, augment, padding):
        self.images, self.labels = images, labels
        self.seed, self.epoch, self.augment, self.padding = seed, epoch, augment, padding

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitems__(self, indices):
        idx = torch.as_tensor(indices, dtype=torch.int64)
        # index_select copies whole rows: several times faster than indexing (MNIST at batch 64)
        x = torch.index_select(self.images, 0, idx)
        if self.augment:
            x = random_crop_flip(x, idx, self.seed, self.epoch, self.padding)
        return x, torch.index_select(self.labels, 0, idx), idx

    def __getitem__(self, i):
        return self.__getitems__([i])


class _DecodedBatches(Dataset):
    """Map-style view of a data set with ``load_batch`` (decoded when read); ``__getitems__`` returns
    a batch, or the ``DataError`` met while decoding it (raised again by ``AugmentedLoader``)."""

    def __init__(self, dataset, seed, epoch, augment):
        self.dataset = dataset
        self.seed, self.epoch, self.augment = seed, epoch, augment

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, indices):
        idx = torch.as_tensor(indices, dtype=torch.int64)
        try:
            x = self.dataset.load_batch(idx, self.seed, self.epoch, self.augment)
        except DataError as err:  # returned, not raised: a worker would wrap it in a traceback
            return err
        return x, self.dataset.labels[idx], idx

    def __getitem__(self, i):
        return self.__getitems__([i])


def _as_is(batch):
    return batch


class AugmentedLoader:
    """One epoch over ``dataset`` in the given ``order``, in batches of ``batch_size``.

    Yields ``(images uint8 [B, C, H, W], labels int64 [B], indices int64 [B])``; the last batch may
    be smaller. Batches come out in order with identical content for any ``num_workers``;
    ``start_batch`` skips that many leading batches (resuming mid-epoch). ``shard=(rank, world)``:
    each batch holds only the samples process ``rank`` of a data-parallel run takes
    (``numeric.collective.shard_range``; possibly none), read and augmented as in the whole batch.
    """

    def __init__(self, dataset, order: torch.Tensor, batch_size: int, seed: int, epoch: int,
                 augment: bool, num_workers: int = 0, start_batch: int = 0, padding: int = 4,
                 shard: tuple[int, int] = (0, 1)):
        _check_nonneg_int("seed", seed)
        _check_nonneg_int("epoch", epoch)
        _check_nonneg_int("num_workers", num_workers)
        _check_nonneg_int("start_batch", start_batch)
        _check_nonneg_int("padding", padding)
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        n = len(dataset)
        if not isinstance(order, torch.Tensor) or order.dtype != torch.int64 or order.dim() != 1:
            raise ValueError("order must be a 1-D int64 tensor of dataset indices")
        order = order.cpu()
        if order.numel() and (int(order.min()) < 0 or int(order.max()) >= n):
            raise ValueError(f"order holds indices outside [0, {n})")
        n_batches = -(-order.numel() // batch_size)
        if start_batch > n_batches:
            raise ValueError(f"start_batch {start_batch} is past the {n_batches} batches of the epoch")
        self.batch_sampler = _BatchSampler(order, batch_size, start_batch, *shard)
        if isinstance(dataset, ImageDataset):
            self._data = _AugmentedBatches(dataset.images, dataset.labels, seed, epoch, bool(augment), padding)
        else:
            self._data = _DecodedBatches(dataset, seed, epoch, bool(augment))
        self.num_workers = num_workers

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self):
        if self.num_workers == 0:  # read here, without DataLoader's own cost per batch
            for indices in self.batch_sampler.index_tensors():
                batch = self._data.__getitems__(indices)
                if isinstance(batch, DataError):
                    raise DataError(str(batch)) from None
                yield batch
            return
        # A DataLoader iterator draws its base seed from torch's global generator when it starts;
        # our batches use no torch randomness, so the generator's state is put back (a float
        # twin's dropout stream must not depend on how many loaders ran).
        state = torch.get_rng_state()
        try:
            it = iter(DataLoader(self._data, batch_sampler=self.batch_sampler, collate_fn=_as_is,
                                 num_workers=self.num_workers))
        finally:
            torch.set_rng_state(state)
        for batch in it:
            if isinstance(batch, DataError):
                break
            yield batch
        else:
            return
        del it  # stop the workers now, not when a traceback holding this frame is collected
        raise DataError(str(batch)) from None


def in_order(dataset, batch_size: int, num_workers: int = 0, every: tuple[int, int] = (0, 1)):
    """``(images uint8 [B, C, H, W], labels int64 [B])`` of ``dataset`` in index order, in batches of
    ``batch_size`` (the last may be smaller), without augmentation (centre crops for a decoded
    data set, read by ``num_workers`` loader processes). An in-memory ``ImageDataset`` is sliced
    directly, in this process. ``every=(r, k)``: only the batches ``r, r + k, r + 2k, ...`` (the
    share of process r of k evaluating together), the same batches as in the whole sequence."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    first, step = every
    starts = range(first * batch_size, len(dataset), step * batch_size)
    if isinstance(dataset, ImageDataset):
        for start in starts:
            yield dataset.images[start:start + batch_size], dataset.labels[start:start + batch_size]
        return
    # Only the last batch of the whole sequence can be short, and it comes last here too, so
    # cutting this order into batch_size pieces gives exactly the chosen batches.
    order = torch.cat([torch.arange(start, min(start + batch_size, len(dataset)), dtype=torch.int64)
                       for start in starts] or [torch.zeros(0, dtype=torch.int64)])
    for images, labels, _ in AugmentedLoader(dataset, order, batch_size, 0, 0, False, num_workers=num_workers):
        yield images, labels
