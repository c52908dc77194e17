"""Where a run starts, resolved once before anything is built: from scratch, resumed from a checkpoint
(`--resume auto|PATH`: its full state, on the same data, with the settings it was trained with), or from the
weights of a checkpoint or of a finished run (`--init-from`). Also what the run directory says about it: an
earlier run there is refused unless `--overwrite` deletes it, and a run begun with `--init-from` records it, so
that `--resume auto` before its first checkpoint starts from it again.

A start never replaces a published model silently: `--resume auto` with no checkpoint of a finished run to resume
(deleted, or on a volume not mounted) is refused, as is resuming a checkpoint older than a `labels` change of the
published model; replacing a model is `--overwrite`'s job. Each run has an id (run.json), which its checkpoints
carry: runs sharing a checkpoint.dir one after another resume and prune only their own.

The rules of a start live here; the checkpoint manager finds and verifies checkpoints, build.py builds the parts
from the start it is given, from_run.py reads a finished run's encoder and rows.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from astra_ds.choices import STAGES
from astra_ds.config import RunConfig
from astra_ds.digests import listed
from astra_ds.errors import CheckpointError, ConfigError, UserError
from astra_ds.files import write_atomically
from astra_ds.rundir.run_dir import RunDir

if TYPE_CHECKING:
    from astra_ds.training.checkpoint import CheckpointManager

log = logging.getLogger("astra_ds")

# Settings a resumed run may change: where it writes, how far it goes (a finished run extended by more epochs or
# stages continues as one trained so from the start), what it logs and evaluates at the end. Any other change
# alters the steps still to come, and the resumed run would no longer equal an uninterrupted one.
RESUMABLE_CHANGES = ("out_dir", "data.path", "data.cache_dir", "train.epochs", "train.max_steps", "siamese.epochs",
                     "classifier.epochs", "classifier.refit_epochs", "train.log_every", "train.collective_timeout_s",
                     "train.record_batches", "checkpoint.", "eval.ks", "eval.batch_size", "eval.label_block",
                     "eval.psp", "eval.ann_index", "eval.label_text_weight", "eval.neighbour")


def check_start_options(resume: str | None, init_from: str | None) -> None:
    """The start options on their own, before anything loads: one of them at most, naming paths that exist."""
    if resume and init_from:
        raise ConfigError("--resume continues a run, --init-from starts a new one from its weights: pick one")
    for option, path in (("--resume", resume), ("--init-from", init_from)):
        if path and path != "auto" and not Path(path).is_dir():
            raise UserError(f"{option}: no {'checkpoint' if option == '--resume' else 'run or checkpoint'} at {path}")


@dataclass
class Start:
    checkpoint: tuple[Path, dict] | None  # (path, meta) of the checkpoint resumed or whose weights start the run
    resumed: bool  # the checkpoint is resumed with its full state (else only its weights are taken)
    init_from: str | None  # --init-from of a new run (a checkpoint or a finished run), recorded in the run
    from_run: RunDir | None  # --init-from a finished run: its encoder, rows and their optimizer state
    earlier_run: bool  # out_dir holds an earlier run, which --overwrite deletes
    replaced: list[Path]  # the earlier run's checkpoints, deleted with it

    @property
    def resume_path(self) -> Path | None:
        return self.checkpoint[0] if self.resumed else None

    @property
    def resumed_step(self) -> int | None:
        return self.checkpoint[1]["step"] if self.resumed else None

    def prepare(self, run: RunDir, checkpoints: CheckpointManager, cfg: RunConfig, ds_config: dict) -> None:
        """Rank 0, once everything is built and loaded (a failed resume changes nothing): the run directory is
        withdrawn (not a finished run again until its model is saved), an earlier run deleted (its checkpoints, not
        those of other runs sharing checkpoint.dir), and the configs, the run's id and the start written."""
        run.path.mkdir(parents=True, exist_ok=True)
        run.withdraw()
        if self.earlier_run:
            for path in run.path.iterdir():  # the lock stays, and checkpoints other than the earlier run's
                if path not in (run.lock_file, checkpoints.dir):
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
            checkpoints.discard(self.replaced)
            log.warning("--overwrite: deleted the earlier run in %s", run)
        run.write_run_id(checkpoints.run_id)
        write_atomically(run.config, cfg.with_absolute_paths().to_yaml())
        write_atomically(run.ds_config, json.dumps(ds_config, indent=2))
        if self.init_from and not self.resumed:
            write_atomically(run.init_from, json.dumps({"init_from": str(Path(self.init_from).resolve())}))


def resolve_start(run: RunDir, checkpoints: CheckpointManager, resume: str | None, init_from: str | None,
                  overwrite: bool) -> Start:
    """`resume`: "auto" (the newest checkpoint of this run that verifies; none: the run starts as it began) or a
    checkpoint directory; `init_from`: a checkpoint or a finished run; `overwrite`: an earlier run in out_dir may be
    deleted (else refused)."""
    check_start_options(resume, init_from)
    earlier_run = not resume and run.has_run()
    if earlier_run and not overwrite:
        raise UserError(f"out_dir {run} holds an earlier run: continue it with --resume auto, replace it with "
                        "--overwrite, or choose another out_dir")
    checkpoint = checkpoints.start_point(resume, None) if resume else None
    if resume == "auto" and checkpoint is None and run.manifest.is_file():
        raise UserError(f"out_dir {run} holds a finished model, but {checkpoints.dir} no checkpoint of it to resume "
                        "(deleted, or on a volume not mounted?): `--resume auto` would train a new model in its "
                        "place; pass --overwrite instead of --resume to do that")
    if resume == "auto" and checkpoint is None:  # a run begun with --init-from starts from it again
        init_from = _recorded_init_from(run)
        log.info("no checkpoint in %s yet: starting from %s", checkpoints.dir,
                 f"{init_from} again, as this run began" if init_from else "scratch")
    if checkpoint is not None and checkpoint[1].get("stage") not in STAGES.names:
        raise CheckpointError(f"checkpoint {checkpoint[0]} was written in a stage named {checkpoint[1]['stage']!r}, "
                              f"which this version does not have (stages: {', '.join(STAGES.names)})")
    resumed = checkpoint is not None
    replaced = checkpoints.own_checkpoints() if earlier_run else []
    if resumed:
        _check_no_labels_change_since(run, *checkpoint)
        checkpoints.run_id = checkpoint[1].get("run_id")  # --resume PATH: the run of that checkpoint goes on
    elif checkpoints.run_id is None or earlier_run:
        checkpoints.run_id = checkpoints.new_run_id()
    others = [path.name for path in checkpoints.all_checkpoints()
              if path not in replaced and not checkpoints.belongs(path)]
    if others:
        raise UserError(f"{checkpoints.dir} holds checkpoints of another run ({listed(others)}): a run writes into "
                        "a checkpoint.dir of its own, or the two runs' checkpoints would mix; choose another")
    from_run = RunDir(init_from) if init_from and _is_run_dir(Path(init_from), checkpoints) else None
    if init_from and not from_run:
        checkpoint = checkpoints.start_point(None, init_from)
    return Start(checkpoint, resumed, init_from, from_run, earlier_run, replaced)


def _check_no_labels_change_since(run: RunDir, path: Path, meta: dict) -> None:
    """A checkpoint holds the labels the run trained on; a published model that `astra-ds labels` changed since
    has others, which resuming (or `finalize`) would replace with the checkpoint's."""
    if run.labels_change.is_file():
        raise UserError(f"a labels change of {run} is under way or was interrupted: `astra-ds labels finish "
                        f"--run-dir {run}` finishes it first")
    if not run.manifest.is_file() or not run.model_card.is_file():
        return
    card, retired = run.read_card(verify=False), len(run.read_retired())
    labels = card.num_labels
    if (card.row_scales and labels != meta["num_labels"]) or retired:  # row_scales: `labels add` was there
        raise UserError(f"the model in {run} was changed by `astra-ds labels` after checkpoint {path.name} "
                        f"({labels} labels, {retired} retired, against the checkpoint's {meta['num_labels']}): "
                        "resuming would publish the checkpoint's labels and lose the change; train on from the "
                        f"changed model in a new out_dir with --init-from {run}")


def _recorded_init_from(run: RunDir) -> str | None:
    """The --init-from this run began with (init_from.json), or None."""
    return json.loads(run.init_from.read_text())["init_from"] if run.init_from.is_file() else None


def _is_run_dir(path: Path, checkpoints: CheckpointManager) -> bool:
    """A run directory (finished or not), as opposed to a checkpoint."""
    return RunDir(path).has_run() and not checkpoints.is_checkpoint(path)


def check_resumable(meta: dict, path: Path, cfg: RunConfig, data_fingerprint: str, allow_changes: bool) -> None:
    """A checkpoint resumes on the data it was trained on, and with its settings but RESUMABLE_CHANGES (others
    refused in one line unless `allow_changes`; every change is logged, a setting newer than the checkpoint
    compared with its default)."""
    if meta.get("data", data_fingerprint) != data_fingerprint:
        raise CheckpointError(f"checkpoint {path} was trained on other data than {cfg.data.path} (other training "
                              "queries or labels, or another data.validation_fraction): it cannot resume on it")
    # a setting added to astra_ds since the checkpoint was written had its default value then
    before = {**flat_config(RunConfig().to_dict()), **flat_config(meta.get("config", {}))}
    now = flat_config(cfg.with_absolute_paths().to_dict())
    changed = {key: (before[key], now.get(key)) for key in before if before[key] != now.get(key)}
    if not changed:
        return

    def said(keys) -> str:
        return "; ".join(f"{key} {changed[key][0]!r} -> {changed[key][1]!r}" for key in keys)

    breaking = [key for key in changed if not key.startswith(RESUMABLE_CHANGES)]
    if breaking and not allow_changes:
        raise CheckpointError(f"resuming {path} with other settings than it was trained with ({said(breaking)}): "
                              "the resumed run would not equal an uninterrupted one; pass --allow-changes to "
                              "resume with them anyway")
    log.warning("resuming %s with changed settings: %s", path, said(changed))


def flat_config(values: dict, prefix: str = "") -> dict:
    """{"train": {"epochs": 2}} -> {"train.epochs": 2}."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat |= flat_config(value, f"{prefix}{key}.")
        else:
            flat[prefix + key] = value
    return flat
