"""The end of training: the model written into the run directory and published as a finished run.

The final encoder weights and classifier table (each rank writes its rows, a copy independent of the checkpoints),
the label-text embeddings (dual scoring) and the training queries' embeddings (kNN votes) when the scoring uses
them, the label names and the model card; then the manifest, written last, makes the directory a finished run
(rundir/run_dir.py).
"""

from __future__ import annotations

import shutil

import torch

from astra_ds.collectives import barrier
from astra_ds.errors import UserError
from astra_ds.files import disk_full
from astra_ds.rundir.card import ModelCard
from astra_ds.rundir.run_dir import RunDir
from astra_ds.training.build import Training
from astra_ds.training.encodings import Encodings
from astra_ds.training.engine import encoder_state_dict


def save_model(parts: Training, encodings: Encodings, run: RunDir, step: int) -> None:
    """The model after `step` steps, published in `run`; a full disk is said in one line."""
    try:
        _save_model(parts, encodings, run, step)
    except (OSError, RuntimeError) as err:
        if disk_full(err, run.path):
            raise UserError(f"the disk is full: saving the model into {run} failed "
                            f"({shutil.disk_usage(run.path).free} bytes free); its last checkpoint is intact: "
                            "make room, then `astra-ds train --resume auto` saves it") from None
        raise


def _save_model(parts: Training, encodings: Encodings, run: RunDir, step: int) -> None:
    cfg, is_main, table = parts.cfg, parts.dist.is_main, parts.table
    state = encoder_state_dict(parts.engine)
    if is_main:
        torch.save(state, run.encoder_weights)
        table.create_store(run.table)
    barrier()
    table.save(run.table, progress=parts.progress)
    barrier()
    if cfg.eval.label_text_weight > 0:
        encodings.label_embeddings().save(run.label_embeddings)
    if cfg.eval.neighbour_weight > 0:
        votes = encodings.neighbour_votes()  # collective
        if is_main:
            votes.save(run.neighbours)
    if is_main:  # what predicting needs: the score formula, label names, the serving index
        if parts.data.label_texts is not None:
            run.write_label_names(parts.data.label_texts)
        ModelCard.of_run(cfg, table.num_labels, table.dim, step, state["calibration"]).save(run.model_card)
        run.publish()
    barrier()
