"""ImageNet-layout image folders, decoded lazily with Pillow: ``DIR/train/<class>/*``, ``DIR/val/<class>/*``.

Layout and order. The classes are the sorted names of the sub-folders of ``DIR/train`` (hidden
ones, starting with ".", are skipped); class ``k`` is the k-th name. ``DIR/val`` must hold a folder
for each of these classes and no other (a val class missing from train/ is an error naming it;
an empty val class folder is allowed, an empty train class folder is not). The images of a
class are its files ending in ``.jpg``, ``.jpeg`` or ``.png`` (any case), sorted by name (Python
string order); other files and nested folders are ignored. Image ``i`` of a split is the i-th in
(class, name) order, so the index order depends only on the file names.

Decoding (``decode_image``). Pillow opens the file (by its content, not its extension) and
converts it to RGB: grayscale is replicated to three channels, an alpha channel is dropped
(no compositing), palette and CMYK images go through Pillow's conversion, 16-bit grayscale PNGs
keep their high byte. EXIF orientation is not applied. The shorter side is resized to
``resize_size(image_size) = round(image_size * 8 / 7)`` (256 for 224, the usual ImageNet ratio;
computed as ``(16 * s + 7) // 14``, never a tie) and the longer one to ``round(long * R / short)``
(integer arithmetic, half up), with Pillow's bilinear filter (antialiased when shrinking). Then an
``image_size`` x ``image_size`` square is cut out:

* training (``augment=True``): at offsets ``dy`` in ``[0, H' - s]``, ``dx`` in ``[0, W' - s]``, and
  mirrored left-right when ``flip`` is 1, where ``(dy, dx, flip)`` are a pure function of
  ``(seed, epoch, image index)`` and of the resized size, drawn from the counter-based generator
  (``intrain.numeric.rng``, the augmentation stream ``STREAM_AUGMENT`` with sub-streams 2, 3, 4,
  disjoint from ``intrain.data.augment``'s 0 and 1); ``offset = (h * span) >> 32`` for a 32-bit
  hash ``h`` and ``span`` possible offsets;
* evaluation (and training with ``augment=False``): the centre square,
  ``dy = (H' - s) // 2``, ``dx = (W' - s) // 2``, no flip.

The result is uint8 ``[3, s, s]`` (values 0..255, channels R, G, B), and becomes the network's
input like every other data set's pixels (``intrain.data.pixels.pixels_to_int8`` with
``channel_mean``). Determinism: an image's pixels depend only on its file, ``image_size``, and
for training ``(seed, epoch, index)``: never on the batch, the batch size or the number of loader
processes. They are bit for bit reproducible for a fixed Pillow version (with its bundled
libjpeg-turbo and zlib): Pillow's JPEG decoder and its resampling (weights computed in double
precision, applied in fixed point) may change between versions. This is data preparation
before the integer training step, like reading an IDX file; the step itself sees only integers.

Channel mean. ``IMAGENET_MEAN_U8 = (124, 116, 104)``: the usual ImageNet RGB mean (0.485, 0.456,
0.406) times 255, rounded to integers, used for every image folder. It is a fixed constant
rather than the folder's own mean (as CIFAR-10's is) because computing that needs a full pass
decoding every training image (an epoch of data loading on ImageNet-1K); it is recorded in
config.json like any channel mean.

Splits. The eval split is ``val/`` ("validation"). ``--val-split`` and ``--train-limit`` are
refused: in (class, name) order the last (or first) N training images belong to the last (or
first) classes only, which would make a misleading validation (or training) set.

Errors. A missing folder, no class folders, a class without images, a mismatch between train/
and val/ class folders, or a bad ``image_size``: ``DataError`` when the data set is loaded,
before a run writes anything. Files are only listed then, not decoded (decoding ImageNet once
takes as long as an epoch's data loading), so a corrupt or unreadable image is found when it is
first decoded: ``DataError`` with one line naming the file, also from a loader worker process
(``intrain.data.augment.AugmentedLoader`` passes it to the main process as that one line).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from intrain.data.dataset import DatasetSplits, check_split_args
from intrain.data.errors import DataError
from intrain.numeric.rng import STREAM_AUGMENT, derive_key, mix32

__all__ = ["IMAGE_EXTENSIONS", "IMAGENET_MEAN_U8", "DEFAULT_IMAGE_SIZE", "ImageFolderDataset", "crop_params",
           "decode_image", "load_imagefolder", "resize_size", "resized_shape"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
#: ImageNet's RGB mean (0.485, 0.456, 0.406) x 255 = (123.675, 116.28, 103.53), rounded.
IMAGENET_MEAN_U8 = (124, 116, 104)
DEFAULT_IMAGE_SIZE = 224
_LAYOUT = "<class>/<image>.jpg|.jpeg|.png"
_MASK32 = 0xFFFFFFFF


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_image_size(image_size) -> int:
    """``image_size`` itself when it is an int >= 1, else ``DataError``."""
    if not _is_int(image_size) or image_size < 1:
        raise DataError(f"--image-size must be an integer >= 1, got {image_size!r}")
    return image_size


def resize_size(image_size: int) -> int:
    """The shorter side before cropping: ``round(image_size * 8 / 7)`` (224 -> 256), in integers."""
    return (16 * check_image_size(image_size) + 7) // 14


def resized_shape(height: int, width: int, image_size: int) -> tuple[int, int]:
    """``(H', W')``: the shorter side ``resize_size(image_size)``, the longer one scaled by the same
    ratio and rounded half up (integer arithmetic)."""
    r = resize_size(image_size)
    if height <= width:
        return r, (2 * width * r + height) // (2 * height)
    return (2 * height * r + width) // (2 * width), r


def _hashes(sample_ids: torch.Tensor, seed: int, epoch: int, sub: int) -> torch.Tensor:
    k1, k2 = derive_key(seed, epoch, STREAM_AUGMENT, sub)
    return mix32(mix32(sample_ids ^ k1) ^ k2)


def crop_params(sample_ids: torch.Tensor, seed: int, epoch: int) -> tuple[list[int], list[int], list[int]]:
    """Per sample, three 32-bit hashes ``(hy, hx, flip_hash)`` of ``(seed, epoch, sample id)``; the
    offsets are ``(h * span) >> 32`` for ``span`` possible offsets and the flip bit ``flip_hash >> 31``."""
    if not (_is_int(seed) and seed >= 0 and _is_int(epoch) and epoch >= 0):
        raise ValueError(f"seed and epoch must be non-negative ints, got {seed!r}, {epoch!r}")
    if sample_ids.dtype != torch.int64 or sample_ids.dim() != 1:
        raise ValueError(f"sample_ids must be an int64 tensor [B], got {sample_ids.dtype} {tuple(sample_ids.shape)}")
    if sample_ids.numel() and (int(sample_ids.min()) < 0 or int(sample_ids.max()) > _MASK32):
        raise ValueError("sample_ids must lie in [0, 2**32)")
    return tuple(_hashes(sample_ids, seed, epoch, sub).tolist() for sub in (2, 3, 4))


def _to_rgb(im):
    """``im`` (loaded) as an RGB image; 16-bit grayscale keeps its high byte (Pillow would clip)."""
    from PIL import Image

    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(im).astype(np.int64)
        im = Image.fromarray((np.clip(a, 0, 65535) >> 8).astype(np.uint8))
    return im if im.mode == "RGB" else im.convert("RGB")


def decode_image(path, image_size: int, crop: tuple[int, int, int] | None = None) -> np.ndarray:
    """The uint8 ``[3, s, s]`` array of the image at ``path`` (see the module docstring).

    ``crop=None`` takes the centre square; ``crop=(hy, hx, flip_hash)`` (from ``crop_params``) a
    random one. A file that cannot be read or decoded raises ``DataError`` naming it."""
    from PIL import Image

    s = check_image_size(image_size)
    try:
        with Image.open(path) as im:
            im.load()
            rgb = _to_rgb(im)
            w, h = rgb.size
            if w < 1 or h < 1:
                raise ValueError(f"image of size {w}x{h}")
            rh, rw = resized_shape(h, w, s)
            resized = rgb.resize((rw, rh), Image.Resampling.BILINEAR)
            a = np.asarray(resized)
    except DataError:
        raise
    except Exception as exc:  # OSError (unreadable, truncated), SyntaxError, ValueError, bombs, ...
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise DataError(f"{path}: cannot read or decode this image ({type(exc).__name__}"
                        f"{': ' + detail if detail else ''}): replace or remove the file") from None
    if crop is None:
        dy, dx, flip = (rh - s) // 2, (rw - s) // 2, 0
    else:
        hy, hx, hf = crop
        dy, dx, flip = (hy * (rh - s + 1)) >> 32, (hx * (rw - s + 1)) >> 32, hf >> 31
    a = a[dy:dy + s, dx:dx + s]
    if flip:
        a = a[:, ::-1]
    return a.transpose(2, 0, 1)


class ImageFolderDataset(torch.utils.data.Dataset):
    """One split of an image folder, decoded when an image is asked for (see the module docstring).

    ``len``, ``labels`` (int64 ``[N]`` in ``[0, num_classes)``), ``num_classes``, ``classes``,
    ``image_shape = (3, s, s)``; ``dataset[i]`` is ``(uint8 [3, s, s] centre crop, label)``;
    ``load_batch(indices, seed, epoch, augment)`` decodes a batch (random crops and flips when
    ``augment``). Holds only the file names (cheap to send to loader processes)."""

    def __init__(self, folder, classes: tuple[str, ...], labels: torch.Tensor, names: np.ndarray,
                 image_size: int, name: str):
        self.folder = Path(folder)
        self.classes = tuple(classes)
        self.labels = labels
        self.names = names  # numpy bytes array: os.fsencode of each file name within its class folder
        self.image_size = check_image_size(image_size)
        self.num_classes = len(self.classes)
        self.name = name
        if labels.dtype != torch.int64 or labels.dim() != 1 or labels.shape[0] != len(names):
            raise DataError(f"{name}: labels must be an int64 tensor with one label per file")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return 3, self.image_size, self.image_size

    def path(self, i: int) -> Path:
        """The file of image ``i``."""
        return self.folder / self.classes[int(self.labels[i])] / os.fsdecode(bytes(self.names[i]))

    def __getitem__(self, i) -> tuple[torch.Tensor, int]:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"{self.name}: index {i} outside [0, {len(self)})")
        return torch.from_numpy(np.ascontiguousarray(decode_image(self.path(i), self.image_size))), \
            int(self.labels[i])

    def load_batch(self, indices: torch.Tensor, seed: int, epoch: int, augment: bool) -> torch.Tensor:
        """uint8 ``[B, 3, s, s]``: images ``indices`` (int64 ``[B]``), random crops and flips keyed by
        ``(seed, epoch, index)`` when ``augment``, else centre crops. ``DataError`` names a bad file."""
        s = self.image_size
        out = np.empty((indices.numel(), 3, s, s), dtype=np.uint8)
        crops = list(zip(*crop_params(indices, seed, epoch))) if augment else [None] * indices.numel()
        for j, (i, crop) in enumerate(zip(indices.tolist(), crops)):
            out[j] = decode_image(self.path(i), s, crop)
        return torch.from_numpy(out)

    def identity(self) -> bytes:
        """What identifies the data without decoding it: image size, classes, labels, and each
        file's name and size (for the run's data fingerprint; reading every image would take as
        long as an epoch of loading)."""
        parts = [f"{self.image_size};{self.classes!r};".encode(), self.labels.numpy().tobytes()]
        for i in range(len(self)):
            path = self.path(i)
            parts.append(bytes(self.names[i]) + b"\0" + str(path.stat().st_size).encode() + b"\0")
        return b"".join(parts)

    def subset(self, start: int, stop: int) -> "ImageFolderDataset":
        """Images ``[start, stop)``."""
        n = len(self)
        if not (_is_int(start) and _is_int(stop) and 0 <= start <= stop <= n):
            raise DataError(f"{self.name}: subset [{start}, {stop}) outside [0, {n}]")
        return ImageFolderDataset(self.folder, self.classes, self.labels[start:stop], self.names[start:stop],
                                  self.image_size, self.name)

    def __repr__(self) -> str:
        return (f"ImageFolderDataset(folder={str(self.folder)!r}, n={len(self)}, "
                f"image_shape={self.image_shape}, num_classes={self.num_classes})")


def _sub_folders(folder: Path) -> list[str]:
    try:
        with os.scandir(folder) as it:
            return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
    except OSError as exc:
        raise DataError(f"cannot list {folder} ({type(exc).__name__}: {exc.strerror or exc})") from None


def _image_files(folder: Path) -> list[str]:
    try:
        with os.scandir(folder) as it:
            return sorted(e.name for e in it if e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file())
    except OSError as exc:
        raise DataError(f"cannot list {folder} ({type(exc).__name__}: {exc.strerror or exc})") from None


def _split(folder: Path, classes: list[str], image_size: int, name: str, empty_ok: bool) -> ImageFolderDataset:
    names, labels = [], []
    for k, cls in enumerate(classes):
        files = _image_files(folder / cls)
        if not files and not empty_ok:
            raise DataError(f"{folder / cls} holds no .jpg, .jpeg or .png images: add images or remove the "
                            "class folder")
        names += [os.fsencode(f) for f in files]
        labels += [k] * len(files)
    arr = np.array(names, dtype=np.bytes_) if names else np.zeros(0, dtype="S1")
    return ImageFolderDataset(folder, tuple(classes), torch.tensor(labels, dtype=torch.int64), arr, image_size, name)


def load_imagefolder(data_dir, image_size: int = DEFAULT_IMAGE_SIZE, val_split: int | None = None,
                     train_limit: int | None = None, tune_split: int | None = None) -> DatasetSplits:
    """The train/ and val/ splits of ``data_dir`` (see the module docstring); lists files, decodes none."""
    check_split_args(val_split, train_limit, tune_split)
    check_image_size(image_size)
    for flag, value in (("--val-split", val_split), ("--tune-split", tune_split), ("--train-limit", train_limit)):
        if value is not None:
            raise DataError(f"{flag} does not apply to imagefolder: the images are in (class, name) order, so "
                            "the last or first N would be of a few classes only; make val/ (or a smaller "
                            "folder) instead")
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist: expected {root}/train/{_LAYOUT} and "
                        f"{root}/val/{_LAYOUT}")
    for sub in ("train", "val"):
        if not (root / sub).is_dir():
            raise DataError(f"{root} has no {sub}/ folder: expected {root}/{sub}/{_LAYOUT}")
    classes = _sub_folders(root / "train")
    if not classes:
        raise DataError(f"{root / 'train'} has no class folders: expected {root}/train/{_LAYOUT}")
    val_classes = _sub_folders(root / "val")
    extra = sorted(set(val_classes) - set(classes))
    if extra:
        raise DataError(f"{root / 'val' / extra[0]} is not a class of {root / 'train'}: val/ must hold the "
                        "same class folders as train/")
    missing = sorted(set(classes) - set(val_classes))
    if missing:
        raise DataError(f"{root / 'val'} has no folder for class {missing[0]!r} of {root / 'train'}: val/ must hold "
                        "the same class folders as train/ (an empty one is allowed)")
    train = _split(root / "train", classes, image_size, "imagefolder-train", empty_ok=False)
    val = _split(root / "val", classes, image_size, "imagefolder-val", empty_ok=True)
    if len(val) == 0:
        raise DataError(f"{root / 'val'} holds no .jpg, .jpeg or .png images in its class folders: nothing to "
                        "evaluate on")
    return DatasetSplits(train=train, eval=val, eval_name="validation", channel_mean=IMAGENET_MEAN_U8)
