"""Checkpoints written by intrain 0.1 (before the package was restructured into methods, number
formats and run modules) still resume: bit for bit for int8 on any machine, and for float32 up to
the last bits where this CPU is not the one that wrote the fixture.

``tests/fixtures/v0.1-<arith>/`` hold the run folders of two runs killed at global step 50 (of 90)
by the code of commit 29e4dd0: ``intrain train --arith int8 --weight-bits 16 --mu-schedule 0:11``
and ``--arith float``, both with ``--width 0.1 --epochs 2 --batch-size 32 --seed 3
--checkpoint-every 10`` on digits. Their checkpoints store the config as one flat dict holding
every method's options. Resumed now, each must end with the weights of an uninterrupted run; for
the int8 run also with the very weights the old code's uninterrupted run ended with (their
sha256 below; integer results do not depend on the machine).

The float32 fixture's first 50 steps ran on another CPU, and float32 matrix products sum in an
order that depends on the CPU's vector width (MKL and oneDNN pick AVX2 or AVX-512 kernels), so
resumed here its weights can differ from a run made here in the last bits: on an AMD Zen 3 (AVX2)
by at most 4.5e-8 after the 40 remaining steps, against weights up to 0.29. The float comparison
therefore allows a relative 1e-5; that a float run resumes bit for bit on one machine is
``tests/test_resume.py::test_float_twin_with_dropout_resumes_bit_identical``.
"""

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from intrain.cli import main

FIXTURES = Path(__file__).parent / "fixtures"
# The int8 run was made with --mu-schedule 0:11, which 0.1 counted in bits of the int16 master:
# 0:3 in int8 steps now (methods.update); reading the old checkpoint converts it.
OPTIONS = {"int8": ["--weight-bits", "16", "--mu-schedule", "0:3"], "float": []}
#: sha256 over (name, bytes) of every tensor of model.pt of the uninterrupted int8 run at 29e4dd0.
OLD_INT8_WEIGHTS = "5ab3e24f1f541f9c5df9928e400b3d1867928f99a846905d9b212f13e3cb4a72"


def _state(run_dir):
    return torch.load(run_dir / "model.pt", weights_only=True)["state_dict"]


def _digest(state) -> str:
    h = hashlib.sha256()
    for name, tensor in state.items():
        h.update(name.encode())
        h.update(tensor.contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("arith", ["int8", "float"])
def test_old_checkpoint_resumes_bit_identical(tmp_path, arith):
    resumed = tmp_path / "resumed"
    shutil.copytree(FIXTURES / f"v0.1-{arith}", resumed)
    assert main(["train", "--resume", str(resumed)]) == 0
    fresh = tmp_path / "fresh"
    assert main(["train", "--arith", arith, "--width", "0.1", "--epochs", "2", "--batch-size", "32", "--seed", "3",
                 "--out", str(fresh), *OPTIONS[arith]]) == 0
    a, b = _state(resumed), _state(fresh)
    assert a.keys() == b.keys()
    if arith == "int8":
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert _digest(a) == OLD_INT8_WEIGHTS
    else:
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_old_checkpoint_refuses_another_methods_option(tmp_path, capsys):
    resumed = tmp_path / "resumed"
    shutil.copytree(FIXTURES / "v0.1-int8", resumed)
    assert main(["train", "--resume", str(resumed), "--clip-grad-norm", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--clip-grad-norm does not apply to the --arith int8 run" in err
    # the twin update's learning rate and weight decay: that run (NITI's update) had neither
    for option in ("--lr", "--weight-decay"):
        assert main(["train", "--resume", str(resumed), option, "0.1"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{option} 0.1 conflicts with none recorded" in err
