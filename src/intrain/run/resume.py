"""Resuming a run from its ``checkpoint.pt`` (see ``intrain.run.loop`` and ``intrain.run.checkpoint``).

``resume(run_dir, given)`` continues the run with the options recorded in the checkpoint; options
given again must agree with them, except those in ``RESUME_FREE`` (which change no number a run
computes) and ``--data-dir``: the run recorded its data folder as an absolute path and a
fingerprint of the data (``intrain.run.files.data_fingerprint``), and any folder holding the same
data is accepted (runs made before fingerprints: the same number of images). The result is bit
for bit that of an uninterrupted run. The run folder is locked while the run continues.

A checkpoint is the state of the whole run, whatever number of processes wrote it, so a run
resumes under torchrun with any number of processes (``intrain.run.loop``): every process reads
the checkpoint (on several nodes the run folder must be on a file system they share), rank 0
alone checks, locks and writes the folder.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from intrain.methods.base import flag
from intrain.run import checkpoint
from intrain.run import dist
from intrain.run.config import RESUME_FREE, ConfigError, TrainConfig
from intrain.run.files import check_creatable, data_fingerprint
from intrain.run.lock import RunFolderBusy, holder
from intrain.run.loop import RunResult, Start, prepare, train_prepared


def resume_config(payload: dict, run_dir: Path, given: dict | None = None) -> TrainConfig:
    """The checkpoint's config, with the explicitly ``given`` options checked against it:
    those in ``RESUME_FREE`` replace the saved values, any other that differs is refused. The
    method's own options are given by name beside the common ones."""
    path = checkpoint.checkpoint_path(run_dir)
    try:
        saved = TrainConfig.from_dict(payload["train_config"])
        method = saved.method
    except (TypeError, ConfigError):
        raise checkpoint.CheckpointError(f"{path} holds a config this intrain does not know: "
                                         "refusing to resume from it") from None
    changes = {}
    for name, value in (given or {}).items():
        if value is None:
            continue
        if name in RESUME_FREE:
            changes[name] = value
        elif name == "overwrite":
            if value:
                raise ConfigError("--overwrite cannot be combined with --resume: a resumed run continues "
                                  "in its own directory")
        elif name == "data_dir":
            changes[name] = value  # another path to the same data is fine: resume() compares the data
        elif name == "out":
            if Path(value).resolve() != Path(run_dir).resolve():
                raise ConfigError(f"--out {value} conflicts with --resume {run_dir}: a resumed run continues "
                                  "in its own directory; leave --out out")
        elif name in saved.options or name in method.option_names():
            if value != saved.options.get(name):
                recorded = "none" if saved.options.get(name) is None else saved.options.get(name)
                raise ConfigError(f"{flag(name)} {value} conflicts with {recorded} recorded in {path}: "
                                  "leave it out when resuming (a resumed run keeps its options)")
        elif name == "options" or not hasattr(saved, name):
            raise ConfigError(f"{flag(name)} does not apply to the --arith {saved.arith} run in {run_dir}: "
                              "leave it out when resuming")
        elif value != getattr(saved, name):
            raise ConfigError(f"{flag(name)} {value} conflicts with {getattr(saved, name)} recorded in {path}: "
                              "leave it out when resuming (a resumed run keeps its options)")
    return replace(saved, out=str(run_dir), overwrite=False, **changes)


def resume(run_dir, given: dict | None = None, log=None) -> RunResult:
    """Continue the run in ``run_dir`` from ``run_dir/checkpoint.pt``. Raises CheckpointError /
    ConfigError / DataError before anything is written."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        if run_dir.exists():
            raise ConfigError(f"{run_dir} is not a directory: pass the directory of the run to resume")
        raise ConfigError(f"run directory {run_dir} does not exist: pass the directory of the run to resume")
    rank, _, _ = dist.environment()
    busy = holder(run_dir) if rank == 0 else None  # the others would find rank 0's lock
    if busy is not None:
        raise RunFolderBusy(f"run directory {run_dir} is in use by {busy}: wait for it to finish or stop it "
                            "before resuming")
    if rank == 0:
        check_creatable(run_dir, "run directory",
                        "a resumed run writes there; copy it somewhere writable and resume the copy")
    path = checkpoint.checkpoint_path(run_dir)
    payload = checkpoint.load(path)
    config = resume_config(payload, run_dir, given)
    p = prepare(config, resuming=True)
    cfg = payload["config"]
    if len(p.splits.train) != cfg.get("train_size") or len(p.splits.eval) != cfg.get("eval_size"):
        raise ConfigError(f"the {config.dataset} data now has {len(p.splits.train)} training and {len(p.splits.eval)} "
                          f"eval images, the run in {run_dir} had {cfg.get('train_size')} and {cfg.get('eval_size')}: "
                          "resume with the same data")
    if cfg.get("data_fingerprint") is not None and data_fingerprint(p.splits) != cfg["data_fingerprint"]:
        raise ConfigError(f"the {config.dataset} data in {p.config.data_dir} is not the data the run in {run_dir} was "
                          f"trained on (recorded: {cfg.get('data_dir')}; the images or labels differ): resume with "
                          "--data-dir pointing to that data")
    steps_per_epoch = -(-len(p.splits.train) // config.batch_size)
    epoch, batch, step = int(payload["epoch"]), int(payload["batch"]), int(payload["global_step"])
    if not (0 <= epoch <= config.epochs and 0 <= batch < max(steps_per_epoch, 1)
            and step == epoch * steps_per_epoch + batch and len(payload["rows"]) == epoch):
        raise checkpoint.CheckpointError(f"{path} records an impossible position (epoch {epoch}, batch {batch}, "
                                         f"step {step}): refusing to resume from it")
    checkpoint.restore_method(payload, p.model, p.method, path)
    if "out" in cfg and Path(cfg["out"]).resolve() != run_dir.resolve():
        cfg = dict(cfg, out=str(run_dir))  # the run was moved
    if cfg.get("data_dir") != p.config.data_dir:
        cfg = dict(cfg, data_dir=p.config.data_dir)  # the same data, found in another (or resolved) path
    start = Start(epoch=epoch, batch=batch, global_step=step, rows=[dict(r) for r in payload["rows"]],
                  running=payload.get("running"), seconds=float(payload.get("seconds") or 0.0))
    return train_prepared(p, log=log, start=start, cfg=cfg, out_dir=run_dir)
