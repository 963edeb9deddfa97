"""``intrain eval`` (accuracy, confusion matrix, eval.json), ``intrain plot`` (PNG of the curves)
and ``intrain download`` failing cleanly without a network; every refusal is one line, exit 2."""

import csv
import json
import socket

import pytest

from intrain.cli import main

from cli_checks import assert_refused


def _refused(argv, root, capsys):
    return assert_refused(argv, capsys, root)

PNG = b"\x89PNG\r\n\x1a\n"


def _last_eval_acc(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return float(list(csv.DictReader(f))[-1]["eval_acc"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A short int8 run and its float twin on digits."""
    root = tmp_path_factory.mktemp("runs")
    for arith in ("int8", "float"):
        argv = ["train", "--arith", arith, "--epochs", "2", "--train-limit", "200", "--out", str(root / arith)]
        assert main(argv) == 0
    return root


@pytest.mark.parametrize("arith", ["int8", "float"])
def test_eval_matches_the_run(runs, arith, capsys):
    run_dir = runs / arith
    capsys.readouterr()
    assert main(["eval", "--run", str(run_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = _last_eval_acc(run_dir)
    assert lines[-1] == f"eval_acc={expected:.2f}"
    result = json.loads((run_dir / "eval.json").read_text())
    matrix = result["confusion"]
    assert len(matrix) == 10 and all(len(row) == 10 for row in matrix)
    assert sum(map(sum, matrix)) == result["eval_size"] == 360  # the digits test split
    assert sum(matrix[i][i] for i in range(10)) == result["correct"]
    assert result["accuracy"] == pytest.approx(expected, abs=5e-5)
    assert result["eval_name"] == "test" and result["batch_size"] == 32
    assert any("confusion" in line for line in lines)


def test_eval_with_overrides(runs, capsys):
    assert main(["eval", "--run", str(runs / "int8"), "--val-split", "100", "--batch-size", "50"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("eval_acc=")
    result = json.loads((runs / "int8" / "eval.json").read_text())
    assert result["eval_name"] == "validation" and result["eval_size"] == 100 and result["batch_size"] == 50
    assert sum(map(sum, result["confusion"])) == 100


def test_a_tuning_run_evaluates_on_its_tuning_split(tmp_path, capsys):
    run_dir = tmp_path / "tuning"
    argv = ["train", "--epochs", "1", "--val-split", "100", "--tune-split", "200", "--out", str(run_dir)]
    assert main(argv) == 0
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["tune_split"] == 200 and cfg["eval_name"] == "tuning" and cfg["train_size"] == 1437 - 300
    expected = _last_eval_acc(run_dir)
    capsys.readouterr()
    assert main(["eval", "--run", str(run_dir)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"eval_acc={expected:.2f}"
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["eval_name"] == "tuning" and result["eval_size"] == 200
    assert main(["eval", "--run", str(run_dir), "--val-split", "100"]) == 0  # the reported split, asked for
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["eval_name"] == "validation" and result["eval_size"] == 100


def test_eval_errors(tmp_path, runs, capsys):
    assert "nowhere" in _refused(["eval", "--run", str(tmp_path / "nowhere")], tmp_path, capsys)
    (tmp_path / "empty").mkdir()
    assert "config.json" in _refused(["eval", "--run", str(tmp_path / "empty")], tmp_path, capsys)
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "metrics.csv"):
        (broken / name).write_bytes((runs / "int8" / name).read_bytes())
    (broken / "model.pt").write_bytes((runs / "int8" / "model.pt").read_bytes()[:100])
    assert "model.pt" in _refused(["eval", "--run", str(broken)], tmp_path, capsys)
    # A data set whose images do not fit the model.
    assert "--data-dir" in _refused(["eval", "--run", str(runs / "int8"), "--dataset", "mnist",
                                     "--data-dir", str(tmp_path / "no-mnist")], tmp_path, capsys)


def test_plot_writes_a_png(runs, tmp_path, capsys):
    out = tmp_path / "curves.png"
    assert main(["plot", str(runs / "int8"), str(runs / "float"), "-o", str(out)]) == 0
    data = out.read_bytes()
    assert data.startswith(PNG) and len(data) > 1000
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]  # no temp file left
    capsys.readouterr()
    # An existing file is kept unless --overwrite.
    assert "--overwrite" in _refused(["plot", str(runs / "int8"), "-o", str(out)], tmp_path, capsys)
    assert main(["plot", str(runs / "int8"), "-o", str(out), "--overwrite"]) == 0
    assert out.read_bytes().startswith(PNG) and out.read_bytes() != data


def test_plot_errors(runs, tmp_path, capsys):
    out = str(tmp_path / "x.png")
    assert "nowhere" in _refused(["plot", str(tmp_path / "nowhere"), "-o", out], tmp_path, capsys)
    (tmp_path / "norun").mkdir()
    assert "metrics.csv" in _refused(["plot", str(runs / "int8"), str(tmp_path / "norun"), "-o", out],
                                     tmp_path, capsys)
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "metrics.csv").write_text("epoch,train_loss,train_acc,eval_acc,seconds\n")
    assert "no epochs" in _refused(["plot", str(tmp_path / "fresh"), "-o", out], tmp_path, capsys)
    assert "format" in _refused(["plot", str(runs / "int8"), "-o", str(tmp_path / "x.nope")], tmp_path, capsys)
    assert "required" in _refused(["plot", str(runs / "int8")], tmp_path, capsys)


def _closed_port():
    """A loopback port with nothing listening on it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_download_without_network_fails_cleanly(tmp_path, capsys):
    url = f"http://127.0.0.1:{_closed_port()}/cifar-10-python.tar.gz"
    err = _refused(["download", "cifar10", "--data-dir", str(tmp_path / "data"), "--url", url], tmp_path, capsys)
    assert "cannot download" in err and "127.0.0.1" in err
    assert "cifar10" in _refused(["download", "imagenet"], tmp_path, capsys)
