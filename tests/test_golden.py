"""Golden tests: short training runs must reproduce ``tests/golden/golden.json``.

Every job of ``tests/golden/make_golden.py`` (``GOLDEN_JOBS``) is run again through
``intrain.cli.main`` and compared with its pinned entry (see that script's docstring for what is
pinned). int8 jobs must match bit for bit: every integer tensor of ``model.pt`` and
``checkpoint.pt`` (weights, exponents, int16 masters, weight-average sums), the ``metrics.csv``
rows as written and the printed ``eval_acc=`` line. Float-twin jobs, whose last bits depend on the
CPU's kernels, must match within tolerances. The resumed job and the reference-kernel job are
compared with the plain int8 job's entry: resuming and the choice of kernels change no bit.

A failure after a refactoring means the refactoring changed behaviour. Regenerate golden.json
only for an intended change of behaviour, as that script's header says.
"""

from __future__ import annotations

import json
import math

import pytest

from golden.make_golden import GOLDEN_JOBS, GOLDEN_PATH, input_fingerprints, run_job, write_mnist_format

GOLDEN = json.loads(GOLDEN_PATH.read_text())

#: Float tensors: sums, sums of absolute values and first values may differ by this fraction of
#: the tensor's sum of absolute values (first values: of its mean absolute value). Measured
#: differences between kernels (oneDNN on or off, 1 or 2 threads) and after 1-ulp changes of the
#: initial weights stay below 1e-6 of it.
FLOAT_TENSOR_RTOL = 1e-4
#: Float runs' metrics: accuracies (percent) within 0.5 points, losses within 0.1 %.
FLOAT_ACCURACY_ATOL = 0.5
FLOAT_LOSS_RTOL = 1e-3


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory):
    return write_mnist_format(tmp_path_factory.mktemp("mnist-format"))


def _float_tensor_differences(golden: dict, actual: dict, where: str) -> list[str]:
    if (golden["dtype"], golden["shape"]) != (actual["dtype"], actual["shape"]):
        return [f"{where}: golden {golden['dtype']} {golden['shape']}, got {actual['dtype']} {actual['shape']}"]
    scale = golden["abs_sum"]
    mean_abs = scale / max(1, math.prod(golden["shape"]))
    close = [math.isclose(actual["sum"], golden["sum"], rel_tol=0, abs_tol=FLOAT_TENSOR_RTOL * scale),
             math.isclose(actual["abs_sum"], scale, rel_tol=0, abs_tol=FLOAT_TENSOR_RTOL * scale),
             len(actual["first_values"]) == len(golden["first_values"]) and all(
                 math.isclose(a, g, rel_tol=0, abs_tol=FLOAT_TENSOR_RTOL * mean_abs)
                 for a, g in zip(actual["first_values"], golden["first_values"]))]
    if all(close):
        return []
    return [f"{where}: beyond the float tolerance: golden sum {golden['sum']!r}, abs_sum {scale!r}, "
            f"first values {golden['first_values']}; got sum {actual['sum']!r}, abs_sum {actual['abs_sum']!r}, "
            f"first values {actual['first_values']}"]


def _float_strings_close(key: str, golden: str, actual: str) -> bool:
    """A float run's metric (``train_loss``, ``*_acc``) or printed ``eval_acc=NN.NN`` line, within
    the tolerances; other strings exactly."""
    if key == "last_line":
        (g_name, _, g_value), (a_name, _, a_value) = golden.partition("="), actual.partition("=")
        return g_name == a_name and _float_strings_close(g_name, g_value, a_value)
    if key.endswith("_acc"):
        return math.isclose(float(actual), float(golden), rel_tol=0, abs_tol=FLOAT_ACCURACY_ATOL)
    if key.endswith("_loss"):
        return math.isclose(float(actual), float(golden), rel_tol=FLOAT_LOSS_RTOL)
    return actual == golden


def differences(golden, actual, where: str, float_run: bool) -> list[str]:
    """Where ``actual`` (a job's record, or part of it at ``where``) differs from ``golden``, one
    line each; exact, except for a float run's float tensors, accuracies, losses and printed line."""
    if isinstance(golden, dict) and isinstance(actual, dict):
        if float_run and "abs_sum" in golden and "abs_sum" in actual:
            return _float_tensor_differences(golden, actual, where)
        found = [f"{where or 'record'}: {key!r} missing" for key in golden if key not in actual]
        found += [f"{where or 'record'}: {key!r} not in golden.json" for key in actual if key not in golden]
        for key in golden:
            if key in actual:
                inner = f"{where} / {key}" if where else key
                if float_run and isinstance(golden[key], str) and isinstance(actual[key], str):
                    if not _float_strings_close(key, golden[key], actual[key]):
                        found.append(f"{inner}: golden {golden[key]!r}, got {actual[key]!r}")
                else:
                    found += differences(golden[key], actual[key], inner, float_run)
        return found
    if isinstance(golden, list) and isinstance(actual, list) and len(golden) == len(actual):
        return [line for i, (g, a) in enumerate(zip(golden, actual))
                for line in differences(g, a, f"{where} / {i}", float_run)]
    return [] if golden == actual else [f"{where}: golden {golden!r}, got {actual!r}"]


def test_inputs_are_unchanged():
    assert input_fingerprints() == GOLDEN["inputs"], (
        "the data the golden jobs train on changed (scikit-learn's digits or the generated MNIST-format "
        "set), so golden.json cannot be compared: the change is outside intrain's training code")


def test_every_golden_entry_belongs_to_a_job():
    assert sorted(GOLDEN["jobs"]) == sorted(job.name for job in GOLDEN_JOBS if job.same_as is None)


@pytest.mark.parametrize("job", GOLDEN_JOBS, ids=lambda job: job.name)
def test_job_reproduces_golden(job, tmp_path, mnist_dir):
    entry_name = job.same_as or job.name
    entry = GOLDEN["jobs"][entry_name]
    if job.same_as is None:
        assert entry["args"] == list(job.args), f"{job.name}: its options differ from golden.json's"
    found = differences(entry["result"], run_job(job, tmp_path, mnist_dir), "", job.is_float)
    pinned = "" if job.same_as is None else f" (pinned to {entry_name})"
    assert not found, f"job {job.name}{pinned} differs from golden.json:\n  " + "\n  ".join(found)
