"""The cpu backend's path choice: ``--int8-gemm auto|on|off`` and ``--backend reference`` train a
LeNet-5 epoch to bit-identical weights and metrics; the automatic choice follows the measured
int8 / float32 GEMM rate of the machine, which is measured once and cached."""

import gzip
import json

import pytest
import torch

from intrain.cli import main
from intrain.kernels import CpuBackend, CpuSettings
from intrain.kernels.cpu import calibrate


def _write_idx(path, dims, payload: bytes):
    header = bytes([0, 0, 8, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)
    with gzip.open(path, "wb") as f:
        f.write(header + payload)


def _random_mnist(folder, n):
    """MNIST-format files of ``n`` images of random strokes (pixels 0 or 255 mostly, like digits),
    labels from the images so that a model can learn something."""
    folder.mkdir()
    gen = torch.Generator().manual_seed(7)
    for prefix in ("train", "t10k"):
        images = (torch.rand(n, 28, 28, generator=gen) > 0.8).to(torch.uint8) * 255
        labels = (images[:, 10:18, 10:18].sum((1, 2)) // 255 % 10).to(torch.uint8)
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", (n, 28, 28), images.numpy().tobytes())
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", (n,), labels.numpy().tobytes())
    return folder


@pytest.mark.parametrize("relu_scale", ["magnitude", "positive"])
def test_lenet5_epoch_is_bit_identical_on_every_path(tmp_path, relu_scale):
    data = _random_mnist(tmp_path / "mnist", 384)
    runs = {"auto": ["--int8-gemm", "auto"], "on": ["--int8-gemm", "on"], "off": ["--int8-gemm", "off"],
            "reference": ["--backend", "reference"]}
    for name, extra in runs.items():
        assert main(["train", "--dataset", "mnist", "--data-dir", str(data), "--model", "lenet5", "--epochs", "1",
                     "--batch-size", "64", "--val-split", "128", "--seed", "3", "--out", str(tmp_path / name),
                     "--relu-scale", relu_scale, *extra]) == 0
    weights = {name: torch.load(tmp_path / name / "model.pt", weights_only=True) for name in runs}
    metrics = {name: (tmp_path / name / "metrics.csv").read_text().splitlines() for name in runs}
    first = weights["auto"]["state_dict"]
    assert first and all(isinstance(v, torch.Tensor) for v in first.values())
    for name in runs:
        other = weights[name]["state_dict"]
        assert first.keys() == other.keys()
        assert all(torch.equal(first[k], other[k]) for k in first), name
        # every column but the seconds
        assert [row.rsplit(",", 1)[0] for row in metrics[name]] == [row.rsplit(",", 1)[0] for row in metrics["auto"]]


def test_automatic_choice_follows_the_measured_rate(monkeypatch):
    a = torch.ones(4, 40, dtype=torch.int8)
    b = torch.ones(40, 4, dtype=torch.int8)
    backend = CpuBackend(CpuSettings())
    for rate, takes_int8 in ((1.0, False), (1.99, False), (2.0, True), (9.0, True)):
        monkeypatch.setattr(calibrate, "int8_gemm_speedup", lambda rate=rate: rate)
        assert backend._int8_gemm(a, b) is takes_int8
        assert backend._int8_gemm(a, b, channels=31) is False  # too narrow for the im2col copy
        assert backend._int8_gemm(a, b, channels=32) is takes_int8
    monkeypatch.setattr(calibrate, "int8_gemm_speedup", lambda: 9.0)
    assert CpuBackend(CpuSettings(use_int8_gemm=False))._int8_gemm(a, b) is False
    monkeypatch.setattr(calibrate, "int8_gemm_speedup", lambda: 1.0)
    assert CpuBackend(CpuSettings(use_int8_gemm=True))._int8_gemm(a, b) is True
    assert backend._int8_gemm(a.to(torch.int16), b) is False  # int16 operands never take it


def test_calibration_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("INTRAIN_CACHE_DIR", str(tmp_path / "cache"))
    measured = []
    monkeypatch.setattr(calibrate, "measure_int8_gemm_speedup", lambda: measured.append(1) or 3.5)
    calibrate.int8_gemm_speedup.cache_clear()
    try:
        assert calibrate.int8_gemm_speedup() == 3.5
        cache = json.loads((tmp_path / "cache" / "cpu-calibration.json").read_text())
        assert list(cache.values()) == [3.5]
        calibrate.int8_gemm_speedup.cache_clear()  # a new process reads the file
        assert calibrate.int8_gemm_speedup() == 3.5 and len(measured) == 1
        # a damaged cache is measured again and rewritten
        (tmp_path / "cache" / "cpu-calibration.json").write_text("{not json")
        calibrate.int8_gemm_speedup.cache_clear()
        assert calibrate.int8_gemm_speedup() == 3.5 and len(measured) == 2
        assert list(json.loads((tmp_path / "cache" / "cpu-calibration.json").read_text()).values()) == [3.5]
        # a cache that cannot be written only means measuring again next time
        monkeypatch.setenv("INTRAIN_CACHE_DIR", str(tmp_path / "cache" / "cpu-calibration.json" / "below-a-file"))
        calibrate.int8_gemm_speedup.cache_clear()
        assert calibrate.int8_gemm_speedup() == 3.5 and len(measured) == 3
    finally:
        calibrate.int8_gemm_speedup.cache_clear()


def test_an_instruction_set_limit_is_measured_apart(tmp_path, monkeypatch):
    """``ONEDNN_MAX_CPU_ISA`` (and the like) change what the GEMMs run on, so a rate measured
    without the limit is not reused under it, nor the other way round."""
    monkeypatch.setenv("INTRAIN_CACHE_DIR", str(tmp_path))
    for name in calibrate.ISA_LIMITS:
        monkeypatch.delenv(name, raising=False)
    rates = iter([5.0, 2.5])
    monkeypatch.setattr(calibrate, "measure_int8_gemm_speedup", lambda: next(rates))
    try:
        calibrate.int8_gemm_speedup.cache_clear()
        assert calibrate.int8_gemm_speedup() == 5.0
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_VNNI")
        calibrate.int8_gemm_speedup.cache_clear()
        assert calibrate.int8_gemm_speedup() == 2.5
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
        calibrate.int8_gemm_speedup.cache_clear()
        assert calibrate.int8_gemm_speedup() == 5.0  # from the cache: no third measurement
        keys = sorted(json.loads((tmp_path / "cpu-calibration.json").read_text()))
        assert len(keys) == 2 and keys[1].endswith("|ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI")
    finally:
        calibrate.int8_gemm_speedup.cache_clear()


def test_measurement_gives_a_positive_rate():
    assert calibrate.measure_int8_gemm_speedup() > 0


@pytest.mark.parametrize("argv, words", [
    (["--int8-gemm", "on", "--backend", "reference"], "--backend reference"),
    (["--int8-gemm", "off", "--backend", "cuda"], "--backend cuda"),
    (["--int8-gemm", "on", "--arith", "float"], "does not apply"),
    (["--int8-gemm", "sometimes"], "--int8-gemm"),
])
def test_int8_gemm_option_refused_where_it_means_nothing(argv, words, capsys, tmp_path, monkeypatch):
    from cli_checks import assert_refused
    monkeypatch.chdir(tmp_path)
    line = assert_refused(["train", *argv, "--out", "run"], capsys, tmp_path)
    assert words in line
