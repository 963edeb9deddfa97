"""``--dataset imagefolder``: ImageNet-layout folders decoded lazily with Pillow (intrain.data.imagefolder).

Small folders are generated in tmp_path: three classes, JPEG and PNG files of several sizes and
modes (RGB, grayscale, RGBA, palette, CMYK, 16-bit grayscale), upper-case extensions, a PNG named
.JPEG, and a stray text file.
"""

import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from intrain.cli import main
from intrain.data import DataError, load_dataset
from intrain.data.augment import AugmentedLoader, in_order
from intrain.data.imagefolder import (IMAGENET_MEAN_U8, ImageFolderDataset, crop_params, decode_image,
                                      load_imagefolder, resize_size, resized_shape)
from intrain.numeric import rng

from cli_checks import assert_refused

CLASSES = ("ant", "bee", "cat")
#: (height, width, mode, file name, format) per image of each class; sizes differ, both orientations.
FILES = (
    (40, 56, "RGB", "a.jpg", "JPEG"),
    (50, 36, "L", "b.PNG", "PNG"),
    (33, 33, "RGBA", "c.png", "PNG"),
    (45, 70, "P", "d.JPEG", "PNG"),  # a PNG named .JPEG: opened by its content
    (36, 48, "I;16", "e.png", "PNG"),
    (30, 41, "CMYK", "f.jpg", "JPEG"),
)
NAMES = [f[3] for f in FILES]


def _image(h, w, mode, seed):
    g = np.random.default_rng(seed)
    base = g.integers(0, 256, (h, w, 3), dtype=np.uint8)
    im = Image.fromarray(base)
    if mode == "RGB":
        return im
    if mode == "I;16":
        return Image.fromarray(g.integers(0, 65536, (h, w), dtype=np.uint16))
    return im.convert(mode)


def make_folder(root, val_files=2, classes=CLASSES):
    """root/train/<class>/{a.jpg, b.PNG, c.png, d.JPEG, e.png, f.jpg, notes.txt}, root/val/<class>/ the
    first ``val_files`` of them (other pixels)."""
    seed = 0
    for split, files in (("train", FILES), ("val", FILES[:val_files])):
        for cls in classes:
            folder = root / split / cls
            folder.mkdir(parents=True)
            for h, w, mode, name, fmt in files:
                seed += 1
                _image(h, w, mode, seed).save(folder / name, format=fmt)
            (folder / "notes.txt").write_text("not an image")
    return root


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "images")


def _reference(path, s, dy=None, dx=None, flip=0):
    """Straight Pillow: RGB (16-bit: high byte), shorter side round(8s/7), crop, maybe mirror."""
    im = Image.open(path)
    if im.mode.startswith("I"):
        im = Image.fromarray((np.asarray(im).astype(np.int64) >> 8).astype(np.uint8))
    im = im.convert("RGB")
    w, h = im.size
    r = round(s * 8 / 7)
    rh, rw = (r, math.floor(w * r / h + 0.5)) if h <= w else (math.floor(h * r / w + 0.5), r)
    a = np.asarray(im.resize((rw, rh), Image.Resampling.BILINEAR))
    if dy is None:
        dy, dx = (rh - s) // 2, (rw - s) // 2
    a = a[dy:dy + s, dx:dx + s]
    return (a[:, ::-1] if flip else a).transpose(2, 0, 1), (rh, rw)


def test_splits_shapes_order_and_mean(folder):
    splits = load_dataset("imagefolder", str(folder), image_size=16)
    train, val = splits.train, splits.eval
    assert isinstance(train, ImageFolderDataset) and splits.eval_name == "validation"
    assert splits.channel_mean == IMAGENET_MEAN_U8 == (124, 116, 104)
    assert (len(train), len(val)) == (18, 6) and train.classes == CLASSES and train.num_classes == 3
    assert train.image_shape == val.image_shape == (3, 16, 16)
    assert train.labels.dtype == torch.int64 and train.labels.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    # (class, name) order, extensions in any case, the .txt files skipped
    assert [train.path(i).name for i in range(6)] == NAMES
    assert train.path(8) == folder / "train" / "bee" / "c.png"
    for i in range(len(train)):
        x, y = train[i]
        assert x.dtype == torch.uint8 and x.shape == (3, 16, 16) and y == int(train.labels[i])
    gray = train[1][0]  # L: the three channels are equal
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    batch = train.load_batch(torch.arange(18), seed=0, epoch=0, augment=True)
    assert batch.dtype == torch.uint8 and batch.shape == (18, 3, 16, 16)


def test_resize_rule():
    assert [resize_size(s) for s in (224, 32, 16, 1, 7)] == [256, 37, 18, 1, 8]
    assert all(resize_size(s) == round(s * 8 / 7) for s in range(1, 2000))
    assert resized_shape(375, 500, 224) == (256, 341) and resized_shape(500, 375, 224) == (341, 256)
    assert resized_shape(100, 100, 224) == (256, 256)


def test_centre_crop_and_modes_match_pillow(folder):
    train = load_dataset("imagefolder", str(folder), image_size=20).train
    for i in range(6):  # one image of each mode
        expect, _ = _reference(train.path(i), 20)
        assert np.array_equal(train[i][0].numpy(), expect), train.path(i)
    # evaluation is the centre crop: the same as dataset[i] and as load_batch without augmentation
    val = load_dataset("imagefolder", str(folder), image_size=20).eval
    both = val.load_batch(torch.arange(len(val)), seed=3, epoch=5, augment=False)
    assert all(torch.equal(both[i], val[i][0]) for i in range(len(val)))


def test_random_crops_keyed_by_seed_epoch_index(folder):
    train = load_dataset("imagefolder", str(folder), image_size=16).train
    ids = torch.arange(len(train))
    a = train.load_batch(ids, seed=1, epoch=2, augment=True)
    assert torch.equal(a, train.load_batch(ids, seed=1, epoch=2, augment=True))
    assert not torch.equal(a, train.load_batch(ids, seed=2, epoch=2, augment=True))
    assert not torch.equal(a, train.load_batch(ids, seed=1, epoch=3, augment=True))
    part = torch.tensor([9, 0, 17, 4])  # independent of the batch it is in
    assert torch.equal(train.load_batch(part, 1, 2, True), a[part])
    hy, hx, hf = crop_params(ids, 1, 2)
    for i in range(len(train)):
        _, (rh, rw) = _reference(train.path(i), 16)
        dy, dx, flip = (hy[i] * (rh - 15)) >> 32, (hx[i] * (rw - 15)) >> 32, hf[i] >> 31
        expect, _ = _reference(train.path(i), 16, dy, dx, flip)
        assert np.array_equal(a[i].numpy(), expect)


def test_crop_offsets_cover_their_range():
    hy, hx, hf = crop_params(torch.arange(20000), 7, 0)
    dy = torch.tensor([(h * 9) >> 32 for h in hy])
    counts = torch.bincount(dy, minlength=9)
    assert counts.numel() == 9 and int(counts.min()) > 1900
    assert 9000 < sum(h >> 31 for h in hf) < 11000
    assert [(h * 1) >> 32 for h in hx[:5]] == [0] * 5  # a single possible offset
    # a stream of its own: not augment.py's crop hashes for the same ids
    from intrain.data.augment import crop_flip_params
    dy0, _, _ = crop_flip_params(torch.arange(20000), 7, 0, padding=4)
    assert not torch.equal(dy0, dy)


def _batches(loader):
    return [tuple(t.clone() for t in batch) for batch in loader]


def test_loader_same_batches_for_any_workers(folder):
    train = load_dataset("imagefolder", str(folder), image_size=16).train
    order = rng.permutation(len(train), 5, 1)
    ref = _batches(AugmentedLoader(train, order, 4, seed=5, epoch=1, augment=True, num_workers=0))
    state = torch.get_rng_state()
    got = _batches(AugmentedLoader(train, order, 4, seed=5, epoch=1, augment=True, num_workers=2))
    assert torch.equal(state, torch.get_rng_state())  # the global generator is left alone
    assert [b[0].shape[0] for b in ref] == [4, 4, 4, 4, 2]
    for k, ((xa, ya, ia), (xb, yb, ib)) in enumerate(zip(ref, got, strict=True)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ia, ib)
        assert torch.equal(ia, order[4 * k:4 * k + 4]) and torch.equal(ya, train.labels[ia])
        assert torch.equal(xa, train.load_batch(ia, 5, 1, True))
    # evaluation: index order, centre crops, any number of workers
    val = load_dataset("imagefolder", str(folder), image_size=16).eval
    seq = [(x.clone(), y.clone()) for x, y in in_order(val, 4, 0)]
    par = [(x.clone(), y.clone()) for x, y in in_order(val, 4, 2)]
    assert [x.shape[0] for x, _ in seq] == [4, 2]
    assert torch.equal(torch.cat([x for x, _ in seq]), torch.stack([val[i][0] for i in range(len(val))]))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(seq, par, strict=True))


def test_loader_shards_and_eval_share_of_a_decoded_folder(folder):
    """Data-parallel reading of decoded images: the shards of every training batch (rank 0's empty
    in the last batch of 2 images over 3 processes) and every other eval batch are the pixels of
    one process's batches."""
    data = load_dataset("imagefolder", str(folder), image_size=16)
    order = rng.permutation(len(data.train), 5, 1)
    whole = _batches(AugmentedLoader(data.train, order, 4, seed=5, epoch=1, augment=True))
    shards = [_batches(AugmentedLoader(data.train, order, 4, seed=5, epoch=1, augment=True, num_workers=1,
                                       shard=(rank, 3))) for rank in range(3)]
    for k, batch in enumerate(whole):
        for part in range(3):
            assert torch.equal(torch.cat([s[k][part] for s in shards]), batch[part])
    assert [s[-1][0].shape[0] for s in shards] == [0, 1, 1]
    seq = [(x.clone(), y.clone()) for x, y in in_order(data.eval, 4)]
    for first in (0, 1):
        part = [(x.clone(), y.clone()) for x, y in in_order(data.eval, 4, 1, every=(first, 2))]
        assert len(part) == 1 and torch.equal(part[0][0], seq[first][0]) and torch.equal(part[0][1], seq[first][1])


def _corrupt(folder):
    bad = folder / "train" / "bee" / "d.JPEG"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated
    (folder / "train" / "cat" / "b.PNG").write_bytes(b"this is not a PNG")
    return bad


def test_corrupt_image_names_the_file(folder):
    bad = _corrupt(folder)
    train = load_dataset("imagefolder", str(folder), image_size=16).train  # listing decodes nothing
    with pytest.raises(DataError) as info:
        train[9]
    assert str(bad) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(DataError, match=re.escape(str(folder / "train" / "cat" / "b.PNG"))):
        decode_image(folder / "train" / "cat" / "b.PNG", 16)
    with pytest.raises(DataError, match="cannot read"):
        decode_image(folder / "train" / "cat" / "missing.png", 16)
    for workers in (0, 2):  # in this process and from a worker: the same one-line DataError
        loader = AugmentedLoader(train, torch.arange(len(train)), 4, 0, 0, True, num_workers=workers)
        with pytest.raises(DataError) as info:
            _batches(loader)
        assert str(info.value).startswith(str(bad)) and "\n" not in str(info.value)
        assert "Traceback" not in str(info.value) and "worker" not in str(info.value)


def test_corrupt_image_in_a_worker_through_the_cli(folder, tmp_path, capsys):
    bad, other = _corrupt(folder), folder / "train" / "cat" / "b.PNG"
    argv = ["train", "--dataset", "imagefolder", "--data-dir", str(folder), "--image-size", "16", "--model", "mlp",
            "--epochs", "1", "--batch-size", "4", "--workers", "2", "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "eval_acc" not in out
    last = err.splitlines()[-1]  # the first bad file of the shuffled order
    assert re.fullmatch(f"intrain: error: ({re.escape(str(bad))}|{re.escape(str(other))}): cannot read or decode "
                        "this image .*: replace or remove the file", last), last


@pytest.mark.parametrize("case, words", [
    ("no-classes", "has no class folders"),
    ("no-val", "has no val/ folder"),
    ("no-dir", "does not exist"),
    ("empty-class", "holds no .jpg, .jpeg or .png images"),
    ("val-extra", "is not a class of"),
    ("val-missing", "has no folder for class 'cat'"),
    ("size-0", "--image-size"),
    ("size-negative", "--image-size"),
    ("size-elsewhere", "--image-size applies to --dataset imagefolder only"),
    ("val-split", "--val-split does not apply to imagefolder"),
    ("train-limit", "--train-limit does not apply to imagefolder"),
])
def test_bad_folders_and_sizes_are_refused(tmp_path, capsys, case, words):
    root = tmp_path / "data"
    if case == "no-classes":
        (root / "train").mkdir(parents=True)
        (root / "val").mkdir()
        (root / "train" / "stray.jpg").write_bytes(b"")  # a file directly in train/ is no class
    elif case == "no-val":
        make_folder(root)
        shutil.rmtree(root / "val")
    elif case == "no-dir":
        root.mkdir()
        root = root / "absent"
    else:
        make_folder(root)
    if case == "empty-class":
        (root / "train" / "dog").mkdir()
        (root / "val" / "dog").mkdir()
    elif case == "val-extra":
        (root / "val" / "dog").mkdir()
    elif case == "val-missing":
        shutil.rmtree(root / "val" / "cat")
    extra = {"size-0": ["--image-size", "0"], "size-negative": ["--image-size", "-3"],
             "val-split": ["--val-split", "2"], "train-limit": ["--train-limit", "2"]}.get(case, [])
    if case == "size-elsewhere":
        argv = ["train", "--dataset", "digits", "--image-size", "16"]
    else:
        argv = ["train", "--dataset", "imagefolder", "--data-dir", str(root), "--model", "mlp", *extra]
    line = assert_refused(argv + ["--out", str(tmp_path / "run")], capsys, tmp_path)
    assert words in line, line


def test_python_api_refuses_bad_sizes(folder):
    for size in (0, -1, True, 2.5):
        with pytest.raises(DataError, match="--image-size"):
            load_imagefolder(folder, size)
    with pytest.raises(DataError, match="--image-size applies"):
        load_dataset("digits", image_size=32)


def test_train_and_eval_end_to_end(folder, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--dataset", "imagefolder", "--data-dir", str(folder), "--image-size", "32",
            "--model", "lenet5", "--epochs", "1", "--batch-size", "8", "--workers", "2", "--out", str(run)]
    assert main(argv) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert re.fullmatch(r"eval_acc=\d+\.\d\d", last), last
    config = json.loads((run / "config.json").read_text())
    assert config["image_size"] == 32 and config["image_shape"] == [3, 32, 32] and config["augment"] is True
    assert config["channel_mean"] == [124, 116, 104] and config["num_classes"] == 3
    assert (config["train_size"], config["eval_size"], config["eval_name"]) == (18, 6, "validation")

    assert main(["eval", "--run", str(run), "--workers", "0"]) == 0  # the run's size, read from config.json
    assert capsys.readouterr().out.splitlines()[-1] == last
    assert json.loads((run / "eval.json").read_text())["eval_size"] == 6

    # --resume keeps the recorded size: a different one is refused, none resumes the finished run
    line = assert_refused(["train", "--resume", str(run), "--image-size", "40"], capsys, tmp_path)
    assert "--image-size 40 conflicts with 32" in line
    assert main(["train", "--resume", str(run)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == last


def test_help_documents_the_new_options(capsys):
    for command, option in (("train", "--image-size"), ("eval", "--workers")):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert option in capsys.readouterr().out
