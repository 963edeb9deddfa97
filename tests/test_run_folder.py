"""Run folders under concurrent writers, operating-system errors and damaged files (issue 16):
the folder lock, ``--overwrite`` by the manifest, integrity of ``model.pt``/``config.json``/
``metrics.csv``, ``--data-dir`` on resume, the interrupt message, fsync of the folder, out-of-memory
sizes. The matrix of unwritable, missing and damaged paths per subcommand is in
``test_hostile_paths.py``.

How "unwritable" is made while running as root is said in each test (see ``hostile.py``)."""

import errno
import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from intrain.cli import main
from intrain.methods.niti import Niti
from intrain.run import checkpoint, lock
from intrain.run.config import ConfigError, TrainConfig
from intrain.run.files import (MANIFEST_NAME, atomic_write, decode_model, read_manifest, read_model)
from intrain.run.memory import check_memory

from cli_checks import assert_refused
from hostile import fd_path, simulate_error

ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
SMALL = ["train", "--epochs", "2", "--train-limit", "64", "--batch-size", "16", "--width", "0.25"]


class Crash(Exception):
    """Stands for the process dying in the middle of a step."""


def _crash_at(monkeypatch, at_step, exc=Crash):
    original = Niti.train_step

    def crashing(self, x, y, step, epoch):
        if step == at_step:
            raise exc()
        return original(self, x, y, step, epoch)

    monkeypatch.setattr(Niti, "train_step", crashing)


def _state(run_dir):
    return torch.load(run_dir / "model.pt", weights_only=True)["state_dict"]


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _metric_rows(run_dir):
    return [line.split(",")[:4] for line in (run_dir / "metrics.csv").read_text().splitlines()]


# ----------------------------------------------------------------------------- the lock

def test_two_runs_into_one_folder_at_once(tmp_path):
    """The issue's reproduction: two real processes started together into one folder. Exactly one
    trains; the other exits 2 with one line naming the holder's pid; the winner's files are all
    its own (its seed, all its epochs, a model that verifies, its printed accuracy)."""
    # 10 epochs (several seconds): the loser, however late its interpreter starts, then reaches
    # the lock while the winner holds it; with 3 epochs the winner could finish first (the loser
    # then, rightly, found a finished run there), which made this test depend on timing.
    job = ["--epochs", "10", "--checkpoint-every", "5", "--out", "r"]
    procs = [subprocess.Popen([sys.executable, "-m", "intrain.cli", "train", *job, "--seed", str(seed)],
                              cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in (1, 2)]
    results = [(p, *p.communicate(timeout=300)) for p in procs]
    codes = sorted(p.returncode for p, _, _ in results)
    assert codes == [0, 2], [(p.returncode, err) for p, _, err in results]
    (winner, out, _), = [r for r in results if r[0].returncode == 0]
    (loser, _, err), = [r for r in results if r[0].returncode == 2]
    assert err.count("\n") == 1 and err.startswith("intrain: error: ") and "Traceback" not in err
    assert f"pid {winner.pid} on {socket.gethostname()}" in err and "in use by intrain train" in err
    run = tmp_path / "r"
    seed = 1 if procs[0] is winner else 2
    assert json.loads((run / "config.json").read_text())["seed"] == seed
    assert checkpoint.load(run / "checkpoint.pt")["seed"] == seed
    rows = _metric_rows(run)
    assert [r[0] for r in rows] == ["epoch", *map(str, range(1, 11))]  # no interleaved rows
    assert out.splitlines()[-1] == f"eval_acc={float(rows[-1][3]):.2f}"
    read_model(run)  # verifies


def test_a_second_resume_is_refused_while_one_runs(tmp_path, monkeypatch, capsys):
    """Two ``--resume`` of one run: while one holds the folder (here: this process holds the lock as
    a running resume would), the other exits 2 naming it and writes nothing."""
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        _crash_at(m, 5)
        with pytest.raises(Crash):
            main([*SMALL, "--checkpoint-every", "2", "--out", str(run)])
    capsys.readouterr()
    with lock.acquire(run, "intrain train --resume"):
        line = assert_refused(["train", "--resume", str(run)], capsys, tmp_path)
        assert f"in use by intrain train --resume (pid {os.getpid()} on {socket.gethostname()}" in line
        assert f"pid {os.getpid()}" in assert_refused(["train", *SMALL[1:], "--out", str(run), "--overwrite"],
                                                      capsys, tmp_path)
        assert f"pid {os.getpid()}" in assert_refused(["eval", "--run", str(run)], capsys, tmp_path)
    assert main(["train", "--resume", str(run)]) == 0  # released: it goes on


def test_a_lock_is_taken_even_when_the_probe_passed(tmp_path, monkeypatch, capsys):
    """The race the early probe cannot see: the folder is free when checked and taken before the
    run locks it. The run stops with the holder's line and writes nothing of its own."""
    run = tmp_path / "run"
    run.mkdir()
    from intrain.run import files

    monkeypatch.setattr(files.run_lock, "holder", lambda path: None)  # the probe saw it free
    with lock.acquire(run, "intrain train"):
        assert main([*SMALL, "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"pid {os.getpid()}" in err
    assert sorted(p.name for p in run.iterdir()) == [".intrain.lock"]


def test_a_run_that_starts_during_the_checks_is_named_as_busy(tmp_path, monkeypatch, capsys):
    """The race CI once met in ``test_two_runs_into_one_folder_at_once``: the folder is free when
    the checks begin; another run locks it and writes its manifest before we look for a run's files.
    That is a run in progress, to be named (pid), not "already holds a run: pass --overwrite"."""
    run = tmp_path / "run"
    run.mkdir()
    from intrain.run import files

    held = []
    holds_run = files.holds_run

    def another_run_starts(path):  # just before we look: it locks, then writes its manifest
        if not held:
            held.append(lock.acquire(run, "intrain train"))
            files.record_files(run, "config.json")
        return holds_run(path)

    monkeypatch.setattr(files, "holds_run", another_run_starts)
    try:
        assert main([*SMALL, "--out", str(run)]) == 2
    finally:
        for h in held:
            h.release()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"pid {os.getpid()}" in err and "in use by intrain train" in err
    assert sorted(p.name for p in run.iterdir()) == sorted([".intrain.lock", MANIFEST_NAME])


def test_a_holder_found_before_it_wrote_its_details_is_still_named(tmp_path, monkeypatch):
    """A holder writes its pid just after it takes the lock; a probe that lands in between reads
    the file again rather than reporting "details not recorded" (here the details appear while
    the probe pauses)."""
    import fcntl

    run = tmp_path / "run"
    run.mkdir()
    fd = os.open(lock.lock_path(run), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # held, nothing written yet
    pauses = []

    def holder_writes_meanwhile(seconds):
        pauses.append(seconds)
        os.pwrite(fd, json.dumps({"pid": 4242, "host": "h", "started": 0, "command": "intrain train"}).encode(), 0)

    monkeypatch.setattr(lock.time, "sleep", holder_writes_meanwhile)
    try:
        assert "intrain train (pid 4242 on h" in lock.holder(run)
    finally:
        os.close(fd)
    assert len(pauses) == 1


def test_stale_lock_of_a_killed_run_does_not_block_resume(tmp_path):
    """SIGKILL leaves the lock file (naming the dead process) but not the lock: --resume proceeds."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "intrain.cli", *SMALL, "--epochs", "3", "--train-limit", "400",
                             "--checkpoint-every", "3", "--out", str(run)],
                            cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while not (run / "checkpoint.pt").exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert json.loads((run / lock.LOCK_NAME).read_text())["pid"] == proc.pid
    assert lock.holder(run) is None
    assert main(["train", "--resume", str(run)]) == 0
    assert json.loads((run / lock.LOCK_NAME).read_text())["pid"] == os.getpid()


def test_a_file_system_without_locks_gets_a_warning_not_a_failure(tmp_path, monkeypatch, capsys):
    """flock refused with ENOLCK (simulated: some network file systems): the command goes on
    unlocked after one warning line."""
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    held = lock.acquire(tmp_path, "intrain train")
    held.release()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("intrain: warning: cannot lock") and "No locks" in err


# ----------------------------------------------------------------------------- --overwrite

def test_overwrite_removes_exactly_what_the_earlier_run_wrote(tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*SMALL, "--out", str(run)]) == 0
    assert main(["eval", "--run", str(run)]) == 0
    old_events = sorted((run / "tensorboard").iterdir())
    assert old_events and "eval.json" in read_manifest(run)
    (run / "notes.txt").write_text("mine")
    (run / "tensorboard" / "mine.txt").write_text("mine too")
    assert main([*SMALL, "--arith", "float", "--out", str(run), "--overwrite"]) == 0
    assert not (run / "eval.json").exists()  # the old run's evaluation went with it
    assert all(not p.exists() for p in old_events)
    assert (run / "notes.txt").read_text() == "mine" and (run / "tensorboard" / "mine.txt").read_text() == "mine too"
    assert json.loads((run / "config.json").read_text())["arith"] == "float"
    listed = read_manifest(run)
    assert "eval.json" not in listed and all(f"tensorboard/{p.name}" not in listed for p in old_events)
    assert "tensorboard/" not in listed  # the folder was there before this run: not its to remove
    capsys.readouterr()


def test_overwrite_keeps_a_users_tensorboard_folder_where_no_run_was(tmp_path, capsys):
    run = tmp_path / "mine"
    (run / "tensorboard").mkdir(parents=True)
    (run / "tensorboard" / "events.out.tfevents.123.me").write_bytes(b"my own events")
    (run / "eval.json").write_text("{}")
    assert main([*SMALL, "--out", str(run), "--overwrite"]) == 0
    assert (run / "tensorboard" / "events.out.tfevents.123.me").read_bytes() == b"my own events"
    assert (run / "eval.json").read_text() == "{}"
    # A second overwrite removes the run's own event file, and keeps the user's folder and files.
    ours = [n for n in read_manifest(run) if n.startswith("tensorboard/")]
    assert main([*SMALL, "--out", str(run), "--overwrite"]) == 0
    assert all(not (run / n).exists() for n in ours)
    assert (run / "tensorboard" / "events.out.tfevents.123.me").read_bytes() == b"my own events"
    capsys.readouterr()


def test_overwrite_of_a_run_made_before_manifests(tmp_path, capsys):
    """intrain 0.1's folders have no manifest: their run files, eval.json and TensorBoard event
    files go, a user's other files stay."""
    import shutil
    from pathlib import Path

    run = tmp_path / "old"
    shutil.copytree(Path(__file__).parent / "fixtures" / "v0.1-int8", run)
    (run / "eval.json").write_text("{}")
    (run / "tensorboard").mkdir()
    (run / "tensorboard" / "events.out.tfevents.1.old").write_bytes(b"old events")
    (run / "tensorboard" / "notes.md").write_text("mine")
    assert main([*SMALL, "--out", str(run), "--overwrite"]) == 0
    assert not (run / "eval.json").exists() and not (run / "tensorboard" / "events.out.tfevents.1.old").exists()
    assert (run / "tensorboard" / "notes.md").read_text() == "mine"
    assert checkpoint.load(run / "checkpoint.pt")["train_config"]["width"] == 0.25
    capsys.readouterr()


def test_damaged_manifest_refuses_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*SMALL, "--epochs", "0", "--out", str(run)]) == 0
    capsys.readouterr()
    path = run / MANIFEST_NAME
    path.write_text(path.read_text().replace("metrics.csv", "../../etc/x"))
    line = assert_refused([*SMALL, "--out", str(run), "--overwrite"], capsys, tmp_path)
    assert MANIFEST_NAME in line and "damaged" in line


# ----------------------------------------------------------------------------- integrity

@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("finished")
    assert main([*SMALL, "--out", str(root / "run")]) == 0
    return root / "run"


def test_model_file_stays_loadable_by_torch(finished):
    saved = torch.load(finished / "model.pt", weights_only=True)
    assert set(saved) == {"format", "config", "state_dict", "integrity"}
    assert _same(saved["state_dict"], read_model(finished)["state_dict"])
    assert saved["state_dict"]["layers.1.weight"].dtype == torch.int8


def test_every_flipped_bit_of_model_pt_is_detected(finished):
    """Every byte of a model.pt, its lowest and highest bit in turn: each change is refused before
    anything is unpickled (the digest covers every byte, the payload's marker covers the digest)."""
    data = (finished / "model.pt").read_bytes()
    decode_model(data, "model.pt")
    for i in range(len(data)):
        for bit in (0x01, 0x80):
            damaged = bytearray(data)
            damaged[i] ^= bit
            with pytest.raises(ConfigError):
                decode_model(bytes(damaged), "model.pt")


def test_flipped_byte_in_model_pt_fails_eval(finished, tmp_path, capsys):
    """The issue's case: one byte in the middle of model.pt (a weight) changed; eval refuses."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    data = bytearray((run / "model.pt").read_bytes())
    data[len(data) // 2] ^= 0x01
    (run / "model.pt").write_bytes(bytes(data))
    line = assert_refused(["eval", "--run", str(run)], capsys, tmp_path)
    assert "model.pt is damaged (sha256 mismatch)" in line


def test_edited_config_json_fails_eval(finished, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    cfg = json.loads((run / "config.json").read_text())
    assert "sha256" not in cfg  # config.json stays the plain config
    (run / "config.json").write_text(json.dumps(dict(cfg, batch_size=cfg["batch_size"] + 1)))
    line = assert_refused(["eval", "--run", str(run)], capsys, tmp_path)
    assert "config.json is damaged or was edited" in line


def test_damaged_metrics_csv_fails_plot_and_resume_repairs_it(finished, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    text = (run / "metrics.csv").read_text()
    lines = text.splitlines()
    lines[1] = lines[1].replace(lines[1].split(",")[3], "99.9999")
    (run / "metrics.csv").write_text("\n".join(lines) + "\n")
    line = assert_refused(["plot", str(run), "-o", str(tmp_path / "c.png")], capsys, tmp_path)
    assert "metrics.csv is damaged or was edited" in line and "--resume" in line
    before = _state(run)
    assert main(["train", "--resume", str(run)]) == 0  # a finished run: rewrites metrics.csv and model.pt
    assert (run / "metrics.csv").read_text() == text and _same(_state(run), before)
    assert main(["plot", str(run), "-o", str(tmp_path / "c.png")]) == 0
    capsys.readouterr()


def test_foreign_pickles_give_one_line_and_no_warning(finished, tmp_path, capsys, recwarn):
    """A pickle that would run code, as model.pt (plain pickle, and inside a zip) and as
    checkpoint.pt (with a valid header and digest): one line each, torch's warnings silenced,
    nothing run."""
    import hashlib
    import pickle
    import shutil
    import zipfile

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'PWNED'}",))

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "model.pt").write_bytes(pickle.dumps({"format": "x", "state_dict": Evil()}, protocol=4))
    assert "not an intrain model file" in assert_refused(["eval", "--run", str(run)], capsys, tmp_path)
    with zipfile.ZipFile(run / "model.pt", "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(Evil(), protocol=4))
        z.writestr("archive/version", "3\n")
    assert "model.pt" in assert_refused(["eval", "--run", str(run)], capsys, tmp_path)
    body = pickle.dumps(Evil(), protocol=4)
    (run / "checkpoint.pt").write_bytes(checkpoint.MAGIC + b"version 1\n" +
                                        f"sha256 {hashlib.sha256(body).hexdigest()}\n".encode() + body)
    assert "checkpoint.pt cannot be loaded" in assert_refused(["train", "--resume", str(run)], capsys, tmp_path)
    assert not (tmp_path / "PWNED").exists()
    assert len(recwarn) == 0, [str(w.message) for w in recwarn]


# ----------------------------------------------------------------------------- data folder on resume

def _write_mnist(folder, n=48, shift=0):
    folder.mkdir(parents=True)
    for prefix in ("train", "t10k"):
        pixels = bytes((i * 7 + shift) % 256 for i in range(n * 784))
        labels = bytes((i + shift) % 10 for i in range(n))
        for stem, dims, payload in ((f"{prefix}-images-idx3-ubyte", (n, 28, 28), pixels),
                                    (f"{prefix}-labels-idx1-ubyte", (n,), labels)):
            header = bytes([0, 0, 8, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)
            with gzip.open(folder / f"{stem}.gz", "wb") as f:
                f.write(header + payload)
    return folder


def test_relative_data_dir_resumes_from_another_folder(tmp_path, monkeypatch, capsys):
    """A run trained with a relative --data-dir resumes from another current folder with no
    --data-dir (the absolute path was recorded), and with a new path to the same files (moved);
    other data of the same size is refused with one line."""
    (tmp_path / "a").mkdir()
    _write_mnist(tmp_path / "a" / "mnist")
    job = ["train", "--dataset", "mnist", "--data-dir", "mnist", "--epochs", "2", "--batch-size", "16",
           "--width", "0.25", "--checkpoint-every", "2"]
    monkeypatch.chdir(tmp_path / "a")
    assert main([*job, "--out", str(tmp_path / "ref")]) == 0
    with monkeypatch.context() as m:
        _crash_at(m, 4)
        with pytest.raises(Crash):
            main([*job, "--out", str(tmp_path / "run")])
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["data_dir"] == str(tmp_path / "a" / "mnist") and len(cfg["data_fingerprint"]) == 64
    import shutil

    shutil.copytree(tmp_path / "run", tmp_path / "run2")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--resume", "run"]) == 0  # no --data-dir: the recorded absolute path
    assert _same(_state(tmp_path / "run"), _state(tmp_path / "ref"))
    # The same files in another folder, raw instead of gzipped: accepted.
    moved = tmp_path / "b" / "data"
    moved.mkdir(parents=True)
    for gz in (tmp_path / "a" / "mnist").iterdir():
        (moved / gz.name[:-3]).write_bytes(gzip.decompress(gz.read_bytes()))
    shutil.rmtree(tmp_path / "a")
    other = _write_mnist(tmp_path / "other", shift=1)
    capsys.readouterr()
    line = assert_refused(["train", "--resume", "run2", "--data-dir", str(other)], capsys, tmp_path)
    assert "is not the data the run" in line and str(other) in line
    assert "does not exist" in assert_refused(["train", "--resume", "run2"], capsys, tmp_path)
    assert main(["train", "--resume", "run2", "--data-dir", "b/data"]) == 0
    assert _same(_state(tmp_path / "run2"), _state(tmp_path / "ref"))
    assert json.loads((tmp_path / "run2" / "config.json").read_text())["data_dir"] == str(moved)
    assert main(["eval", "--run", "run2"]) == 0  # eval finds the data where the resume found it
    capsys.readouterr()


# ----------------------------------------------------------------------------- interrupts, errors mid-run

def test_interrupt_says_how_to_resume(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        _crash_at(m, 5, KeyboardInterrupt)
        assert main([*SMALL, "--checkpoint-every", "2", "--out", str(run)]) == 130
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == f"intrain: interrupted; continue the run with: intrain train --resume {run}"
    assert lock.holder(run) is None
    assert main(["train", "--resume", str(run)]) == 0
    with monkeypatch.context() as m:
        _crash_at(m, 1, KeyboardInterrupt)
        assert main([*SMALL, "--out", str(tmp_path / "early")]) == 130
    assert "nothing to resume" in capsys.readouterr().err.splitlines()[-1]


def test_disk_full_mid_run_is_one_line_and_the_run_resumes(tmp_path, monkeypatch, capsys):
    """ENOSPC simulated: os.fsync of the third checkpoint write fails (hostile.simulate_error).
    One line naming the file and the --resume command, exit 2; the resumed run ends with the weights
    of an uninterrupted one."""
    assert main([*SMALL, "--checkpoint-every", "2", "--out", str(tmp_path / "ref")]) == 0
    run = tmp_path / "run"
    calls = []

    def third_checkpoint(fd):
        if ".checkpoint.pt." in os.path.basename(fd_path(fd)):
            calls.append(fd)
            return len(calls) == 3
        return False

    capsys.readouterr()
    with monkeypatch.context() as m:
        simulate_error(m, "fsync", errno.ENOSPC, third_checkpoint)
        assert main([*SMALL, "--checkpoint-every", "2", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.splitlines()[-1].startswith("intrain: error: ")
    line = err.splitlines()[-1]  # after the progress lines of the epochs done
    assert "No space left on device" in line
    assert f"cannot write {run / 'checkpoint.pt'}" in line and f"intrain train --resume {run}" in line
    assert not list(run.glob(".*.tmp"))
    assert main(["train", "--resume", str(run)]) == 0
    assert _same(_state(run), _state(tmp_path / "ref"))
    capsys.readouterr()


def test_atomic_write_fsyncs_the_folder_after_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", fd_path(fd))), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b))[1])
    atomic_write(tmp_path / "f.bin", lambda f: f.write(b"data"))
    kinds = [kind for kind, _ in events]
    assert kinds == ["fsync", "replace", "fsync"]
    assert events[1][1] == str(tmp_path / "f.bin") and events[2][1] == str(tmp_path)


# ----------------------------------------------------------------------------- memory

def test_memory_estimate_refuses_before_allocating(tmp_path, capsys, monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("the model must not be built")

    monkeypatch.setattr(Niti, "build_model", no_build)
    for extra in (["--width", "1e9"], ["--width", "1e6", "--arith", "float"]):
        line = assert_refused(["train", *extra], capsys, tmp_path)
        assert "needs at least" in line and "TiB" in line and "available" in line and "--width" in line
    c = TrainConfig(width=1.0).resolved()
    need = check_memory(c, (1, 8, 8), 10, available=1 << 40)
    assert 0 < need < 64 << 20  # the digits MLP: well under 64 MiB
    with pytest.raises(ConfigError, match="needs at least"):
        check_memory(c, (1, 8, 8), 10, available=need - 1)


def test_allocation_failure_is_one_line(tmp_path, capsys, monkeypatch):
    """An allocation that fails anyway (simulated: torch's CPU allocator message) is one line."""
    def oom(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 1000000000000 bytes. Error code 12")

    monkeypatch.setattr(Niti, "build_model", oom)
    line = assert_refused(["train", "--out", str(tmp_path / "run")], capsys, tmp_path)
    assert "out of memory" in line and "--width" in line


@pytest.mark.parametrize("master", ["int32", "fp32"])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_dfp16_memory_estimate_counts_the_optimisers_state(master, optimizer):
    """DFP16's bytes per weight in the estimate are its int16 weight and the update's state per
    weight as a trained step holds them (masters, momentum or AdamW's moments)."""
    from intrain.layers import weighted_layers
    from intrain.methods.dfp16 import Dfp16
    from torch.utils._pytree import tree_leaves

    from intrain.numeric.qtensor import QTensor
    from intrain.run.memory import bytes_per_weight

    c = TrainConfig(arith="dfp16", model="lenet5", options={"dfp16_master": master, "optimizer": optimizer,
                                                            "lr": 0.01}).resolved()
    options = Dfp16.make_options(c.options, {})
    model = Dfp16.build_model(options, "lenet5", (1, 28, 28), 10, seed=0, width=0.5, device="cpu")
    trainer = Dfp16(model, options, seed=0, total_steps=4)
    x = QTensor(torch.randint(0, 128, (8, 1, 28, 28), dtype=torch.int8), torch.tensor(-7))
    trainer.train_step(Dfp16.network_input(x), torch.randint(0, 10, (8,)), 0, 0)
    weights = sum(layer.weight.numel() for layer in weighted_layers(model))
    held = [t for t in tree_leaves(trainer.state_dict())
            if isinstance(t, torch.Tensor) and t.numel() > 1]
    state_bytes = sum(t.numel() * t.element_size() for t in held)
    assert state_bytes % weights == 0
    assert bytes_per_weight(c) == 2 + state_bytes // weights
