"""Hostile file-system conditions for tests that run as root (as here and in CI), where file
permissions are not enforced:

* ``immutable(path)``: a really read-only folder. As root, ``chattr +i`` (the kernel refuses to
  create, rename or remove entries in it even for root; needs a file system with inode flags such
  as ext4, xfs, btrfs, and CAP_LINUX_IMMUTABLE); as another user, ``chmod 0555``. Returns False when
  neither is possible here (a tmpfs, overlayfs or a container without the capability), and the
  caller skips.
* ``simulate_read_only(monkeypatch, root)``: the same condition simulated in this process, so it is
  tested everywhere: every call that would create, write, rename or remove something under ``root``
  (``os.open`` with a write flag, ``open``/``io.open`` in a write mode, ``os.mkdir``, ``os.replace``,
  ``os.rename``, ``os.unlink``, ``os.rmdir``, ``os.ftruncate`` of a file there) raises
  ``OSError(EROFS)``, and ``os.access(..., W_OK)`` answers False, as on a read-only mount.
* ``simulate_error(monkeypatch, name, errno_, when)``: make ``os.<name>`` raise ``OSError(errno_)``
  when ``when(*args)`` is true (``ENOSPC`` from ``os.fsync``, ``EIO`` from reading a file, ...).

Paths that fail for root without any of this: a path under a regular file (``ENOTDIR``) and a
folder under ``/proc`` (``ENOENT``: procfs creates nothing).
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import shutil
import subprocess
from pathlib import Path

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def immutable(path: Path, request) -> bool:
    """Make the existing folder ``path`` read-only for real (see the module docstring), undone when
    the test ends; False when this machine cannot."""
    path = Path(path)
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o555)
        request.addfinalizer(lambda: path.chmod(mode))
        return True
    chattr = shutil.which("chattr")
    if chattr is None:
        return False
    done = subprocess.run([chattr, "+i", str(path)], capture_output=True).returncode == 0
    if done:
        request.addfinalizer(lambda: subprocess.run([chattr, "-i", str(path)], capture_output=True))
        try:  # the flag must really stop root here
            (path / ".probe").mkdir()
        except OSError:
            return True
        (path / ".probe").rmdir()
        return False
    return False


def _under(path, root: str) -> bool:
    if isinstance(path, int):
        return False
    try:
        p = os.path.abspath(os.fsdecode(path))
    except TypeError:
        return False
    return p == root or p.startswith(root + os.sep)


def _erofs(path):
    return OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))


def simulate_read_only(monkeypatch, root) -> None:
    """Make ``root`` and everything below it read-only in this process (see the module docstring)."""
    root = os.path.abspath(root)
    real = {name: getattr(os, name) for name in ("open", "mkdir", "replace", "rename", "unlink", "rmdir",
                                                 "access", "remove")}
    real_open = builtins.open

    def os_open(path, flags, *args, **kwargs):
        if flags & _WRITE_FLAGS and _under(path, root):
            raise _erofs(path)
        return real["open"](path, flags, *args, **kwargs)

    def refuse(name, arg=0):
        def call(*args, **kwargs):
            if _under(args[arg], root) or (name in ("replace", "rename") and _under(args[1], root)):
                raise _erofs(args[arg])
            return real[name](*args, **kwargs)
        return call

    def access(path, mode, *args, **kwargs):
        if mode & os.W_OK and _under(path, root):
            return False
        return real["access"](path, mode, *args, **kwargs)

    def py_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and _under(file, root):
            raise _erofs(file)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", os_open)
    for name in ("mkdir", "replace", "rename", "unlink", "rmdir", "remove"):
        monkeypatch.setattr(os, name, refuse(name))
    monkeypatch.setattr(os, "access", access)
    monkeypatch.setattr(builtins, "open", py_open)
    monkeypatch.setattr(io, "open", py_open)


def simulate_error(monkeypatch, name: str, code: int, when=lambda *args: True) -> list:
    """``os.<name>`` raises ``OSError(code)`` whenever ``when(*args)``; returns the list of the
    arguments of the calls it refused."""
    real = getattr(os, name)
    refused = []

    def call(*args, **kwargs):
        if when(*args):
            refused.append(args)
            raise OSError(code, os.strerror(code))
        return real(*args, **kwargs)

    monkeypatch.setattr(os, name, call)
    return refused


def fd_path(fd: int) -> str:
    """The path an open file descriptor refers to (Linux)."""
    return os.readlink(f"/proc/self/fd/{fd}")
