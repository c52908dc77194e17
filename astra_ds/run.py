"""A training run from start to end, for `astra-ds train` and for Python:

    import astra_ds

    run = astra_ds.train("configs/synthetic.yaml", overrides={"train.epochs": 2, "out_dir": "runs/two_epochs"})
    run.metrics["astra_ds"]["P@1"]                  # the evaluation on the test split
    predictions = run.load().predict(["a text"], k=5)

In this order, holding the run directory's lock throughout: the trainer is built (resuming or starting from
`init_from` weights), fits (its stages, checkpoints and evaluations along the way, then the choices made on the
validation split), saves the model (encoder, table, model card, manifest) and evaluates it on the test split;
then the training state is let go (at 10^8 labels the table, its optimizer state and the training index would
not fit beside what comes next), rank 0 builds the serving index over the saved rows, and the memory used is
reported beside the plan.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from astra_ds.config import RunConfig, load_config
from astra_ds.dist import check_shared, configure_accelerator, init_distributed
from astra_ds.errors import ConfigError
from astra_ds.inference.xc_model import XCModel
from astra_ds.libraries import quiet_libraries
from astra_ds.plan import report_memory
from astra_ds.rundir.lock import RunLock
from astra_ds.rundir.run_dir import RunDir
from astra_ds.rundir.serving_index import build_serving_index
from astra_ds.training.trainer import Trainer

log = logging.getLogger("astra_ds")


@dataclass
class FinishedRun:
    run_dir: Path  # self-contained: what astra_ds.load, `astra-ds predict` and `astra-ds eval` read
    cfg: RunConfig
    step: int  # training steps behind the saved model
    metrics: dict[str, dict[str, float]] | None  # model name -> "P@1" ... -> value; None when not evaluated

    def load(self, overrides: list[str] = (), device: str | None = None) -> XCModel:
        """The finished model, ready to predict and encode (as astra_ds.load)."""
        return XCModel.load(self.run_dir, overrides, device)


def _config(config: str | Path | RunConfig | None, overrides: dict | list[str]) -> RunConfig:
    """A RunConfig from a YAML path (or None: the defaults) and overrides: {"train.epochs": 2} or
    ["train.epochs=2"]; a RunConfig given is copied (the run records its choices in its own)."""
    if isinstance(overrides, dict):
        overrides = [f"{key}={json.dumps(value if not isinstance(value, Path) else str(value))}"
                     for key, value in overrides.items()]
    if isinstance(config, RunConfig):
        if overrides:
            raise ConfigError("overrides apply to a config file; change the RunConfig itself instead")
        return copy.deepcopy(config)
    return load_config(config, list(overrides))


def train(config: str | Path | RunConfig | None = None, overrides: dict | list[str] = (), *,
          resume: str | None = None, init_from: str | None = None, evaluate: bool = True,
          progress: bool = True, overwrite: bool = False, allow_changes: bool = False) -> FinishedRun:
    """Train, save, evaluate and index a run (see the module docstring); returns the finished run. `resume`: "auto"
    or a checkpoint directory (with the settings it was trained with, but for where it writes, how far it goes
    and what it evaluates, unless `allow_changes`); `init_from`: a checkpoint whose weights start a new run;
    `overwrite`: out_dir may hold an earlier run, which is deleted (else such an out_dir is refused). Under a
    launcher, every rank calls it. User mistakes raise astra_ds.errors.UserError."""
    cfg = _config(config, overrides)
    configure_accelerator()
    quiet_libraries()
    dist = init_distributed(cfg.train.collective_timeout_s)
    run = RunDir(cfg.out_dir)
    locks = []  # taken before anything is written there
    try:
        if dist.is_main:
            locks.append(run.lock())
            if cfg.checkpoint.dir:  # two runs writing one checkpoint directory would mix their checkpoints
                locks.append(RunLock(Path(cfg.checkpoint.dir), "checkpoint.dir"))
        check_shared({"out_dir": run.path, "checkpoint.dir": Path(cfg.checkpoint.dir or run.checkpoints)}, dist.rank)
        gc.freeze()  # what exists now (libraries, the caller's objects) is left out of the collection below
        trainer = Trainer(cfg, dist, progress=progress, resume=resume, init_from=init_from, overwrite=overwrite,
                          allow_changes=allow_changes, evaluate=evaluate)
        trainer.fit()
        trainer.save_model()
        metrics = trainer.evaluate() if evaluate else None
        if metrics is not None:
            log.info("metrics written to %s", run.metrics)
        step, memory_plan, rss_anon_at_start = trainer.step, trainer.memory_plan, trainer.rss_anon_at_start
        trainer.close()
        del trainer  # the training state goes before the serving index is built (its objects hold cycles)
        gc.collect()
        if dist.is_main and cfg.eval.ann_index:
            # the card as save_model just wrote and digested it: verifying would read every model file again
            build_serving_index(run, cfg.index, cfg.train.seed, progress, run.read_card(verify=False))
        report_memory(memory_plan, run.memory, dist.is_main, rss_anon_at_start)  # the peak of the whole run
    finally:
        gc.unfreeze()
        for lock in locks:
            lock.release()
    return FinishedRun(run.path, cfg, step, metrics)
