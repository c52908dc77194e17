"""The classifier table: host-memory rows, their row-sparse optimizers (registry OPTIMIZERS in astra_ds/choices.py),
the zarr store, the initial rows."""
