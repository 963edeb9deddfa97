"""The benchmark scripts the figures of BENCHMARKS.md come from still run (tiny sizes, one
repeat): a script that rots silently would leave numbers nobody can reproduce. Timings are not
checked here (they are never tested, only printed)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def script(*argv: str) -> subprocess.CompletedProcess:
    """``benchmarks/argv[0]`` run with the rest of ``argv``, one thread."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / argv[0]), *argv[1:]], capture_output=True,
                          text=True, timeout=600, env=env, cwd=ROOT)


def run_script(*argv: str) -> str:
    done = script(*argv)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def refusal(*argv: str) -> str:
    """The one-line error of a benchmark script that must refuse its input (exit 2)."""
    done = script(*argv)
    assert done.returncode == 2, done.stderr[-2000:]
    return done.stderr


def single_batch_rows(out: str) -> tuple[str, list[list[str]]]:
    """The column header and the split rows of the "single batches (mean)" table of a gradient
    comparison's output."""
    lines = out.splitlines()
    header = lines.index("single batches (mean)")
    return lines[header + 1], [line.split() for line in lines[header + 2:lines.index("gradient summed over the batches") - 1]]


@pytest.mark.parametrize("arith", ["int8", "dfp16"])
def test_speed_script_runs_for_each_method(arith):
    out = run_script("speed.py", "--model", "mlp", "--batch", "4", "--repeats", "1", "--arith", arith)
    assert f"training step  {arith:>5s}" in out and "peak memory" in out and "ratio" in out


def test_speed_script_times_the_int8_options_of_a_recipe():
    out = run_script("speed.py", "--model", "mlp", "--batch", "4", "--repeats", "1", "--weight-bits", "16",
                     "--error-rounding", "stochastic", "--weight-decay-shift", "18")
    assert "int8 (weight-bits 16, error-rounding stochastic, weight-decay-shift 18)" in out
    assert "training step   int8" in out
    out = run_script("speed.py", "--model", "mlp", "--batch", "4", "--repeats", "1", "--update", "sgd",
                     "--error-rounding", "stochastic", "--relu-scale", "positive", "--activation-rounding", "stochastic")
    assert "int8 (update sgd, error-rounding stochastic, relu-scale positive, activation-rounding stochastic)" in out
    assert "training step   int8" in out
    assert "apply to --arith int8 only" in refusal("speed.py", "--arith", "dfp16", "--activation-rounding", "stochastic")


def test_speed_script_times_dfp16_with_either_optimiser():
    out = run_script("speed.py", "--model", "mlp", "--batch", "4", "--repeats", "1", "--arith", "dfp16",
                     "--optimizer", "adamw")
    assert "dfp16 (int32 masters, adamw)" in out and "training step  dfp16" in out
    assert "--optimizer applies to --arith dfp16 only" in refusal("speed.py", "--optimizer", "adamw")


def test_native_threads_script_checks_the_same_bits():
    from intrain.numeric import native
    if not native.available():
        pytest.skip("no C compiler here: the script refuses, as it says")
    out = run_script("native_threads.py", "--sizes", "64", "--calls", "1")
    for kernel in ("max |a|, int64", "nearest int64 -> int16", "NITI update int32 -> int8", "2x2 max pool int8",
                   "int16 product from halves"):
        assert kernel in out


def test_halves_speed_script_compares_the_same_bits():
    from intrain.numeric import native
    if not native.available():
        pytest.skip("no C compiler here: the script refuses, as it says")
    out = run_script("halves_speed.py", "--samples", "1", "--rounds", "1")
    assert "512 x  8 x  8" in out and out.count("x |") == 6


def test_bn_statistics_script_rebuilds_running_statistics(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "intrain", "train", "--dataset", "digits", "--model", "resnet18",
                           "--width", "0.125", "--epochs", "1", "--out", str(run)], capture_output=True, text=True,
                          timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    out = run_script("bn_statistics.py", "--run", str(run), "--shifts", "1,2", "--repeats", "2")
    saved = float(out.split("saved running statistics")[1].split("%")[0])
    assert saved == float(done.stdout.strip().splitlines()[-1].split("=")[1])  # the run's own eval figure
    # model.pt holds the statistics the loop rebuilt; rebuilding them again gives the same figure
    assert float(out.split("rebuilt as the training loop does")[1].split("%")[0]) == saved
    for shift in (1, 2):
        assert f"shift {shift} (window ~" in out and "spread" in out


def test_cpu_tuning_script_measures_a_constant():
    """The tuning script replays a recorded step's products under each value of a constant (it
    once broke silently when product_to_int8 grew an argument)."""
    out = run_script("cpu_tuning.py", "--only", "direct_conv_max_columns", "--model", "lenet5", "--repeats", "1",
                     "--min-seconds", "0", "--steps-before", "0")
    assert "== direct_conv_max_columns = 32" in out
    assert "lenet5 conv 1->6 28x28 forward" in out and "lenet5 peak memory" in out


def test_gradient_fidelity_script_compares_every_variant(tmp_path):
    from intrain.cli import main
    run = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--out", str(run)]) == 0  # int8 MLP on digits: two ReLUs
    out = run_script("gradient_fidelity.py", "--run", str(run), "--batches", "2", "--batch-size", "8")
    for variant in ("int8 nearest", "int8 stochastic", "int8 stoch., ReLU +", "DFP16 int32-chunked"):
        assert variant in out
    assert out.count("units the reference passes that are zero in int8") == 2


def test_forward_precision_script_scores_the_run_and_its_16_bit_copies(tmp_path):
    from intrain.cli import main
    from intrain.run.evaluate import evaluate_run
    run = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--update", "sgd", "--out", str(run)]) == 0  # int32 masters
    out = run_script("forward_precision.py", "--run", str(run))
    rows = {line[:52].strip(): line[52:].strip() for line in out.splitlines()[1:]}
    assert rows["int8 weights, 8-bit activations (the run's model)"] == f"{evaluate_run(run, write=False)['accuracy']:.2f} %"
    for name in ("int8 weights, 16-bit activations", "int32 masters at 16 bits, 16-bit activations"):
        assert rows[name].endswith(" %")


@pytest.mark.parametrize("arith", ["int8", "dfp16"])
def test_float_gradients_script_matches_float64_at_16_bits(tmp_path, arith):
    from intrain.cli import main
    run = tmp_path / "run"
    biases = ["--biases", "off"] if arith == "dfp16" else []  # the float network it is paired with has none
    assert main(["train", "--epochs", "1", "--arith", arith, *biases, "--out", str(run)]) == 0  # MLP on digits
    columns, rows = single_batch_rows(run_script("float_gradients.py", "--run", str(run), "--batches", "3",
                                                 "--batch-size", "16"))
    assert f"the run's ({8 if arith == 'int8' else 16}-bit)" in columns
    assert len(rows) == 3  # the MLP's three weighted layers
    for row in rows:  # layer, own cos / proj, 16-bit exact cos / proj
        own_cos, exact_cos, exact_proj = float(row[1]), float(row[4]), float(row[6])
        assert 0.9 < own_cos <= 1.0 and exact_cos > 0.999 and abs(exact_proj - 1) < 0.01


def test_float_gradients_script_takes_dropout_only_when_told_to_turn_it_off(tmp_path):
    from intrain.cli import main
    run = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--model", "vgg-small-7", "--width", "0.0625", "--out", str(run)]) == 0
    assert "add --no-dropout" in refusal("float_gradients.py", "--run", str(run))
    _, rows = single_batch_rows(run_script("float_gradients.py", "--run", str(run), "--batches", "2",
                                           "--batch-size", "8", "--no-dropout"))
    assert len(rows) == 7  # six convolutions and the classifier
    for row in rows:  # with dropout off in every copy, the 16-bit exact gradients are float64's
        assert float(row[4]) > 0.999 and abs(float(row[6]) - 1) < 0.01


def test_forward_precision_and_float_gradients_scripts_refuse_a_float_run(tmp_path):
    from intrain.cli import main
    run = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--arith", "float", "--out", str(run)]) == 0
    assert "is a float run; give an int8 run" in refusal("forward_precision.py", "--run", str(run))
    assert "is a float run; give an int8 or DFP16 run" in refusal("float_gradients.py", "--run", str(run))


def test_speed_script_times_integer_biases_and_the_gradient_scripts_refuse_them(tmp_path):
    out = run_script("speed.py", "--model", "mlp", "--batch", "4", "--repeats", "1", "--update", "sgd",
                     "--biases", "on")
    assert "int8 (update sgd, biases on)" in out and "training step   int8" in out
    out = run_script("speed.py", "--model", "mlp", "--batch", "4", "--repeats", "1", "--arith", "dfp16", "--biases", "on")
    assert "dfp16 (int32 masters, sgd, biases)" in out
    assert "--biases on needs --update sgd or adamw" in refusal("speed.py", "--biases", "on")
    from intrain.cli import main
    run = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--update", "sgd", "--biases", "on", "--out", str(run)]) == 0
    for name in ("forward_precision.py", "float_gradients.py", "gradient_fidelity.py"):
        assert "trained with --biases on" in refusal(name, "--run", str(run))


def test_epoch_average_script_gives_the_figures_of_the_last_epochs_option(tmp_path):
    """The script's mean of the last epochs' masters is what ``--weight-average last:N`` evaluates."""
    job = ["--update", "sgd", "--lr", "0.1", "--epochs", "3", "--train-limit", "96", "--batch-size", "32"]
    snap, run = str(tmp_path / "snap"), str(tmp_path / "run")
    trained = run_script("epoch_average.py", "train", "--snapshots", snap, "--", *job, "--out", run)
    latest = trained.strip().splitlines()[-1].split("=")[1] + "%"  # intrain train's own last line
    out = run_script("epoch_average.py", "evaluate", "--run", run, "--snapshots", snap, "--from", "3", "2")
    figures = [line.split(": ")[1] for line in out.splitlines() if line.startswith("mean of the weights")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    product = subprocess.run([sys.executable, "-m", "intrain", "train", *job, "--weight-average", "last:2", "--out",
                              str(tmp_path / "last2")], capture_output=True, text=True, timeout=600, env=env,
                             cwd=tmp_path)
    assert product.returncode == 0, product.stderr[-2000:]
    assert figures == [latest, product.stdout.strip().splitlines()[-1].split("=")[1] + "%"]
    assert "exists: name a new folder" in refusal("epoch_average.py", "train", "--snapshots", snap, "--", *job)
    assert "needs an int8 run with --update sgd or adamw" in refusal(
        "epoch_average.py", "train", "--snapshots", str(tmp_path / "niti"), "--", "--epochs", "1", "--out",
        str(tmp_path / "niti-run"))
    assert not (tmp_path / "niti").exists() and not (tmp_path / "niti-run").exists()
    assert "outside the run's epochs 1..3" in refusal("epoch_average.py", "evaluate", "--run", run, "--snapshots",
                                                      snap, "--from", "4")


def _finished_run(folder: Path, seed: int, accuracies: list[float], **settings) -> Path:
    """A run folder as ``intrain train`` leaves it: config.json and one metrics row per epoch."""
    folder.mkdir(parents=True)
    config = {"dataset": "fashion-mnist", "data_fingerprint": "f", "eval_name": "validation", "eval_size": 10000,
              "train_size": 50000, "val_split": 10000, "tune_split": None, "train_limit": None,
              "model": "vgg-small-7", "width": 0.25, "seed": seed, "epochs": len(accuracies), "out": str(folder),
              **settings}
    (folder / "config.json").write_text(json.dumps(config))
    rows = "".join(f"{i + 1},0.5,90.0,{acc:.4f},1.0\n" for i, acc in enumerate(accuracies))
    (folder / "metrics.csv").write_text("epoch,train_loss,train_acc,eval_acc,seconds\n" + rows)
    return folder


def test_paired_gap_pairs_runs_by_seed_and_counts_the_seeds_within_the_tolerance(tmp_path):
    """The table of issue 17's readings: the final epoch's accuracy, gaps, their mean and paired
    standard error (-0.09 / -0.41 / -0.30 / +0.12: mean -0.17, sample sd 0.23, error 0.12), the
    seeds within 0.3 (a gap of exactly -0.30 counts), the settings that differ."""
    a = [_finished_run(tmp_path / f"int8-{s}", s, [50.0, acc], arith="int8", batch_size=128, biases="on")
         for s, acc in zip((3, 0, 1, 2), (93.87, 93.68, 93.57, 93.49))]
    b = [_finished_run(tmp_path / f"float-{s}", s, [50.0, 50.0, acc], arith="float", batch_size=64)
         for s, acc in zip((0, 1, 2, 3), (93.77, 93.98, 93.79, 93.75))]
    out = run_script("paired_gap.py", "--runs", *map(str, a), "--against", *map(str, b), "--within", "0.3")
    rows = [line.split() for line in out.splitlines() if line.split() and line.split()[0] in "0123"]
    assert rows == [["0", "93.68", "93.77", "-0.09"], ["1", "93.57", "93.98", "-0.41"],
                    ["2", "93.49", "93.79", "-0.30"], ["3", "93.87", "93.75", "+0.12"]]
    assert "mean    93.65    93.82    -0.17  (paired standard error 0.12 over 4 seeds)" in out
    assert "A at least B - 0.3 on 3 of 4 seeds (not on 1)" in out
    assert '  arith: "int8" | "float"' in out and '  batch_size: 128 | 64' in out and '  biases: "on" | -' in out
    assert "epochs: 2 | 3" in out and "seed:" not in out and "out:" not in out


def test_paired_gap_refuses_runs_it_cannot_compare(tmp_path):
    done = [_finished_run(tmp_path / f"a{s}", s, [90.0, 91.0], arith="int8") for s in (0, 1)]
    unfinished = _finished_run(tmp_path / "b0", 0, [90.0], arith="float")
    saved = unfinished / "config.json"
    saved.write_text(saved.read_text().replace('"epochs": 1', '"epochs": 3'))
    other_split = _finished_run(tmp_path / "b1", 1, [90.0], arith="float", eval_name="tuning")
    twice = _finished_run(tmp_path / "a0-again", 0, [90.0], arith="int8")
    b0 = _finished_run(tmp_path / "b0-done", 0, [90.0], arith="float")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert "has 1 of its 3 epochs: finish it (intrain train --resume" in refusal(
        "paired_gap.py", "--runs", str(done[0]), "--against", str(unfinished))
    assert "differ in eval_name ('tuning' against 'validation')" in refusal(
        "paired_gap.py", "--runs", *map(str, done), "--against", str(b0), str(other_split))
    assert "the groups' seeds differ (--runs [0, 1], --against [0])" in refusal(
        "paired_gap.py", "--runs", *map(str, done), "--against", str(b0))
    assert "--runs has two runs of seed 0" in refusal("paired_gap.py", "--runs", str(done[0]), str(twice),
                                                      "--against", str(b0))
    assert "is not a finished run folder" in refusal("paired_gap.py", "--runs", str(tmp_path / "none"),
                                                     "--against", str(b0))
    assert "--within must be 0 or more" in refusal("paired_gap.py", "--runs", str(done[0]), "--against", str(b0),
                                                   "--within", "-1")
    assert before == {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
