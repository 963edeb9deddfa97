"""The files of a run folder: which they are, how they are written and checked, and the folder's
policy (creation, locking, overwriting).

Writing: every file a run writes whole goes through ``atomic_write`` (a temp file in the same
folder, flush, fsync, ``os.replace``, then an fsync of the folder so that the rename itself
survives a power loss), so a reader sees the old or the new file, never half of one.
``metrics.csv`` is the exception: it grows by one flushed row per epoch, and ``--resume``
rewrites it from the checkpoint's rows.

Integrity: every file a later step reads is checked before it is used, and any damage is a
one-line error naming the file:

* ``checkpoint.pt``: a sha256 header before the payload (``intrain.run.checkpoint``);
* ``model.pt``: ``torch.save`` of ``{"format", "config", "state_dict", "integrity"}``, a plain
  zip file that ``torch.load(path, weights_only=True)`` reads as before; the sha256 of every byte
  before it is stored in the zip archive's comment (the last ``TRAILER_LEN`` bytes of the file,
  which zip readers, torch's included, skip), and ``"integrity"`` inside the payload says that a
  digest must be there, so that damage to the comment is caught too;
* ``config.json``: it stays the plain dict of the run's config (what ``json.load`` gives is the
  config, nothing added); ``model.pt`` and ``checkpoint.pt`` hold the same dict under their
  checksums, and ``intrain eval`` refuses a ``config.json`` that equals neither;
* the manifest: a ``"sha256"`` field holding the digest of the canonical JSON of its other fields;
* ``metrics.csv`` (read by ``intrain plot``): checked against the rows recorded in the
  checksummed ``checkpoint.pt`` when there is one.

A ``model.pt`` written before these checks existed (no digest anywhere) is read unchecked.

Policy: an explicit ``--out`` that already holds a run is refused unless overwriting, and the
default folder is ``runs/<dataset>-<model>-<arith>-<k>`` with the first free ``k``. A run locks its
folder (``intrain.run.lock``) before its first write, and lists what it writes in the folder's
manifest ``.intrain-files.json``; ``--overwrite`` removes exactly the files listed there (and
nothing in a folder that holds no run).

Operating-system errors at these boundaries (creating the folder, writing or reading a file)
become ``RunFileError``: one line naming the path and the system's reason.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import struct
import tempfile
import warnings
from pathlib import Path, PurePosixPath

import torch

from intrain.run import lock as run_lock
from intrain.run.config import ConfigError

RUN_FILES = ("metrics.csv", "model.pt", "config.json", "checkpoint.pt")
TENSORBOARD_DIR = "tensorboard"
EVAL_FILE = "eval.json"
MANIFEST_NAME = ".intrain-files.json"
MANIFEST_FORMAT = "intrain-files-v1"
MODEL_FORMAT = "intrain-checkpoint-v1"
#: ``model.pt``'s ``"integrity"`` value: the digest is in the zip comment (see the module docstring).
MODEL_INTEGRITY = "sha256-in-zip-comment"
TRAILER_TAG = b"intrain-sha256 "
TRAILER_LEN = len(TRAILER_TAG) + 64
_EOCD = b"PK\x05\x06"  # zip end-of-central-directory record: 22 bytes, then the comment
_ZIP_MAGIC = b"PK\x03\x04"
#: Legacy (pre-manifest) runs: what ``--overwrite`` removes besides ``RUN_FILES``.
_LEGACY_EXTRA = (EVAL_FILE,)
_TB_EVENTS = "events.out.tfevents."


class RunFileError(ValueError):
    """A run file or folder that cannot be created, written or read (one line: path and reason)."""


def reason(err: OSError) -> str:
    """The system's words for ``err`` (``Read-only file system``, ...)."""
    return err.strerror or str(err) or type(err).__name__


# ----------------------------------------------------------------------------- writing

def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(folder: Path) -> None:
    """Make a rename or creation in ``folder`` durable (best effort: some file systems refuse)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> None:
    """Write ``path`` via a temp file in the same directory: ``write(f)``, flush, fsync, replace,
    fsync the directory. ``RunFileError`` when the system refuses."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as err:
        raise RunFileError(f"cannot write {path} ({reason(err)})") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    fsync_dir(path.parent)


# ----------------------------------------------------------------------------- checksummed JSON

def _canonical(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def with_digest(obj: dict) -> dict:
    """``obj`` with its ``"sha256"`` field (the digest of the canonical JSON of the other fields)."""
    rest = {k: v for k, v in obj.items() if k != "sha256"}
    return {**rest, "sha256": hashlib.sha256(_canonical(rest)).hexdigest()}


def save_json(path: Path, obj: dict, digest: bool = False) -> None:
    """``obj`` as indented JSON (with its ``"sha256"`` field when ``digest``), atomically."""
    text = json.dumps(with_digest(obj) if digest else obj, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def same_json(a, b) -> bool:
    """Whether ``a`` and ``b`` are the same JSON value (tuples and lists alike)."""
    try:
        return _canonical(a) == _canonical(b)
    except (TypeError, ValueError):
        return False


def read_json(path: Path, what: str = "file") -> dict:
    """A JSON object written by ``save_json``, its digest verified when it has one (``ConfigError``
    when damaged), without the digest."""
    try:
        obj = json.loads(Path(path).read_bytes())
    except OSError as err:
        raise RunFileError(f"cannot read {path} ({reason(err)})") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ConfigError(f"{path} is damaged (not valid JSON): the {what} cannot be used") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{path} is damaged (not a JSON object): the {what} cannot be used")
    if "sha256" in obj and with_digest(obj)["sha256"] != obj["sha256"]:
        raise ConfigError(f"{path} is damaged (sha256 mismatch): the {what} cannot be used")
    return {k: v for k, v in obj.items() if k != "sha256"}


def read_config(run_dir: Path) -> dict:
    """A run's ``config.json`` (``ConfigError`` when missing, not JSON or not a run config). It is
    the readable copy of the config that ``model.pt`` and ``checkpoint.pt`` hold under their
    checksums: ``intrain eval`` compares them (``intrain.run.evaluate``)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"no {path}: pass the directory of a finished run to --run")
    cfg = read_json(path, "run config")
    needed = ("dataset", "model", "arith", "image_shape", "num_classes", "batch_size", "seed")
    if any(k not in cfg for k in needed):
        raise ConfigError(f"{path} is not an intrain run config (it lacks {', '.join(needed)})")
    return cfg


# ----------------------------------------------------------------------------- model.pt

def model_bytes(config: dict, state_dict: dict) -> bytes:
    """The bytes of a ``model.pt`` (see the module docstring)."""
    payload = {"format": MODEL_FORMAT, "config": config, "state_dict": state_dict, "integrity": MODEL_INTEGRITY}
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    if data[-22:-18] != _EOCD or data[-2:] != b"\0\0":
        raise RuntimeError("torch.save wrote an unexpected zip layout (no empty archive comment at the end)")
    body = data[:-2] + struct.pack("<H", TRAILER_LEN)
    return body + TRAILER_TAG + hashlib.sha256(body).hexdigest().encode()


def save_model(path: Path, config: dict, model: torch.nn.Module) -> None:
    """``model.pt`` of ``model`` (tensors on the CPU), atomically."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    data = model_bytes(config, state)
    atomic_write(path, lambda f: f.write(data))


def quiet_torch_load(source, **kwargs):
    """``torch.load(..., weights_only=True)`` without torch's warnings (a foreign pickle makes it
    warn on stderr before failing; the caller's error line says all)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(source, map_location="cpu", weights_only=True, **kwargs)


def decode_model(data: bytes, path) -> dict:
    """The payload of ``model.pt`` bytes, every check done before anything is unpickled."""
    corrupt = f"{path} is damaged (sha256 mismatch): the model file cannot be used"
    if not data.startswith(_ZIP_MAGIC):
        raise ConfigError(f"{path} is not an intrain model file (format {MODEL_FORMAT}): refusing to load it")
    trailer = data[-TRAILER_LEN:]
    digest = trailer[len(TRAILER_TAG):]
    signed = len(data) > TRAILER_LEN and trailer.startswith(TRAILER_TAG)
    if signed and hashlib.sha256(data[:-TRAILER_LEN]).hexdigest().encode() != digest:
        raise ConfigError(corrupt)
    try:
        saved = quiet_torch_load(io.BytesIO(data))
    except Exception as err:
        raise ConfigError(f"cannot load {path} ({type(err).__name__}): the file is truncated, damaged or "
                          "not an intrain model file") from None
    if not isinstance(saved, dict) or saved.get("format") != MODEL_FORMAT or "state_dict" not in saved:
        raise ConfigError(f"{path} is not an intrain model file (format {MODEL_FORMAT})")
    if not signed and "integrity" in saved:  # the digest itself was damaged
        raise ConfigError(corrupt)
    return saved


def read_model(run_dir: Path) -> dict:
    """A run's ``model.pt`` payload (``ConfigError`` when missing, damaged or foreign)."""
    path = Path(run_dir) / "model.pt"
    if not path.is_file():
        raise ConfigError(f"no {path}: the run has not finished (resume it with intrain train --resume {run_dir})")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise RunFileError(f"cannot read {path} ({reason(err)})") from None
    return decode_model(data, path)


# ----------------------------------------------------------------------------- the data's identity

def data_fingerprint(splits) -> str:
    """sha256 over the training and eval images and labels as loaded (after ``--val-split`` and
    ``--train-limit``): the same data gives the same fingerprint wherever its files lie and in
    whichever of their formats (gzipped or raw IDX, CIFAR-10's python or binary batches)."""
    h = hashlib.sha256(b"intrain-data-v1")
    for part in (splits.train, splits.eval):
        if hasattr(part, "identity"):  # a lazily decoded data set (image folders) says what it is
            h.update(part.identity())
            continue
        for tensor in (part.images, part.labels):
            t = tensor.detach().cpu().contiguous()
            h.update(f"{t.dtype} {tuple(t.shape)};".encode())
            h.update(memoryview(t.view(torch.uint8).numpy()) if t.numel() else b"")
    h.update(splits.eval_name.encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------- the run folder

def holds_run(path: Path) -> bool:
    """True when ``path`` already contains any file of a run (or a run's manifest)."""
    return any((path / name).exists() for name in (*RUN_FILES, MANIFEST_NAME))


def check_creatable(path: Path, what: str, advice: str) -> None:
    """Refuse, before anything is written, a folder ``path`` that cannot be created or written:
    one under a regular file, or below a folder without write permission or on a read-only file
    system (``advice``: what to do, e.g. "choose another --out"). Root passes permission checks;
    what the system still refuses later is reported where it happens (``make_out_dir``)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        if probe.is_symlink():  # a dangling link: mkdir would fail on it
            raise RunFileError(f"cannot create {what} {path}: {probe} is a broken link; {advice}")
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        if probe == path:
            raise ConfigError(f"{what} {path} is a file, not a directory: {advice}")
        raise RunFileError(f"cannot create {what} {path}: {probe} is a file, not a folder; {advice}")
    target = probe if probe.exists() else Path(".")
    if not os.access(target, os.W_OK | os.X_OK):
        why = "read-only file system" if _read_only_fs(target) else "no permission to write"
        where = "" if target == path else f" in {target}"
        raise RunFileError(f"cannot write {what} {path} ({why}{where}): {advice}")


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def check_out(out: str | None, overwrite: bool) -> Path | None:
    """The explicit output directory, checked; ``None`` when the default is to be picked. Writes
    nothing."""
    if out is None:
        check_creatable(Path("runs"), "the default run folder", "pass --out DIR for a writable DIR")
        return None
    path = Path(out)
    check_creatable(path, "output directory", "choose another --out")
    # The run's files are looked for before the lock is probed: a command locks a folder before
    # its first write there, so files found from a run still in progress always meet its lock,
    # and such a run is named as busy, never offered to --overwrite.
    has_run = path.is_dir() and holds_run(path)
    busy = run_lock.holder(path) if path.is_dir() else None
    if busy is not None:
        raise run_lock.RunFolderBusy(f"output directory {path} is in use by {busy}: wait for it to finish "
                                     "or stop it, or choose another --out")
    if has_run and not overwrite:
        raise ConfigError(f"output directory {path} already holds a run: pass --overwrite to replace it "
                          "or choose another --out")
    if path.is_dir() and overwrite:
        read_manifest(path)  # a damaged one is refused now, before anything is written
    return path


def _mkdir(path: Path, **kwargs) -> None:
    try:
        path.mkdir(**kwargs)
    except FileExistsError:
        raise
    except OSError as err:
        raise RunFileError(f"cannot create run directory {path} ({reason(err)}): choose another --out") from None


def lock_run_dir(run_dir: Path, command: str, what: str = "run directory") -> run_lock.RunLock:
    """Lock ``run_dir`` (see ``intrain.run.lock``): ``RunFolderBusy`` when another command holds
    it, ``RunFileError`` when the folder does not let us write the lock file."""
    try:
        return run_lock.acquire(run_dir, command, what)
    except OSError as err:
        raise RunFileError(f"cannot lock {what} {run_dir} ({reason(err)}): {command} writes there") from None


def make_out_dir(out: Path | None, overwrite: bool, default_name: str,
                 command: str = "intrain train") -> tuple[Path, run_lock.RunLock]:
    """Create and lock the output directory: the explicit one (removing the earlier run's files
    when overwriting) or ``runs/<default_name>-<k>`` with the first ``k`` not taken. Returns the
    folder and its held lock."""
    if out is not None:
        _mkdir(out, parents=True, exist_ok=True)
        held = lock_run_dir(out, command, "output directory")
        try:
            if overwrite:
                remove_run(out)
            elif holds_run(out):  # a run that began after our check, and has ended
                raise ConfigError(f"output directory {out} already holds a run: pass --overwrite to replace "
                                  "it or choose another --out")
        except BaseException:
            held.release()
            raise
        fsync_dir(out.parent)
        return out, held
    runs = Path("runs")
    _mkdir(runs, exist_ok=True)
    k = 1
    while True:
        candidate = runs / f"{default_name}-{k}"
        try:
            _mkdir(candidate)  # atomic: two runs started together never share a directory
            fsync_dir(runs)
            return candidate, lock_run_dir(candidate, command, "output directory")
        except FileExistsError:
            k += 1


# ----------------------------------------------------------------------------- the manifest

def _safe_name(name) -> bool:
    """A relative path inside the run folder (no ``..``, not absolute), as the manifest holds."""
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        return False
    parts = PurePosixPath(name).parts
    return not PurePosixPath(name).is_absolute() and ".." not in parts and parts[0] not in (".", "")


def read_manifest(run_dir: Path) -> list[str] | None:
    """The files the folder's runs wrote, or ``None`` when there is no manifest (a folder of no
    run, or of a run made before manifests); ``ConfigError`` when it is damaged."""
    path = Path(run_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    obj = read_json(path, "list of the run's files")
    files = obj.get("files")
    if obj.get("format") != MANIFEST_FORMAT or not isinstance(files, list) or not all(map(_safe_name, files)):
        raise ConfigError(f"{path} is damaged (not an intrain file list): remove the earlier run's files by hand")
    return files


def record_files(run_dir: Path, *names: str) -> None:
    """Add ``names`` (paths relative to ``run_dir``; a folder ends with ``/``) to the manifest.
    The caller holds the folder's lock."""
    known = read_manifest(run_dir)
    if known is None:  # the first entry; a run made before manifests may be here already
        known = _legacy_files(Path(run_dir)) if holds_run(Path(run_dir)) else []
    new = [n for n in names if n not in known]
    if new or not (Path(run_dir) / MANIFEST_NAME).is_file():
        save_json(Path(run_dir) / MANIFEST_NAME, {"format": MANIFEST_FORMAT, "files": known + new}, digest=True)


def _legacy_files(run_dir: Path) -> list[str]:
    """What a run made before manifests existed wrote: the run files, eval.json, and TensorBoard
    event files (a user's other files in ``tensorboard/`` are kept)."""
    names = [n for n in (*RUN_FILES, *_LEGACY_EXTRA) if (run_dir / n).is_file()]
    board = run_dir / TENSORBOARD_DIR
    if board.is_dir():
        names += [f"{TENSORBOARD_DIR}/{p.name}" for p in sorted(board.iterdir()) if p.name.startswith(_TB_EVENTS)]
        names.append(f"{TENSORBOARD_DIR}/")  # removed only when that leaves it empty
    return names


def remove_run(run_dir: Path) -> None:
    """``--overwrite``: remove exactly the files the folder's earlier runs wrote (their manifest;
    for a run made before manifests, ``_legacy_files``), folders only when left empty. A folder
    that holds no run keeps everything. The caller holds the folder's lock."""
    run_dir = Path(run_dir)
    files = read_manifest(run_dir)
    if files is None:
        if not holds_run(run_dir):
            return
        files = _legacy_files(run_dir)
    try:
        for name in [n for n in files if not n.endswith("/")]:
            (run_dir / name).unlink(missing_ok=True)
        for name in [n for n in files if n.endswith("/")]:
            try:
                (run_dir / name).rmdir()
            except FileNotFoundError:
                pass
            except OSError as err:
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
        remove_stale_temp_files(run_dir)
        (run_dir / MANIFEST_NAME).unlink(missing_ok=True)
    except OSError as err:
        raise RunFileError(f"cannot remove the earlier run in {run_dir} ({reason(err)}): "
                           "choose another --out") from None
    fsync_dir(run_dir)


def remove_stale_temp_files(run_dir: Path) -> None:
    """Temp files of writes that a kill interrupted."""
    for name in (*RUN_FILES, EVAL_FILE, MANIFEST_NAME):
        for stale in Path(run_dir).glob(f".{name}.*.tmp"):
            stale.unlink(missing_ok=True)
