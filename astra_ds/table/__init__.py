"""The classifier table: host-memory rows, their row-sparse optimizers, the zarr store."""

from astra_ds.registry import Registry

OPTIMIZERS = Registry("table optimizer", {
    "rowwise_adagrad": "astra_ds.table.optim:RowwiseAdagrad",
    "lazy_adam": "astra_ds.table.optim:LazyAdam",
})
