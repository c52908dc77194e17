"""Datasets: readers of the XC file layouts, the synthetic generator, the token cache."""

from astra_ds.registry import Registry

READERS = Registry("data format", {
    "raw_text": "astra_ds.data.readers:read_raw_text",
    "bow": "astra_ds.data.readers:read_bow",
    "pairs": "astra_ds.data.readers:read_pairs",
    "xc_json": "astra_ds.data.readers:read_xc_json",
})
