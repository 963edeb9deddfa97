"""The files of a run folder: which they are, how they are written, and the model file's format.

Every file a run writes goes through ``atomic_write`` (a temp file in the same folder, flush,
fsync, ``os.replace``), so a reader sees the old or the new file, never half of one. The run
folder's policy: an explicit ``--out`` that already holds a run is refused unless overwriting,
and the default folder is ``runs/<dataset>-<model>-<arith>-<k>`` with the first free ``k``.

``model.pt`` is ``torch.save`` of ``{"format": MODEL_FORMAT, "config": <config.json's dict>,
"state_dict": <CPU tensors>}``, read back with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from intrain.run.config import ConfigError

RUN_FILES = ("metrics.csv", "model.pt", "config.json", "checkpoint.pt")
TENSORBOARD_DIR = "tensorboard"
MODEL_FORMAT = "intrain-checkpoint-v1"


def holds_run(path: Path) -> bool:
    """True when ``path`` already contains any file of a run."""
    return any((path / name).exists() for name in RUN_FILES)


def check_out(out: str | None, overwrite: bool) -> Path | None:
    """The explicit output directory, checked; ``None`` when the default is to be picked."""
    if out is None:
        return None
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output path {path} is a file, not a directory: choose another --out")
    if path.is_dir() and holds_run(path) and not overwrite:
        raise ConfigError(f"output directory {path} already holds a run: pass --overwrite to replace it "
                          "or choose another --out")
    return path


def make_out_dir(out: Path | None, overwrite: bool, default_name: str) -> Path:
    """Create the output directory: the explicit one (clearing an old run when overwriting)
    or ``runs/<default_name>-<k>`` with the first ``k`` not taken."""
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for name in RUN_FILES:
                (out / name).unlink(missing_ok=True)
            shutil.rmtree(out / TENSORBOARD_DIR, ignore_errors=True)
        return out
    Path("runs").mkdir(exist_ok=True)
    k = 1
    while True:
        candidate = Path("runs") / f"{default_name}-{k}"
        try:
            candidate.mkdir()  # atomic: two runs started together never share a directory
            return candidate
        except FileExistsError:
            k += 1


def remove_stale_temp_files(run_dir: Path) -> None:
    """Temp files of writes that a kill interrupted."""
    for name in RUN_FILES:
        for stale in run_dir.glob(f".{name}.*.tmp"):
            stale.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write) -> None:
    """Write ``path`` via a temp file in the same directory: ``write(f)``, flush, fsync, replace."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model(path: Path, config: dict, model: torch.nn.Module) -> None:
    """``model.pt``: ``{"format", "config", "state_dict"}`` (tensors on the CPU), atomically."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"format": MODEL_FORMAT, "config": config, "state_dict": state}
    atomic_write(path, lambda f: torch.save(payload, f))


def save_json(path: Path, obj: dict) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()))


def read_config(run_dir: Path) -> dict:
    """A run's ``config.json`` (``ConfigError`` when missing, unreadable or not a run config)."""
    path = run_dir / "config.json"
    if not path.is_file():
        raise ConfigError(f"no {path}: pass the directory of a finished run to --run")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read {path} ({type(err).__name__}): the run directory is damaged") from None
    needed = ("dataset", "model", "arith", "image_shape", "num_classes", "batch_size", "seed")
    if not isinstance(cfg, dict) or any(k not in cfg for k in needed):
        raise ConfigError(f"{path} is not an intrain run config (it lacks {', '.join(needed)})")
    return cfg


def read_model(run_dir: Path) -> dict:
    """A run's ``model.pt`` payload (``ConfigError`` when missing, damaged or foreign)."""
    path = run_dir / "model.pt"
    if not path.is_file():
        raise ConfigError(f"no {path}: the run has not finished (resume it with intrain train --resume {run_dir})")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(f"cannot load {path} ({type(err).__name__}): the file is truncated or corrupt") from None
    if not isinstance(saved, dict) or saved.get("format") != MODEL_FORMAT or "state_dict" not in saved:
        raise ConfigError(f"{path} is not an intrain model file (format {MODEL_FORMAT})")
    return saved
