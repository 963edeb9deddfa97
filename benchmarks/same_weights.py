"""Whether training runs ended with bit-identical state: every tensor of their checkpoints
(weights, exponents, weight-average sums) and of their saved models.

    python benchmarks/same_weights.py RUN_DIR RUN_DIR [RUN_DIR ...]

Prints one line per run against the first and exits non-zero if any differs. Used to check that
the kernel backends train identically (BENCHMARKS.md, issue 3).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from intrain.run import checkpoint


def tensors(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor inside nested dicts / lists, by its path."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    out: dict[str, torch.Tensor] = {}
    for key, value in items:
        out.update(tensors(value, f"{prefix}/{key}"))
    return out


def run_state(run_dir: Path) -> dict[str, torch.Tensor]:
    state = tensors(checkpoint.load(checkpoint.checkpoint_path(run_dir)), "checkpoint")
    state.update(tensors(torch.load(run_dir / "model.pt", weights_only=False), "model.pt"))
    return state


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR")
    args = parser.parse_args()
    if len(args.runs) < 2:
        parser.error("give at least two run directories")
    first = run_state(args.runs[0])
    same = True
    for run in args.runs[1:]:
        other = run_state(run)
        differ = sorted(k for k in first.keys() | other.keys()
                        if k not in first or k not in other or not torch.equal(first[k], other[k]))
        same &= not differ
        verdict = "identical" if not differ else f"differs in {len(differ)} tensors, e.g. {differ[0]}"
        print(f"{run} against {args.runs[0]}: {len(first)} tensors, {verdict}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
