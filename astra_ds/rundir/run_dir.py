"""A run directory (`out_dir`): every file name in it, and how they are read and published. Nothing outside this
package builds a path inside a run directory; it asks a RunDir.

    config.yaml, ds_config.json      the effective run and DeepSpeed configs
    run.json                         the run's id, which its checkpoints carry (one checkpoint.dir, several runs)
    init_from.json                   what the run started from (--init-from): its start again if stopped early
    train_log.jsonl, tensorboard/    metrics along training
    encoder.pt, table/               the final encoder weights and classifier table (zarr)
    label_embeddings/                the final encoder's label-text embeddings (zarr; dual scoring)
    neighbours/                      the training queries' embeddings (zarr) and labels (labels.npz): kNN votes
    model.json                       the model card: what predicting needs besides the weights (rundir/card.py)
    manifest.json                    digests of the model's files, written last: its presence makes a finished run
    label_names.txt                  one name a label (the dataset's label texts), for predictions
    retired_labels.json              labels retired from predictions (`astra-ds labels retire`)
    labels_change.json               a `labels` change under way: what finishes it after a crash
    ann/                             the serving index (rundir/serving_index.py): index.faiss over the scoring
                                     vectors, index.json (and neighbours.faiss over neighbours/ with kNN votes)
    evals/<n>/                       the results of each `astra-ds eval` (never overwritten)
    metrics.json, predictions.npz    the evaluation on the test split
    memory.json                      the memory plan and the measured peak RSS
    checkpoints/                     full-state checkpoints (their format: training/checkpoint.py)
    .lock                            held while a process changes the directory (rundir/lock.py)

A finished run is published in one step (its manifest written last) and withdrawn in one step (its manifest
removed first), so that a kill halfway leaves a directory that is refused, never a mix of two models.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from astra_ds.digests import DigestCache, damaged_files, file_digest, listed, manifest
from astra_ds.errors import UserError
from astra_ds.eval.outputs import METRICS_FILE, PREDICTIONS_FILE
from astra_ds.files import TMP_SUFFIX, files_under, fsync_path, write_atomically
from astra_ds.rundir.card import ModelCard
from astra_ds.rundir.lock import LOCK_FILE, RunLock
from astra_ds.rundir.verified import already_verified, known_digests, remember_verified


def one_line(name: str) -> str:
    """A label name as label_names.txt holds it: its line breaks made spaces."""
    return " ".join(name.splitlines()) if "\n" in name or "\r" in name else name


def _leftover(name: str) -> bool:
    """A temporary file of an interrupted write: ours (NAME.tmp) or zarr's (NAME.<uuid>.partial)."""
    return name.endswith((TMP_SUFFIX, ".partial"))


class _File:
    """A file of a run directory: on the class its name (RunDir.table == "table"), on a RunDir its path."""

    def __init__(self, name: str):
        self.name = name

    def __get__(self, run: "RunDir | None", owner) -> str | Path:
        return self.name if run is None else run.path / self.name


class RunDir:
    config = _File("config.yaml")
    identity = _File("run.json")
    ds_config = _File("ds_config.json")
    init_from = _File("init_from.json")
    train_log = _File("train_log.jsonl")
    tensorboard = _File("tensorboard")
    encoder_weights = _File("encoder.pt")
    table = _File("table")
    label_embeddings = _File("label_embeddings")
    neighbours = _File("neighbours")
    model_card = _File("model.json")
    manifest = _File("manifest.json")
    label_names = _File("label_names.txt")
    retired_labels = _File("retired_labels.json")
    labels_change = _File("labels_change.json")
    serving_index_dir = _File("ann")
    serving_index = _File("ann/index.faiss")
    serving_index_info = _File("ann/index.json")
    neighbour_index = _File("ann/neighbours.faiss")  # over the training queries' embeddings, for the kNN votes
    evals = _File("evals")
    metrics = _File(METRICS_FILE)  # the evaluation on the test split (eval/evaluate.py writes it)
    predictions = _File(PREDICTIONS_FILE)
    memory = _File("memory.json")
    checkpoints = _File("checkpoints")
    lock_file = _File(LOCK_FILE)

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RunDir) and self.path == other.path

    def __hash__(self) -> int:
        return hash(self.path)

    def lock(self, key: str = "out_dir") -> RunLock:
        """The directory's lock, held until released (or the process ends); `key` names it in messages."""
        return RunLock(self.path, key)

    # ---- reading ------------------------------------------------------------------------------------------------

    def has_run(self) -> bool:
        """Whether a run (finished or not) has written its config here."""
        return self.config.is_file()

    def read_config(self, overrides: list[str] = ()):
        from astra_ds.config import load_config

        return load_config(self.config, list(overrides))

    def read_card(self, verify: bool = True) -> ModelCard:
        """The model card; with `verify`, once the run's files are checked (see verify)."""
        if verify:
            self.verify()
        return ModelCard.load(self.model_card)

    def read_label_names(self, num_labels: int) -> list[str] | None:
        """The names of the first `num_labels` labels, or None when the run has none."""
        path = self.label_names
        return path.read_text(encoding="utf-8").split("\n")[:num_labels] if path.is_file() else None

    def read_run_id(self) -> str | None:
        """The id of the run begun here (None: none yet, or a run of a version that had none)."""
        try:
            return json.loads(self.identity.read_text())["run_id"]
        except (OSError, ValueError, KeyError):
            return None

    def read_retired(self) -> np.ndarray:
        """The sorted ids of the retired labels (none: an empty array)."""
        path = self.retired_labels
        return np.array(sorted(json.loads(path.read_text())["retired"]) if path.is_file() else [], dtype=np.int64)

    def verified_digests(self) -> DigestCache:
        """The manifest's digests of the files unchanged since the run was last verified (rundir/verified.py)."""
        try:
            return known_digests(self.path, json.loads(self.manifest.read_text()))
        except (OSError, ValueError):
            return DigestCache()

    def version(self) -> str:
        """The model's version: its manifest's digest, which moves with any change of the model."""
        return file_digest(self.manifest)

    # ---- writing ------------------------------------------------------------------------------------------------

    def write_run_id(self, run_id: str) -> None:
        write_atomically(self.identity, json.dumps({"run_id": run_id}))

    def write_label_names(self, names: list[str]) -> None:
        """One name a line (a dataset's label text that holds a line break is kept on one line)."""
        write_atomically(self.label_names, "\n".join(one_line(name) for name in names))

    def write_retired(self, ids: list[int]) -> None:
        write_atomically(self.retired_labels, json.dumps({"retired": list(ids)}))

    def begin_change(self, change: dict) -> None:
        """A `labels` change is recorded, then the run withdrawn: until end_change it is not a finished run, and
        pending_change says what finishes it after a crash."""
        write_atomically(self.labels_change, json.dumps(change))
        self.manifest.unlink(missing_ok=True)

    def pending_change(self) -> dict | None:
        return json.loads(self.labels_change.read_text()) if self.labels_change.is_file() else None

    def end_change(self) -> None:
        self.labels_change.unlink()

    def claim_eval_dir(self) -> Path:
        """The next free evals/<n>, created here: evaluations running at once each get their own."""
        self.evals.mkdir(exist_ok=True)
        while True:
            taken = [int(p.name) for p in self.evals.glob("*") if p.name.isdigit()]
            path = self.evals / str(max(taken, default=0) + 1)
            try:
                path.mkdir()  # atomic: of two evaluations choosing the same n, one gets it, the other tries n + 1
                return path
            except FileExistsError:
                continue

    # ---- publishing -----------------------------------------------------------------------------------------------

    def model_files(self) -> list[str]:
        """The files a finished run's model is made of (not the rebuildable serving index), relative to the run;
        not the leftovers of a write a kill interrupted."""
        names = [RunDir.config, RunDir.encoder_weights, RunDir.model_card, RunDir.label_names, RunDir.retired_labels]
        files = [name for name in names if (self.path / name).is_file()]
        for directory in (RunDir.table, RunDir.label_embeddings, RunDir.neighbours):
            files += [f"{directory}/{name}" for name in files_under(self.path / directory) if not _leftover(name)]
        return files

    def remove_leftovers(self) -> None:
        """The temporary files of writes a kill interrupted, in the model's directories (before publishing)."""
        for directory in (self.table, self.label_embeddings, self.neighbours):
            for name in files_under(directory) if directory.is_dir() else []:
                if _leftover(name):
                    (directory / name).unlink()

    def withdraw(self) -> None:
        """Before a run (re)writes its directory: no longer a finished run until publish, so that a kill halfway
        leaves a directory that is refused, not a mix of two models."""
        self.manifest.unlink(missing_ok=True)
        shutil.rmtree(self.serving_index_dir, ignore_errors=True)
        if self.path.is_dir():
            fsync_path(self.path)

    def publish(self, known: DigestCache | None = None) -> None:
        """manifest.json, written last: the digests of the model's files, those of `known` files not read again.
        The files it lists have just been digested, so the run counts as verified (rundir/verified.py)."""
        self.remove_leftovers()
        digests = manifest(self.path, self.model_files(), known)
        write_atomically(self.manifest, json.dumps(digests, indent=1))
        remember_verified(self.path, [RunDir.manifest, *digests])

    def check_finished(self) -> None:
        """Refuses a directory that is not a finished run (nothing read but its listing)."""
        if not self.path.is_dir():
            raise UserError(f"no run at {self.path}")
        if not self.manifest.is_file() and self.labels_change.is_file():
            raise UserError(f"{self.path} is changing its labels, or a change was interrupted: `astra-ds labels "
                            f"finish --run-dir {self.path}` finishes it")
        if not self.manifest.is_file():
            raise UserError(f"{self.path} is not a finished run: its training has not saved a complete model (no "
                            f"{RunDir.manifest}); `astra-ds train --resume auto` finishes it")

    def verify(self) -> None:
        """Refuses a directory that is not a finished run (no manifest.json: a training that has not finished
        saving its model, or was killed while saving it) or whose model files are missing or changed since training
        wrote them. Checked once per model version (rundir/verified.py)."""
        self.check_finished()
        try:
            digests = json.loads(self.manifest.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"{self.manifest} is damaged ({err})") from None
        unlisted = sorted(set(self.model_files()) - set(digests))
        if unlisted:  # a file that would change what the model predicts, not published with it
            raise UserError(f"{self.path} holds {listed(unlisted)}, which its manifest does not list (it was not "
                            "published with this model): remove it, or make the change with `astra-ds labels`")
        names = [RunDir.manifest, *digests]
        if already_verified(self.path, names):
            return
        damaged = damaged_files(self.path, digests)
        if damaged:
            raise UserError(f"{self.path} is damaged: {listed(damaged)} missing or changed since training wrote them")
        remember_verified(self.path, names)
