"""One writer per run folder: an exclusive ``flock`` on ``<run dir>/.intrain.lock``.

Every command that writes into a run folder (``intrain train``, ``train --resume``, ``eval``)
takes the lock before its first write there and releases it at the end. A second command that
finds the folder locked stops with one line naming the holder (pid, host, start time, command,
read from the lock file, which the holder fills in once it holds the lock).

Why ``flock`` and not a file created with ``O_CREAT | O_EXCL``: the kernel releases a ``flock``
when its holder dies, however it dies (SIGKILL, power loss of a client), so a lock can never go
stale and ``--resume`` after a kill needs no clean-up and no guess whether a pid is still alive.
The price: ``flock`` is only as good as the file system's support for it. Local file systems
and NFSv4 (Linux maps ``flock`` to NFS byte-range locks) honour it between hosts; some network
or FUSE file systems accept it without telling other hosts, and a few refuse it (``ENOLCK``,
``EOPNOTSUPP``): then the command goes on unlocked after a one-line warning.

The lock file is never deleted (deleting it would let a process that opened the old file and
one that creates a new file both "hold" the lock); it is a few hundred bytes describing the last
holder, and its presence alone means nothing.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no locking (see the module docstring)
    fcntl = None

LOCK_NAME = ".intrain.lock"
#: Attempts and pause before a busy lock is reported: another command's ``holder()`` probe holds a
#: shared lock for microseconds, which must not make a real writer give up.
_TRIES, _PAUSE_S = 5, 0.05


class RunFolderBusy(ValueError):
    """The run folder is locked by another command; the message (one line) names the holder."""


def lock_path(run_dir) -> Path:
    return Path(run_dir) / LOCK_NAME


def _describe(path: Path) -> str:
    """The holder recorded in the lock file, for messages. A holder writes its details just after
    it takes the lock, so a file found empty or half-written is read again a few times
    (``_TRIES``, ``_PAUSE_S``) before it is reported as unrecorded."""
    for attempt in range(_TRIES):
        try:
            info = json.loads(path.read_text())
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info["started"])))
            return f"{info['command']} (pid {int(info['pid'])} on {info['host']}, since {when})"
        except (OSError, ValueError, KeyError, TypeError):  # being written, or not ours
            if attempt + 1 < _TRIES:
                time.sleep(_PAUSE_S)
    return "another intrain command (its details are not recorded yet)"


def holder(run_dir) -> str | None:
    """Who holds the lock of ``run_dir`` (a description), or ``None`` when nobody does. Writes
    nothing: a missing or unreadable lock file counts as free (the writer's own ``acquire``
    decides)."""
    path = lock_path(run_dir)
    if fcntl is None or not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _describe(path)
    except OSError:
        return None
    finally:
        os.close(fd)  # also releases the shared lock when it was taken
    return None


class RunLock:
    """A held lock (or, where locking is unsupported, a placeholder); ``release()`` ends it."""

    def __init__(self, path: Path, fd: int | None):
        self.path, self.fd = path, fd

    def release(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            # Unlock explicitly: loader worker processes forked meanwhile share this open file,
            # and closing our copy alone would leave the lock held until they exit.
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire(run_dir, command: str, what: str = "run directory") -> RunLock:
    """Lock the existing folder ``run_dir`` for ``command`` (e.g. ``"intrain train"``).

    Raises ``RunFolderBusy`` when another process holds it and ``OSError`` when the lock file
    cannot be created or opened (a read-only folder, say); the caller words that error."""
    path = lock_path(run_dir)
    if fcntl is None:
        return RunLock(path, None)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        for attempt in range(_TRIES):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt + 1 == _TRIES:
                    raise RunFolderBusy(f"{what} {run_dir} is in use by {_describe(path)}: wait for it to "
                                        "finish or stop it, or choose another folder") from None
                time.sleep(_PAUSE_S)
            except OSError as err:
                if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                print(f"intrain: warning: cannot lock {path} ({err.strerror}): a second command writing "
                      "into this folder at the same time would not be stopped", file=sys.stderr)
                os.close(fd)
                return RunLock(path, None)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": command,
                "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    except BaseException:
        try:
            os.close(fd)
        except OSError:
            pass
        raise
    return RunLock(path, fd)
