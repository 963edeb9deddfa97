"""Resumable, checksum-verified download of the CIFAR-10 python archive (urllib only).

``download_cifar10(data_dir)`` fetches ``cifar-10-python.tar.gz`` into ``data_dir`` through a
``.part`` file (resumed with an HTTP ``Range`` request when one exists; restarted when the server
ignores ``Range``), verifies its md5, renames it into place atomically and extracts it safely,
producing ``data_dir/cifar-10-batches-py/``. Every failure is a one-line ``DataError``.
No numeric data is produced here; byte counts are Python ints (no range limit).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import socket
import tarfile
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from intrain.data.errors import DataError

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"  # local name, whatever the URL
CIFAR10_FOLDER = "cifar-10-batches-py"
_REQUIRED = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
_CHUNK = 1 << 16
_NET_ERRORS = (urllib.error.URLError, http.client.HTTPException, socket.timeout, OSError,
               ValueError)  # ValueError: malformed URL

__all__ = ["CIFAR10_URL", "CIFAR10_MD5", "CIFAR10_ARCHIVE", "download_cifar10"]


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _complete(folder: Path) -> bool:
    return folder.is_dir() and all((folder / n).is_file() for n in _REQUIRED)


class _LocalWriteError(Exception):
    """Writing the ``.part`` file failed (read-only folder, full disk): not a network error."""

    def __init__(self, err: OSError):
        super().__init__(err.strerror or str(err))


def _fetch(url: str, part: Path, progress: bool, timeout: float) -> None:
    """Download ``url`` into ``part``, resuming from its current size when possible."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "intrain"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # nothing left to send: the part is (claimed) complete
            exc.close()
            return
        raise
    with resp:
        status = getattr(resp, "status", 200)
        content_range = resp.headers.get("Content-Range", "") or ""
        if offset and not (status == 206 and content_range.startswith(f"bytes {offset}-")):
            offset = 0  # the server ignored Range: start over
        length = resp.headers.get("Content-Length")
        expected = int(length) if length is not None and length.isdigit() else None
        received = 0
        try:
            out = open(part, "ab" if offset else "wb")
        except OSError as err:
            raise _LocalWriteError(err) from None
        with out, tqdm(
            total=None if expected is None else offset + expected, initial=offset, unit="B",
            unit_scale=True, unit_divisor=1024, desc=part.name[: -len(".part")], disable=not progress,
        ) as bar:
            while True:
                chunk = resp.read(_CHUNK)
                if not chunk:
                    break
                try:
                    out.write(chunk)
                except OSError as err:
                    raise _LocalWriteError(err) from None
                received += len(chunk)
                bar.update(len(chunk))
    if expected is not None and received < expected:
        raise ConnectionError(f"connection closed after {offset + received} bytes")


def _safe_extract(archive: Path, data_dir: Path) -> None:
    """Extract regular files and folders only, refusing absolute paths, ``..`` and links."""
    tmp = data_dir / f".{CIFAR10_FOLDER}.extract"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                name = member.name
                parts = PurePosixPath(name).parts
                if name.startswith(("/", "\\")) or "\\" in name or ".." in parts or (
                    parts and ":" in parts[0]
                ):
                    raise DataError(f"refusing unsafe path {name!r} in archive {archive}")
                if member.isdir():
                    (tmp.joinpath(*parts)).mkdir(parents=True, exist_ok=True)
                    continue
                if not member.isfile():
                    raise DataError(f"refusing non-regular member {name!r} in archive {archive}")
                dest = tmp.joinpath(*parts)
                dest.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(member)
                with src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out)
        extracted = tmp / CIFAR10_FOLDER
        if not _complete(extracted):
            raise DataError(f"archive {archive} does not contain a complete {CIFAR10_FOLDER}/ folder")
        target = data_dir / CIFAR10_FOLDER
        if target.exists():
            shutil.rmtree(target)
        os.replace(extracted, target)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"cannot extract {archive} ({exc}): delete it and rerun") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_if_nothing_saved(part: Path, created: list[Path]) -> None:
    """After a failed first attempt, leave the file system as it was: drop an empty ``part`` and
    the folders this call created (a partial download is kept, to be resumed)."""
    if part.exists() and part.stat().st_size == 0:
        part.unlink()
    for folder in created:  # deepest first
        try:
            folder.rmdir()
        except OSError:
            return


def download_cifar10(data_dir, url: str = CIFAR10_URL, md5: str = CIFAR10_MD5,
                     progress: bool = True, timeout: float = 30.0) -> Path:
    """Make sure ``data_dir/cifar-10-batches-py/`` exists, downloading it if needed; return it."""
    data_dir = Path(data_dir)
    folder = data_dir / CIFAR10_FOLDER
    if _complete(folder):
        return folder
    missing = [d for d in (data_dir, *data_dir.parents) if not d.exists()]
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create data folder {data_dir} ({exc.strerror or exc})") from None
    if not os.access(data_dir, os.W_OK | os.X_OK):
        raise DataError(f"cannot write into data folder {data_dir} (read-only or no permission): "
                        "choose another --data-dir")
    name = CIFAR10_ARCHIVE
    archive = data_dir / name
    if archive.is_file():
        got = _md5(archive)
        if got != md5:
            raise DataError(f"{archive} has the wrong checksum (md5 {got}, expected {md5}): "
                            "delete it and rerun")
    else:
        part = data_dir / f"{name}.part"
        try:
            _fetch(url, part, progress, timeout)
        except _LocalWriteError as exc:
            _remove_if_nothing_saved(part, missing)
            raise DataError(f"cannot write {part} ({exc}): choose another --data-dir, or make room and "
                            "rerun (the download resumes)") from None
        except _NET_ERRORS as exc:
            if isinstance(exc, urllib.error.HTTPError):
                reason = f"HTTP {exc.code} {exc.reason}"
            else:
                reason = str(getattr(exc, "reason", None) or exc).strip()
            reason = reason.splitlines()[0] if reason else type(exc).__name__
            _remove_if_nothing_saved(part, missing)
            raise DataError(f"cannot download {url} ({reason}): check the network, or copy "
                            f"{name} into {data_dir} and rerun") from None
        got = _md5(part)
        if got != md5:
            part.unlink(missing_ok=True)
            raise DataError(f"downloaded {name} has the wrong checksum (md5 {got}, expected {md5}); "
                            "the bad file was deleted: rerun to download again")
        os.replace(part, archive)
    _safe_extract(archive, data_dir)
    return folder
