"""Shared checks for command-line tests: a refused command writes nothing and says one line."""

import os

from intrain.cli import main


def snapshot(root):
    """Every file and directory under ``root``, with each file's bytes and modification time
    (so a file rewritten with the same content still counts as changed); a symbolic link by its
    target (tests link files to unreadable places)."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            snap[os.path.relpath(os.path.join(dirpath, d), root)] = None
        for f in filenames:
            path = os.path.join(dirpath, f)
            if os.path.islink(path):
                snap[os.path.relpath(path, root)] = ("link", os.readlink(path))
                continue
            with open(path, "rb") as fh:
                snap[os.path.relpath(path, root)] = (fh.read(), os.stat(path).st_mtime_ns)
    return snap


def assert_refused(argv, capsys, root):
    """Run ``main(argv)``: exit 2, one ``intrain: error:`` line on stderr, nothing on stdout, and no
    file or directory under ``root`` created, changed or removed. Returns the error line."""
    before = snapshot(root)
    assert main(argv) == 2
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    assert lines[0].startswith("intrain: error: ") and len(lines[0]) > len("intrain: error: ") + 10
    assert out == ""
    assert snapshot(root) == before
    return lines[0]


class Crash(Exception):
    """Stands for the process dying in the middle of a step."""


def run_until_crash(monkeypatch, method, at_step: int, argv) -> None:
    """Run ``main(argv)`` with ``method.train_step`` dying (like a kill) when it reaches global step
    ``at_step``; the run must end in that crash. ``method.train_step`` is itself again afterwards."""
    import pytest

    original = method.train_step

    def crashing(self, x, y, step, epoch, *rest, **keywords):
        if step == at_step:
            raise Crash
        return original(self, x, y, step, epoch, *rest, **keywords)

    with monkeypatch.context() as patched:
        patched.setattr(method, "train_step", crashing)
        with pytest.raises(Crash):
            main(argv)
