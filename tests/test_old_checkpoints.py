"""Checkpoints written by intrain 0.1 (before the package was restructured into methods, number
formats and run modules) still resume, bit for bit.

``tests/fixtures/v0.1-<arith>/`` hold the run folders of two runs killed at global step 50 (of 90)
by the code of commit 29e4dd0: ``intrain train --arith int8 --weight-bits 16 --mu-schedule 0:11``
and ``--arith float``, both with ``--width 0.1 --epochs 2 --batch-size 32 --seed 3
--checkpoint-every 10`` on digits. Their checkpoints store the config as one flat dict holding
every method's options. Resumed now, each must end with the weights of an uninterrupted run; for
the int8 run also with the very weights the old code's uninterrupted run ended with (their
sha256 below; integer results do not depend on the machine).
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
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if arith == "int8":
        assert _digest(a) == OLD_INT8_WEIGHTS


def test_old_checkpoint_refuses_another_methods_option(tmp_path, capsys):
    resumed = tmp_path / "resumed"
    shutil.copytree(FIXTURES / "v0.1-int8", resumed)
    assert main(["train", "--resume", str(resumed), "--lr", "0.1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--lr does not apply to the --arith int8 run" in err
