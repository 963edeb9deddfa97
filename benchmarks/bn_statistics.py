"""How much a trained network's evaluation accuracy depends on the running statistics of its integer
batch normalisation, by their averaging window: the evidence for ``layers.norm.MOMENTUM_SHIFT``.

For each momentum shift ``s`` and each of ``--repeats`` independent draws, the running statistics
of the saved model are rebuilt from nothing by training-mode forward passes (the saved weights, no
update) over ``4 * 2**s`` batches of the run's training images in a random order (the draw's),
and the model is evaluated on the eval split with them. The spread of the draws' accuracies is
how much a run's figure depends on which batches happened to come last before it was evaluated.
(The training loop rebuilds them the same way before every evaluation, at momentum 1/8 from 32
batches of the epoch's order: ``run.loop.latest_statistics``.) Also printed: the statistics saved
in ``model.pt``, those the training loop's rebuilding gives, and each batch's own statistics
(what training saw; a prediction then depends on the rest of its batch). Nothing is written.

    OMP_NUM_THREADS=2 python benchmarks/bn_statistics.py --run RUN_DIR
    OMP_NUM_THREADS=2 python benchmarks/bn_statistics.py --run RUN_DIR --val-split 10000 --shifts 3,6

``--val-split N`` evaluates on the last N training images (for a run that trained on all of them:
images it has seen, but no test image is looked at). Only data sets held in memory (MNIST,
Fashion-MNIST, CIFAR-10, digits).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from types import SimpleNamespace

import torch

from intrain.data.dataset import ImageDataset
from intrain.layers import StepContext
from intrain.layers.norm import norm_layers, rebuild_running_statistics
from intrain.run.evaluate import load_run
from intrain.run.loop import latest_statistics, network_input, predictions
from intrain.run.metrics import accuracy as percent


def accuracy(run, model) -> float:
    model.eval()
    preds = predictions(model, run.method, run.splits.eval, run.mean, run.batch_size, run.device)
    return percent(int((preds.cpu() == run.splits.eval.labels.cpu()).sum()), len(run.splits.eval))


def rebuild_statistics(run, model, shift: int, draw: int) -> None:
    """Running statistics from ``4 * 2**shift`` training batches of one random order, as the
    training loop rebuilds them before evaluating (``layers.norm.rebuild_running_statistics``)."""
    for layer in norm_layers(model):
        layer.momentum_shift = shift
    train = run.splits.train
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(draw))
    batches = (order[(i * run.batch_size) % len(train):][:run.batch_size] for i in range(4 << shift))
    inputs = (network_input(run.method, train.images[rows].to(run.device), run.mean) for rows in batches)
    rebuild_running_statistics(model, inputs, StepContext(0, 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run directory (model.pt of an int8 model with batch normalisation)")
    parser.add_argument("--val-split", type=int, default=None, help="evaluate on the last N training images")
    parser.add_argument("--shifts", default="3,4,5,6,7", help="momentum shifts to compare (default: 3,4,5,6,7)")
    parser.add_argument("--repeats", type=int, default=4, help="random orders per shift (default: 4)")
    args = parser.parse_args()
    run = load_run(Path(args.run), val_split=args.val_split)
    if not norm_layers(run.model):
        parser.error(f"the model of {args.run} has no integer batch normalisation")
    if not isinstance(run.splits.train, ImageDataset):
        parser.error("only data sets held in memory (mnist, fashion-mnist, cifar10, digits)")
    saved = {k: v.clone() for k, v in run.model.state_dict().items()}
    print(f"{args.run}: {run.config['model']} on {run.config['dataset']}, evaluated on {run.splits.eval_name} "
          f"({len(run.splits.eval)} images), batch {run.batch_size}, {torch.get_num_threads()} threads")
    print(f"  saved running statistics             {accuracy(run, run.model):6.2f} %")
    cfg, method_shim = run.config, SimpleNamespace(model=run.model, network_input=run.method.network_input)
    last_epoch = max(int(cfg["epochs"]) - 1, 0)
    with latest_statistics(method_shim, run.splits.train, run.mean, run.batch_size, int(cfg["seed"]), last_epoch,
                           bool(cfg.get("augment")), run.device, run.workers):
        print(f"  rebuilt as the training loop does    {accuracy(run, run.model):6.2f} %   (the run's seed, epoch "
              f"{last_epoch + 1}'s order; what a run evaluates and saves since the twelfth session)")
    for layer in norm_layers(run.model):
        layer.batches_tracked.zero_()  # a layer that never trained normalises by the batch's own statistics
    print(f"  each batch's own statistics          {accuracy(run, run.model):6.2f} %")
    for shift in (int(s) for s in args.shifts.split(",")):
        accs = []
        for draw in range(args.repeats):
            run.model.load_state_dict(saved)
            rebuild_statistics(run, run.model, shift, draw)
            accs.append(accuracy(run, run.model))
        spread = max(accs) - min(accs)
        print(f"  shift {shift} (window ~{2 << shift:4d} batches): " + " ".join(f"{a:6.2f}" for a in accs)
              + f"   mean {statistics.mean(accs):6.2f}  spread {spread:5.2f}", flush=True)


if __name__ == "__main__":
    main()
