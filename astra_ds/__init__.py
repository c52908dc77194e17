"""astra_ds: extreme classification with a DeepSpeed encoder and a host-memory classifier table."""

__version__ = "0.1.0"
