"""Test helper: write small generated CIFAR-10 files in the exact official formats.

``write_cifar10_py(dir)`` creates ``dir/cifar-10-batches-py/`` (pickled dict batches written byte-for-byte the
way Python 2 wrote the official ones: protocol 2 with BINSTRING opcodes, plus ``batches.meta``); ``write_cifar10_bin(dir)`` creates
``dir/cifar-10-batches-bin/`` (records of 1 label byte + 3072 pixel bytes); ``make_cifar10_tarball``
packs a ``cifar-10-batches-py/`` folder into ``cifar-10-python.tar.gz`` bytes. All use the same
deterministic content, so the two formats decode to identical tensors.
"""

from __future__ import annotations

import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np

TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILE = "test_batch"
LABEL_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer",
               b"dog", b"frog", b"horse", b"ship", b"truck"]


class _Py2Pickler(pickle._Pickler):
    """Protocol-2 pickler that writes bytes and str as Python 2 ``str`` (BINSTRING opcodes)."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj):
        raw = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str


def py2_pickle_dumps(obj) -> bytes:
    """Pickle ``obj`` as Python 2's ``cPickle.dump(obj, f, 2)`` would (for bytes/str/int/list/dict/ndarray)."""
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    # the official files were written with numpy 1.x, which names the numpy.core module
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def make_batch(index: int, n: int) -> tuple[np.ndarray, list[int]]:
    """Deterministic batch ``index`` (0..4 train, 5 test): uint8 data [n, 3072] and labels."""
    rng = np.random.default_rng(1000 + index)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(x) for x in rng.integers(0, 10, size=n)]
    return data, labels


def all_batches(per_batch: int = 8, test_size: int | None = None) -> list[tuple[str, np.ndarray, list[int]]]:
    """``[(name, data, labels)]`` for the 5 training batches and the test batch."""
    out = [(name, *make_batch(i, per_batch)) for i, name in enumerate(TRAIN_FILES)]
    out.append((TEST_FILE, *make_batch(5, per_batch if test_size is None else test_size)))
    return out


def expected_arrays(per_batch: int = 8, test_size: int | None = None):
    """``(train_images [N,3,32,32], train_labels, test_images, test_labels)`` as numpy arrays."""
    batches = all_batches(per_batch, test_size)
    train = np.concatenate([d for _, d, _ in batches[:5]]).reshape(-1, 3, 32, 32)
    train_y = np.array(sum((lab for _, _, lab in batches[:5]), []), dtype=np.int64)
    _, td, tl = batches[5]
    return train, train_y, td.reshape(-1, 3, 32, 32), np.array(tl, dtype=np.int64)


def write_cifar10_py(directory, per_batch: int = 8, test_size: int | None = None) -> Path:
    """Write ``directory/cifar-10-batches-py/`` and return that folder."""
    folder = Path(directory) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for name, data, labels in all_batches(per_batch, test_size):
        d = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
             b"filenames": [f"img_{name}_{i}.png".encode() for i in range(len(labels))]}
        (folder / name).write_bytes(py2_pickle_dumps(d))
    meta = {b"num_cases_per_batch": per_batch, b"label_names": LABEL_NAMES, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(py2_pickle_dumps(meta))
    return folder


def write_cifar10_bin(directory, per_batch: int = 8, test_size: int | None = None) -> Path:
    """Write ``directory/cifar-10-batches-bin/`` and return that folder."""
    folder = Path(directory) / "cifar-10-batches-bin"
    folder.mkdir(parents=True, exist_ok=True)
    for name, data, labels in all_batches(per_batch, test_size):
        records = np.concatenate([np.array(labels, dtype=np.uint8)[:, None], data], axis=1)
        (folder / f"{name}.bin").write_bytes(records.tobytes())
    (folder / "batches.meta.txt").write_text("\n".join(n.decode() for n in LABEL_NAMES) + "\n")
    return folder


def make_cifar10_tarball(per_batch: int = 8, test_size: int | None = None) -> bytes:
    """Bytes of a ``cifar-10-python.tar.gz`` holding a generated ``cifar-10-batches-py/``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        dir_info = tarfile.TarInfo("cifar-10-batches-py")
        dir_info.type = tarfile.DIRTYPE
        dir_info.mode = 0o755
        tar.addfile(dir_info)
        for name, data, labels in all_batches(per_batch, test_size):
            payload = py2_pickle_dumps({b"batch_label": name.encode(), b"labels": labels,
                                        b"data": data})
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()
