"""Negative samplers and the faiss index over the classifier rows.

A sampler is one module with a `NegativeSampler` subclass (see base.py) and one entry in SAMPLERS; the name is
what `negatives.strategy` selects.
"""

from astra_ds.registry import Registry

SAMPLERS = Registry("negative sampler", {
    "uniform": "astra_ds.negatives.uniform:UniformSampler",
    "astra": "astra_ds.negatives.astra:AstraSampler",
})

INDEX_KINDS = Registry("index kind", {
    "flat": "astra_ds.negatives.index:flat_index",
    "hnsw": "astra_ds.negatives.index:hnsw_index",
    "ivf_flat": "astra_ds.negatives.index:ivf_flat_index",
    "ivf_pq": "astra_ds.negatives.index:ivf_pq_index",
})
