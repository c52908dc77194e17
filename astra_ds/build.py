"""One builder for every command: the data, the encoder, the table, the negative sampler, the batches and the
DeepSpeed engine of a run are built here, for `train`, `plan` and `eval` (`predict` loads a run with
astra_ds.serve.model).

Everything a config and the data decide together is checked here, before anything large is allocated: a
mistake ends the command with one line at start-up, not a traceback after the warm-up.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from astra_ds.collectives import barrier
from astra_ds.config import RunConfig
from astra_ds.data.prepare import PreparedData, prepare_data
from astra_ds.dist import DistInfo
from astra_ds.ds_config import add_scheduler, resolve_ds_config
from astra_ds.errors import CheckpointError, ConfigError
from astra_ds.model.encoder import QueryEncoder, build_tokenizer
from astra_ds.model.label_text import encode_label_texts
from astra_ds.negatives import SAMPLERS
from astra_ds.negatives.base import NegativeSampler, SamplerContext
from astra_ds.negatives.index import check_index_config
from astra_ds.plan import MemoryPlan, plan_and_check, process_bytes
from astra_ds.table.table import ClassifierTable
from astra_ds.train.engine import build_engine, encode_with

log = logging.getLogger("astra_ds")


def uses_label_texts(cfg: RunConfig) -> bool:
    return cfg.siamese.epochs > 0 or cfg.table.init == "label_text" or cfg.eval.label_text_weight > 0


def build_data(cfg: RunConfig, dist: DistInfo | None = None) -> tuple[object, PreparedData]:
    """The tokenizer and the tokenised dataset (label texts too when the run uses them); with several ranks, rank 0
    fills the token cache first."""
    tokenizer = build_tokenizer(cfg.encoder)
    label_max_len = cfg.siamese.label_max_len if uses_label_texts(cfg) else None
    if dist is None or dist.is_main:
        data = prepare_data(cfg.data, tokenizer, label_max_len)
    barrier()
    if dist is not None and not dist.is_main:
        data = prepare_data(cfg.data, tokenizer, label_max_len)
    return tokenizer, data


def check_data(cfg: RunConfig, data: PreparedData) -> None:
    """What the config asks of the data."""
    num_train = len(data.train_tokens)
    if num_train < cfg.train.batch_size:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} exceeds the {num_train} training queries")
    if uses_label_texts(cfg) and data.dataset.label_texts is None:
        raise ConfigError(f"siamese.epochs > 0, table.init=label_text and eval.label_text_weight > 0 need label "
                          f"texts, and the data at {cfg.data.path} has none (Y.txt, or label_names.txt in the "
                          "pair-file layout)")
    if cfg.negatives.num_negatives >= data.dataset.num_labels:
        log.warning("negatives.num_negatives=%d is not below the %d labels: every label is drawn, several times",
                    cfg.negatives.num_negatives, data.dataset.num_labels)
    unlabelled = int((np.diff(data.dataset.train.labels.indptr) == 0).sum())
    if unlabelled:
        log.warning("%d training queries have no labels: they contribute negatives only", unlabelled)


def build_encoder(cfg: RunConfig, num_labels: int) -> QueryEncoder:
    """The encoder, its random parts (projection, tiny-random) drawn from the run's seed; checked against the
    choices that depend on its width."""
    torch.manual_seed(cfg.train.seed)
    encoder = QueryEncoder(cfg.encoder, num_labels)
    if cfg.negatives.strategy == "astra":
        check_index_config(cfg.index, encoder.dim)
    return encoder


def check_checkpoint_fits(meta: dict, path: Path, data: PreparedData, dim: int) -> None:
    """A checkpoint of another dataset or model width is refused before it is loaded."""
    expected = {"num_labels": data.dataset.num_labels, "num_train": len(data.train_tokens), "dim": dim}
    for key, value in expected.items():
        if key in meta and meta[key] != value:
            raise CheckpointError(f"checkpoint {path} has {key}={meta[key]}, this run has {value}: "
                                  "another dataset or encoder.dim")


@dataclass
class Training:
    """Everything a training run is made of, built and checked."""

    tokenizer: object
    data: PreparedData
    engine: object  # the DeepSpeed engine around the QueryEncoder
    ds_config: dict
    ds_path: Path
    table: ClassifierTable
    sampler: NegativeSampler
    memory_plan: MemoryPlan
    frozen_queries: torch.Tensor | None = None  # every training query's embedding while the encoder is frozen

    def encode_train(self, rows: np.ndarray | None, batch_size: int, progress: bool) -> torch.Tensor:
        """Embeddings (host) of the training queries at `rows` (None: all) with the current encoder."""
        if self.frozen_queries is not None:
            return self.frozen_queries if rows is None else self.frozen_queries[rows]
        tokens = self.data.train_tokens if rows is None else self.data.train_tokens.subset(rows)
        return encode_with(self.engine, tokens, batch_size, self.table.device, progress)

    def encode_label_texts(self, target, batch_size: int, progress: bool) -> None:
        """This rank's rows of `target` (the table, LabelEmbeddings) <- the current encoder's label-text embeddings."""
        started = time.time()
        self.engine.eval()
        encode_label_texts(target, self.data.label_tokens, lambda ids, mask: self.engine(ids, mask), batch_size,
                           progress)
        self.engine.train()
        log.info("label texts encoded in %.1f s", time.time() - started)


def build_training(cfg: RunConfig, dist: DistInfo, checkpoint: tuple[Path, dict] | None = None,
                   fresh_rows: bool = True, progress: bool = False) -> Training:
    """`checkpoint`: (path, meta) of the checkpoint the run resumes or starts from (checked against the data and
    encoder); `fresh_rows`: initialise the table (random or label-text rows), else a checkpoint provides them."""
    ds_config, ds_path = resolve_ds_config(cfg.train, dist.world_size, dist.device.type == "cuda")
    tokenizer, data = build_data(cfg, dist)
    check_data(cfg, data)
    add_scheduler(ds_config, cfg.train,  # the encoder steps: those of the Siamese and joint stages
                  (cfg.siamese.epochs + cfg.train.epochs) * (len(data.train_tokens) // cfg.train.batch_size))
    sampler_class = SAMPLERS.get(cfg.negatives.strategy)
    sampler_class.import_dependencies()
    held = process_bytes()  # before the model: the plan measures the process as it is now
    encoder = build_encoder(cfg, data.dataset.num_labels)
    if checkpoint is not None:
        check_checkpoint_fits(checkpoint[1], checkpoint[0], data, encoder.dim)
        if checkpoint[1]["world_size"] != dist.world_size:  # re-sliced through a universal checkpoint
            ds_config.setdefault("checkpoint", {})["load_universal"] = True
    memory_plan = plan_and_check(cfg, data, encoder, dist, held)
    engine = build_engine(encoder, ds_config)
    table = ClassifierTable(data.dataset.num_labels, encoder.dim, cfg.table, dist.device, dist.rank,
                            dist.world_size, cfg.train.seed)
    training = Training(tokenizer, data, engine, ds_config, ds_path, table, None, memory_plan)
    context = SamplerContext(cfg, table, lambda rows: training.encode_train(rows, cfg.eval.batch_size, progress),
                             len(data.train_tokens))
    training.sampler = sampler_class(context)
    if fresh_rows and cfg.table.init == "label_text" and cfg.siamese.epochs == 0:
        training.encode_label_texts(table, cfg.eval.batch_size, progress)
    elif fresh_rows:  # random rows; label-text rows wait for the Siamese stage's encoder
        table.init_random(cfg.train.seed)
    return training


def load_for_eval(run_dir: str | Path, overrides: list[str] = (), progress: bool = False):
    """A finished run (XCModel) and the data it is evaluated on: the run's dataset, or another one of the same
    labels (--set data.path=...)."""
    from astra_ds.serve.model import XCModel

    model = XCModel.load(run_dir, overrides, progress=progress)
    _, data = build_data(model.cfg)
    if data.dataset.num_labels != model.num_labels:
        raise ConfigError(f"the data at {model.cfg.data.path} has {data.dataset.num_labels} labels, the model "
                          f"{model.num_labels}")
    return model, data
