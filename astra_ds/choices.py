"""Every named choice of a run config, in one place below `config`: each registry maps the names a config may use
to the class (or function) that implements it, imported on first use (so that `config` checks names without
importing torch or faiss).

A component that is chosen by name owns everything that depends on the choice: code elsewhere asks the
registered class (its attributes and methods), never compares the name. Adding a sampler, an index kind, a
stage, ... is one class and one entry here.
"""

from __future__ import annotations

from astra_ds.registry import Registry

READERS = Registry("data format", {
    "raw_text": "astra_ds.data.readers:read_raw_text",
    "bow": "astra_ds.data.readers:read_bow",
    "pairs": "astra_ds.data.readers:read_pairs",
    "xc_json": "astra_ds.data.readers:read_xc_json",
    "xc_parquet": "astra_ds.data.readers:read_xc_parquet",
})

OPTIMIZERS = Registry("table optimizer", {
    "rowwise_adagrad": "astra_ds.table.optim:RowwiseAdagrad",
    "lazy_adam": "astra_ds.table.optim:LazyAdam",
    "lazy_sgd": "astra_ds.table.optim:LazySGD",
})

TABLE_INITS = Registry("table init", {
    "random": "astra_ds.table.init:RandomRows",
    "label_text": "astra_ds.table.init:LabelTextRows",
})

INDEX_KINDS = Registry("index kind", {
    "flat": "astra_ds.index.kinds:Flat",
    "hnsw": "astra_ds.index.kinds:HNSW",
    "ivf_flat": "astra_ds.index.kinds:IVFFlat",
    "ivf_pq": "astra_ds.index.kinds:IVFPQ",
})

SAMPLERS = Registry("negative sampler", {
    "uniform": "astra_ds.negatives.uniform:UniformSampler",
    "astra": "astra_ds.negatives.astra:AstraSampler",
})

SHORTLISTS = Registry("shortlist mode", {
    "per_step": "astra_ds.negatives.shortlists:PerStepShortlists",
    "precomputed": "astra_ds.negatives.shortlists:PrecomputedShortlists",
})

# The loss of the rows' scores (astra_ds/training/loss.py), in every stage that trains rows.
LOSSES = Registry("classifier loss", {
    "bce": "astra_ds.training.loss:one_vs_all_bce",
    "softmax": "astra_ds.training.loss:decoupled_softmax",
})

BATCHING = Registry("batching mode", {
    "random": "astra_ds.training.batching:RandomBatches",
    "clustered": "astra_ds.training.batching:ClusteredBatches",
})

# The stages of a run, in the order they run (each class names the config keys of its epochs and batch size).
STAGES = Registry("stage", {
    "siamese": "astra_ds.training.stages:SiameseStage",
    "classifier": "astra_ds.training.stages:ClassifierStage",
    "joint": "astra_ds.training.stages:JointStage",
    "refit": "astra_ds.training.stages:RefitStage",
})
