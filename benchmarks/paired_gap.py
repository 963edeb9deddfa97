"""Two groups of finished runs compared seed by seed: the final accuracy of each, the gap, its mean
and paired standard error, and how many seeds are within a tolerance (issue 17's readings).

Each run folder holds ``config.json`` (the resolved options) and ``metrics.csv`` (one row per
epoch; ``eval_acc`` is the accuracy on the run's evaluation split). The runs of ``--runs`` are
paired with those of ``--against`` by seed; both groups must be finished (as many rows as the
config's epochs), measured on the same data (fingerprint), split (its name and sizes), model and
width, with one run per seed. The options that differ between the two groups are listed, so a
table says what it compares. The paired standard error is the sample standard deviation of the
per-seed gaps over the square root of the number of seeds. Nothing is written.

    python benchmarks/paired_gap.py --runs runs/int8-s0 runs/int8-s1 runs/int8-s2 \\
        --against runs/float-s0 runs/float-s1 runs/float-s2 --within 0.3
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from intrain.run.metrics import read_metrics

#: Settings that must be equal for two runs' accuracies to be compared.
SAME_MEASUREMENT = ("dataset", "data_fingerprint", "eval_name", "eval_size", "train_size", "val_split",
                    "tune_split", "train_limit", "model", "width")
#: Settings that name the run rather than what it trained (never listed as a difference).
NOT_A_SETTING = ("out", "data_dir", "seed", "overwrite", "torch_version", "checkpoint_every", "workers")


def refuse(message: str) -> None:
    """One line on stderr and exit 2, as intrain's own commands refuse their input."""
    print(f"paired_gap.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def final_accuracy(run: Path) -> tuple[dict, float]:
    """The run's resolved config and its last epoch's evaluation accuracy (percent)."""
    try:
        config = json.loads((run / "config.json").read_text())
        rows = read_metrics(run / "metrics.csv")
    except (OSError, ValueError, KeyError) as err:
        refuse(f"{run} is not a finished run folder ({err}): name folders that `intrain train --out` wrote")
    last = [row for row in rows if row["epoch"] == config["epochs"]]
    if not last:
        done = max((row["epoch"] for row in rows), default=0)
        refuse(f"{run} has {done} of its {config['epochs']} epochs: finish it (intrain train --resume {run}) "
               f"or leave it out")
    return config, last[-1]["eval_acc"]


def load_group(runs: list[Path], flag: str) -> dict[int, tuple[dict, float]]:
    """Each run of one group by its seed; a seed twice is refused."""
    by_seed = {}
    for run in runs:
        config, acc = final_accuracy(run)
        if config["seed"] in by_seed:
            refuse(f"{flag} has two runs of seed {config['seed']}: give one run per seed")
        by_seed[config["seed"]] = config, acc
    return by_seed


def differences(a: dict[int, tuple[dict, float]], b: dict[int, tuple[dict, float]]) -> list[str]:
    """``name: A | B`` for every setting whose value differs between the groups (``-``: a setting the
    group's method does not have; a group whose runs disagree on a setting shows each value it has)."""
    def values(group, name):
        return " / ".join(sorted({json.dumps(config[name]) if name in config else "-" for config, _ in group.values()}))

    names = sorted({n for group in (a, b) for config, _ in group.values() for n in config} - set(NOT_A_SETTING))
    return [f"{name}: {values(a, name)} | {values(b, name)}" for name in names if values(a, name) != values(b, name)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", type=Path, required=True, help="the runs measured (A)")
    parser.add_argument("--against", nargs="+", type=Path, required=True, help="the runs they are paired with (B)")
    parser.add_argument("--within", type=float, default=None, metavar="POINTS",
                        help="also count the seeds whose A is at least B - POINTS (issue 17: 0.5, 0.3; 0: at or above)")
    args = parser.parse_args(argv)
    if args.within is not None and not args.within >= 0:
        refuse(f"--within must be 0 or more points, got {args.within}")
    a, b = load_group(args.runs, "--runs"), load_group(args.against, "--against")
    if set(a) != set(b):
        refuse(f"the groups' seeds differ (--runs {sorted(a)}, --against {sorted(b)}): pair every seed")
    seeds = sorted(a)
    reference = a[seeds[0]][0]
    for config, _ in [*a.values(), *b.values()]:
        for name in SAME_MEASUREMENT:
            if config.get(name) != reference.get(name):
                refuse(f"the runs differ in {name} ({config.get(name)!r} against {reference.get(name)!r}): "
                       f"compare runs measured on the same data, split and model")

    print(f"{reference['dataset']} {reference['model']} width {reference['width']}: {reference['eval_name']} split "
          f"of {reference['eval_size']} images, final epoch")
    for line in differences(a, b) or ["(no setting differs but the seed)"]:
        print(f"  {line}")
    gaps = [a[s][1] - b[s][1] for s in seeds]
    print(f"{'seed':>6} {'A':>8} {'B':>8} {'A - B':>8}")
    for seed, gap in zip(seeds, gaps):
        print(f"{seed:>6} {a[seed][1]:8.2f} {b[seed][1]:8.2f} {gap:+8.2f}")
    n = len(seeds)
    mean_a, mean_b, mean_gap = (sum(v) / n for v in ([a[s][1] for s in seeds], [b[s][1] for s in seeds], gaps))
    print(f"{'mean':>6} {mean_a:8.2f} {mean_b:8.2f} {mean_gap:+8.2f}", end="")
    if n > 1:
        spread = math.sqrt(sum((g - mean_gap) ** 2 for g in gaps) / (n - 1))
        print(f"  (paired standard error {spread / math.sqrt(n):.2f} over {n} seeds)")
    else:
        print("  (one seed: no standard error)")
    if args.within is not None:
        # Accuracies are hundredths of a percent: compare in those units so 0.30 is within 0.3.
        kept = [s for s, g in zip(seeds, gaps) if round(g * 100) >= -round(args.within * 100)]
        print(f"A at least B - {args.within:g} on {len(kept)} of {n} seeds"
              + (f" (not on {', '.join(map(str, sorted(set(seeds) - set(kept))))})" if len(kept) < n else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
