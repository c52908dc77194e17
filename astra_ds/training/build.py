"""One builder of a training run: the data, the encoder, the table, the negative sampler and the DeepSpeed engine
are built here, for the trainer and for `astra-ds plan` (a finished run is loaded with astra_ds.inference.xc_model).

Everything a config and the data decide together is checked here, before anything large is allocated: a
mistake ends the command with one line at start-up, not a traceback after the warm-up.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from astra_ds.choices import SAMPLERS, STAGES, TABLE_INITS
from astra_ds.config import RunConfig
from astra_ds.data.prepare import PreparedData, prepare_data
from astra_ds.dist import DistInfo
from astra_ds.ds_config import add_scheduler, resolve_ds_config
from astra_ds.errors import CheckpointError, ConfigError
from astra_ds.encoder.encoder import QueryEncoder, build_tokenizer
from astra_ds.encoder.label_text import encode_label_texts
from astra_ds.libraries import release_free_memory
from astra_ds.negatives.base import NegativeSampler, SamplerContext
from astra_ds.plan import MemoryPlan, plan_and_check, process_bytes
from astra_ds.rundir.run_dir import RunDir
from astra_ds.table.table import ClassifierTable
from astra_ds.training.engine import build_engine
from astra_ds.training.from_run import RunStart

log = logging.getLogger("astra_ds")


def stage_classes(cfg: RunConfig) -> list:
    """The classes of the run's stages (those with epochs), in order; the stages themselves are built by the
    trainer."""
    classes = [STAGES.get(name) for name in STAGES.names]
    return [cls for cls in classes if cls.schedule(cfg)[0] > 0]


def uses_label_texts(cfg: RunConfig) -> bool:
    """A stage encodes label texts, the rows start from them, or scoring adds them (dual scoring)."""
    return (any(cls.uses_label_texts for cls in stage_classes(cfg))
            or TABLE_INITS.get(cfg.table.init).needs_label_texts
            or any(weight > 0 for weight in [cfg.eval.label_text_weight, *cfg.eval.label_text_weights]))


def encoder_steps(cfg: RunConfig, num_train: int) -> int:
    """Optimizer steps of the stages that train the encoder (its learning-rate schedule runs over them)."""
    steps = 0
    for cls in stage_classes(cfg):
        epochs, batch_size = cls.schedule(cfg)
        steps += epochs * (num_train // batch_size) if cls.trains_encoder else 0
    return steps


def build_data(cfg: RunConfig) -> tuple[object, PreparedData]:
    """The tokenizer and the prepared dataset (label texts too when the run uses them). Data that is not prepared
    is prepared into the cache by the first rank to ask; the others wait for it."""
    tokenizer = build_tokenizer(cfg.encoder)
    label_max_len = cfg.siamese.label_max_len if uses_label_texts(cfg) else None
    return tokenizer, prepare_data(cfg, tokenizer, label_max_len)


def check_data(cfg: RunConfig, data: PreparedData) -> None:
    """What the config asks of the data."""
    stats = data.train.stats()
    if stats.rows < cfg.train.batch_size:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} exceeds the {stats.rows} training queries")
    if uses_label_texts(cfg) and data.label_tokens is None:
        raise ConfigError(f"a Siamese stage, table.init=label_text and eval.label_text_weight > 0 need label "
                          f"texts, and the data at {cfg.data.path} has none (Y.txt, or label_names.txt in the "
                          "pair-file format)")
    if cfg.negatives.num_negatives >= data.num_labels:
        log.warning("negatives.num_negatives=%d is not below the %d labels: every label is drawn, several times",
                    cfg.negatives.num_negatives, data.num_labels)
    if stats.unlabelled:
        log.warning("%d training queries have no labels: they contribute negatives only", stats.unlabelled)


def build_encoder(cfg: RunConfig, data: PreparedData) -> QueryEncoder:
    """The encoder, its random parts (projection, tiny-random) drawn from the run's seed, its lexical features'
    idf from the training queries; checked against the choices that depend on its width."""
    torch.manual_seed(cfg.train.seed)
    encoder = QueryEncoder(cfg.encoder, data.num_labels)
    if encoder.lexical is not None:
        encoder.lexical.fit_idf(data.train)
    SAMPLERS.get(cfg.negatives.strategy).check(cfg, encoder.dim)
    return encoder


def check_checkpoint_fits(meta: dict, path: Path, data: PreparedData, dim: int) -> None:
    """A checkpoint of another dataset or model width is refused before it is loaded."""
    expected = {"num_labels": data.num_labels, "num_train": len(data.train), "dim": dim}
    for key, value in expected.items():
        if key in meta and meta[key] != value:
            raise CheckpointError(f"checkpoint {path} has {key}={meta[key]}, this run has {value}: "
                                  "another dataset, data.validation_fraction, encoder.dim or encoder.lexical_dim")


@dataclass
class Training:
    """Everything a training run is made of, built and checked."""

    cfg: RunConfig
    dist: DistInfo
    tokenizer: object
    data: PreparedData
    engine: object  # the DeepSpeed engine around the QueryEncoder
    ds_config: dict
    ds_path: Path
    table: ClassifierTable
    sampler: NegativeSampler
    memory_plan: MemoryPlan
    progress: bool
    run_start: RunStart | None = None  # the finished run this one starts from (--init-from RUN_DIR)

    def encode_label_texts(self, target) -> None:
        """This rank's rows of `target` (the table, LabelEmbeddings) <- the current encoder's label-text embeddings."""
        started = time.time()
        encode_label_texts(target, self.data.label_tokens, self.engine, self.cfg.eval.batch_size, self.progress)
        log.info("label texts encoded in %.1f s", time.time() - started)

    def initialize_rows(self) -> None:
        """A fresh run's rows, as table.init says (label-text rows from the encoder as it is now); in a run that
        starts from a finished one, the rows of its labels are that run's and new label-text rows are mapped like
        trained ones (RunStart.map_new_rows)."""
        table_init = TABLE_INITS.get(self.cfg.table.init)
        if self.run_start is None or self.run_start.num_new:
            table_init.initialize(self.table, self.cfg.train.seed, self.encode_label_texts)
        if self.run_start is not None:
            if table_init.needs_label_texts:  # the new labels' rows are their text embeddings: mapped to rows
                self.run_start.map_new_rows(self.table)
            self.run_start.load_rows(self.table)
        self.table.mark_initialized()


def build_training(cfg: RunConfig, dist: DistInfo, checkpoint: tuple[Path, dict] | None = None,
                   progress: bool = False, from_run: RunDir | None = None) -> Training:
    """`checkpoint`: (path, meta) of the checkpoint the run resumes or starts from (checked against the data and
    encoder); `from_run`: a finished run whose encoder and rows start this one (astra_ds/training/from_run.py). The
    rows are left empty: the trainer initialises them (Training.initialize_rows) when the first stage that trains
    them begins, or loads them from the checkpoint."""
    ds_config, ds_path = resolve_ds_config(cfg.train, dist.world_size, dist.device.type == "cuda")
    tokenizer, data = build_data(cfg)
    check_data(cfg, data)
    add_scheduler(ds_config, cfg.train, encoder_steps(cfg, len(data.train)))
    sampler_class = SAMPLERS.get(cfg.negatives.strategy)
    sampler_class.import_dependencies()
    release_free_memory()  # what preparing the data here (a first run on files) freed is no longer the run's
    held = process_bytes()  # before the model: the plan measures the process as it is now
    encoder = build_encoder(cfg, data)
    run_start = None
    if from_run is not None:
        run_start = RunStart.read(from_run, data.label_texts, data.num_labels)
        encoder.load_trained(run_start.encoder_weights, cfg.encoder)
    if checkpoint is not None:
        check_checkpoint_fits(checkpoint[1], checkpoint[0], data, encoder.dim)
        if checkpoint[1]["world_size"] != dist.world_size:  # re-sliced through a universal checkpoint
            ds_config.setdefault("checkpoint", {})["load_universal"] = True
    memory_plan = plan_and_check(cfg, data, encoder, dist, held)
    engine = build_engine(encoder, ds_config)
    table = ClassifierTable(data.num_labels, encoder.dim, cfg.table, dist.device, dist.rank,
                            dist.world_size, cfg.train.seed)
    sampler = sampler_class(SamplerContext(cfg, table, len(data.train)))
    return Training(cfg, dist, tokenizer, data, engine, ds_config, ds_path, table, sampler, memory_plan, progress,
                    run_start)
