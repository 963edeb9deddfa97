"""Resumable training checkpoints: ``<run dir>/checkpoint.pt``, verified by a sha256.

File layout (all of it written atomically with ``intrain.run.files.atomic_write``: temp file in the
same directory, flush, fsync, ``os.replace``; so a reader sees the old or the new file, never half
of one)::

    b"intrain-resume-checkpoint\\n"        magic line (the format tag)
    b"version 1\\n"
    b"sha256 <64 hex digits>\\n"           digest of the payload bytes that follow
    <payload>                              torch.save of a dict of plain types and CPU tensors

The payload holds everything a run needs to continue bit for bit: the resolved ``TrainConfig``
(``train_config``) and the run's ``config.json`` dict (``config``), the model ``state_dict``
(int8 weights and exponents, or float parameters), the method's own state beside them
(``Method.state_dict``: NITI's weight-average sums as ``weight_average``; the float twin's
momentum buffers and torch's generator states as ``optimizer``, ``torch_rng``, ``cuda_rng``),
the position (``epoch``: the epoch in progress, ``batch``: batches of it already done,
``global_step``), the partial epoch's running sums and the metrics rows so far. ``seed`` and
``global_step`` are recorded.

Loading checks the magic, version and digest before unpickling anything, and unpickles with
``weights_only=True`` (torch's warnings silenced: the error line says all); any failure is a
one-line ``CheckpointError`` naming the file.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import torch

from intrain.run.files import atomic_write, quiet_torch_load

MAGIC = b"intrain-resume-checkpoint\n"
VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"
_MAX_HEADER = 200


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, truncated, corrupt, foreign); one line."""


def checkpoint_path(run_dir) -> Path:
    return Path(run_dir) / CHECKPOINT_NAME


def encode(payload: dict) -> bytes:
    """The bytes of a checkpoint file holding ``payload``."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    body = buf.getvalue()
    digest = hashlib.sha256(body).hexdigest()
    return MAGIC + f"version {VERSION}\n".encode() + f"sha256 {digest}\n".encode() + body


def save(path, payload: dict) -> None:
    """Write ``payload`` to ``path`` atomically (see the module docstring)."""
    data = encode(payload)
    atomic_write(Path(path), lambda f: f.write(data))


def decode(data: bytes, path) -> dict:
    """The payload of checkpoint bytes ``data`` read from ``path`` (for messages)."""
    if not data.startswith(MAGIC):
        raise CheckpointError(f"{path} is not an intrain checkpoint (no '{MAGIC.decode().strip()}' header): "
                              "refusing to resume from it")
    rest = data[len(MAGIC):]
    lines = rest[:_MAX_HEADER].split(b"\n", 2)
    if len(lines) < 3 or not lines[0].startswith(b"version ") or not lines[1].startswith(b"sha256 "):
        raise CheckpointError(f"{path} is truncated or corrupt (bad header): refusing to resume from it")
    version = lines[0][len(b"version "):].decode("ascii", "replace")
    if version != str(VERSION):
        raise CheckpointError(f"{path} has checkpoint version {version}, this intrain reads version {VERSION}: "
                              "refusing to resume from it")
    digest = lines[1][len(b"sha256 "):].decode("ascii", "replace")
    body = rest[len(lines[0]) + len(lines[1]) + 2:]
    if hashlib.sha256(body).hexdigest() != digest:
        raise CheckpointError(f"{path} is truncated or corrupt (sha256 mismatch): refusing to resume from it")
    try:
        payload = quiet_torch_load(io.BytesIO(body))
    except Exception as err:  # a digest-valid file that still does not load: foreign writer
        raise CheckpointError(f"{path} cannot be loaded ({type(err).__name__}): refusing to resume from it") from None
    required = ("train_config", "config", "state_dict", "epoch", "batch", "global_step", "rows", "seed")
    if not isinstance(payload, dict) or any(k not in payload for k in required):
        raise CheckpointError(f"{path} lacks the fields of an intrain checkpoint: refusing to resume from it")
    return payload


def load(path) -> dict:
    """Read and verify the checkpoint at ``path``; ``CheckpointError`` when it cannot be used."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint {path} to resume from (one is written at the end of every "
                              "epoch and every --checkpoint-every steps)")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"cannot read {path} ({err.strerror or err})") from None
    return decode(data, path)


# ----------------------------------------------------------------------------- trainer state

def _cpu(obj):
    """``obj`` with every tensor detached and moved to the CPU (dicts and lists walked)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def method_state(model: torch.nn.Module, method) -> dict:
    """The model's weights and the method's own state, on the CPU."""
    return {"state_dict": _cpu(model.state_dict()), **_cpu(method.state_dict())}


def restore_method(payload: dict, model: torch.nn.Module, method, path) -> None:
    """Load what ``method_state`` saved into a freshly built model and method."""
    try:
        model.load_state_dict(payload["state_dict"])
        method.load_state_dict(payload)
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} does not match the model it describes ({first}): "
                              "refusing to resume from it") from None
