"""Data-loading speed of ``--dataset imagefolder``: images per second per loader process.

Writes ``--images`` generated JPEGs of ImageNet-like size (500x375, quality 90, smooth colour
fields plus per-pixel noise tuned so the mean file is about ImageNet-1K's, ~110 KB: 1.28M
training images in ~140 GB) into a temporary ``train/<class>/`` folder, then times, in this
process (one loader process's work, one thread), what ``intrain.data.imagefolder`` does per
image: Pillow decode, RGB conversion, resize of the shorter side to 256 and a 224x224 crop,
for training (random crop and flip) and evaluation (centre crop), and separately the decode alone,
per second of this process's CPU time (one core's rate, what matters where cores are shared) and
of wall time. Then one epoch over the folder through ``AugmentedLoader`` with ``--workers``
processes (wall time).
The model's step time is not included. Run with OMP_NUM_THREADS=1 for a per-core figure:

    OMP_NUM_THREADS=1 python benchmarks/imagefolder_speed.py --images 300 --workers 2
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import PIL
from intrain.data.augment import AugmentedLoader
from intrain.data.imagefolder import crop_params, decode_image, load_imagefolder

IMAGENET_TRAIN_IMAGES = 1_281_167


def _photo_like(g: np.random.Generator, width: int, height: int, noise: float) -> Image.Image:
    def field(h, w):
        low = Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8))
        return np.asarray(low.resize((width, height), Image.Resampling.BICUBIC)).astype(np.int16)

    a = field(12, 16) * 3 // 4 + field(47, 63) // 4 + g.normal(0, noise, (height, width, 3)).astype(np.int16)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def make_folder(root: Path, n: int, width: int, height: int, noise: float, quality: int) -> float:
    """``n`` JPEGs in root/train/c<k>/ and one in root/val/c<k>/ (10 classes); mean file size in bytes."""
    g = np.random.default_rng(0)
    sizes = []
    for i in range(n):
        for split in ("train",) + (("val",) if i < 10 else ()):
            folder = root / split / f"c{i % 10}"
            folder.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            _photo_like(g, width, height, noise).save(buf, "JPEG", quality=quality)
            (folder / f"{i:06d}.jpg").write_bytes(buf.getvalue())
            if split == "train":
                sizes.append(len(buf.getvalue()))
    return statistics.fmean(sizes)


def _rate(fn, paths) -> tuple[float, float]:
    """Images per second of wall time and of this process's CPU time (the latter is what one
    core does when the machine's cores are shared with other jobs)."""
    wall, cpu = time.perf_counter(), time.process_time()
    for i, p in enumerate(paths):
        fn(i, p)
    return len(paths) / (time.perf_counter() - wall), len(paths) / (time.process_time() - cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--size", type=int, default=224, help="--image-size (crop side)")
    ap.add_argument("--width", type=int, default=500)
    ap.add_argument("--height", type=int, default=375)
    ap.add_argument("--noise", type=float, default=22.0, help="per-pixel noise (sets the file size)")
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--workers", type=int, default=2, help="loader processes for the epoch through AugmentedLoader")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        mean_bytes = make_folder(root, args.images, args.width, args.height, args.noise, args.quality)
        train = load_imagefolder(root, args.size).train
        paths = [train.path(i) for i in range(len(train))]
        crops = list(zip(*crop_params(torch.arange(len(train)), 0, 0)))

        def decode_only(i, p):
            with Image.open(p) as im:
                im.load()

        def train_crop(i, p):
            decode_image(p, args.size, crops[i])

        def eval_crop(i, p):
            decode_image(p, args.size)

        for fn in (decode_only, train_crop, eval_crop):  # warm the page cache and Pillow
            _rate(fn, paths[:20])
        rates = {name: [] for name in ("decode", "train", "eval")}  # (wall, cpu) rate pairs
        for _ in range(args.repeats):
            rates["decode"].append(_rate(decode_only, paths))
            rates["train"].append(_rate(train_crop, paths))
            rates["eval"].append(_rate(eval_crop, paths))

        order = torch.arange(len(train))
        start = time.perf_counter()
        n = sum(x.shape[0] for x, _, _ in AugmentedLoader(train, order, args.batch, 0, 0, True,
                                                          num_workers=args.workers))
        loader_rate = n / (time.perf_counter() - start)

    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    print(f"cpu: {cpu}, {os.cpu_count()} cores; python {platform.python_version()}, Pillow {PIL.__version__}, "
          f"torch {torch.__version__}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    print(f"{args.images} JPEGs {args.width}x{args.height}, quality {args.quality}, mean {mean_bytes / 1e3:.1f} kB; "
          f"crop {args.size} (shorter side {train.image_size * 8 / 7:.0f})")
    for name, what in (("decode", "decode only"), ("train", "decode+resize+random crop+flip"),
                       ("eval", "decode+resize+centre crop")):
        wall, cpu = [w for w, _ in rates[name]], [c for _, c in rates[name]]
        print(f"  {what:32s} per CPU second: median {statistics.median(cpu):6.1f} images/s; per wall second: "
              f"median {statistics.median(wall):6.1f}, best {max(wall):6.1f} (runs: {', '.join(f'{v:.0f}' for v in wall)})")
    print(f"  AugmentedLoader, {args.workers} workers, batch {args.batch}: {loader_rate:.1f} images/s (wall)")
    per_core = statistics.median(c for _, c in rates["train"])
    hours = IMAGENET_TRAIN_IMAGES / per_core / 3600
    print(f"ImageNet-1K training epoch ({IMAGENET_TRAIN_IMAGES} images), data loading alone: {hours:.2f} core-hours "
          f"({hours * 60 / 16:.1f} min on 16 loader processes)")


if __name__ == "__main__":
    main()
