"""astra_ds: extreme classification with a DeepSpeed encoder and a host-memory classifier table.

    model = astra_ds.load("runs/synthetic")
    model.predict(["a text to tag"], k=5)
"""

__version__ = "0.1.0"


def load(run_dir, overrides=(), device=None):
    """A finished run, ready to predict and encode (astra_ds.serve.model.XCModel)."""
    from astra_ds.serve.model import load as load_model

    return load_model(run_dir, overrides, device)
