"""astra_ds: extreme classification with a DeepSpeed encoder and a host-memory classifier table.

    run = astra_ds.train("configs/synthetic.yaml", overrides={"train.epochs": 2})   # a finished run
    model = astra_ds.load("runs/synthetic")                                         # or run.load()
    model.predict(["a text to tag"], k=5)
"""

__version__ = "0.1.0"


def train(config=None, overrides=(), **options):
    """Train, save, evaluate and index a run; returns the finished run (astra_ds.run.train, FinishedRun)."""
    from astra_ds.run import train as train_run

    return train_run(config, overrides, **options)


def load(run_dir, overrides=(), device=None):
    """A finished run, ready to predict and encode (astra_ds.inference.xc_model.XCModel)."""
    from astra_ds.inference.xc_model import load as load_model

    return load_model(run_dir, overrides, device)
