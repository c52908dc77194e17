import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from astra_ds.data.synth import SynthConfig, generate

REPO = Path(__file__).resolve().parents[1]
# what the tests' runs leave in the user's cache (digests verified once per model version) stays out of it
os.environ["ASTRA_DS_CACHE"] = tempfile.mkdtemp(prefix="astra_ds_cache_")
atexit.register(shutil.rmtree, os.environ["ASTRA_DS_CACHE"], ignore_errors=True)
SHARED_DATA = REPO.parent / "shared" / "data"

# A small learnable dataset and settings under which the tiny random encoder learns it in seconds.
TINY_RUN = ["encoder.model=tiny-random", "train.batch_size=32", "negatives.num_negatives=16",
            "train.encoder_lr=1e-3", "train.log_every=4"]


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    return generate(SynthConfig(num_labels=50, num_train=512, num_test=128, vocab_size=500, seed=1),
                    tmp_path_factory.mktemp("data") / "synth")


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture(scope="session")
def finished_run(synth_dir, data_cache, tmp_path_factory) -> Path:
    """A finished TINY_RUN with dual scoring, a projection and a serving index, for the tests that serve it or
    change its labels (those that change it work on a copy)."""
    import astra_ds

    out = tmp_path_factory.mktemp("finished") / "run"
    astra_ds.train(None, [*TINY_RUN, "train.epochs=1", "eval.label_text_weight=0.5", "encoder.dim=16",
                          "negatives.strategy=uniform", "batching.mode=random", f"data.path={synth_dir}",
                          f"data.cache_dir={data_cache}", f"out_dir={out}"], evaluate=False)
    return out


def make_trainer(synth_dir: Path, data_cache: Path, out: Path, *overrides: str):
    """An in-process Trainer of TINY_RUN on the synthetic fixture, writing to `out`, its rows initialised (as they
    are when the first stage that trains them begins), so that a test can step a stage directly."""
    from astra_ds.config import load_config
    from astra_ds.dist import init_distributed
    from astra_ds.training.trainer import Trainer

    cfg = load_config(None, [*TINY_RUN, f"data.path={synth_dir}", f"data.cache_dir={data_cache}", f"out_dir={out}",
                             *overrides])
    trainer = Trainer(cfg, init_distributed(), progress=False)
    trainer.parts.initialize_rows()
    return trainer


def run_main(*args: str) -> None:
    """`astra-ds ARGS` in this process (no interpreter start-up or imports to pay): it must succeed."""
    from astra_ds.cli.main import main

    assert main(list(args)) == 0


def run_cli(*args: str, timeout: float = 600, probe: str | None = None) -> subprocess.CompletedProcess:
    """`python -m astra_ds ARGS` in a fresh process, as a user runs it; `probe`: an expression whose value the
    process prints to stderr as it exits ("probe: VALUE")."""
    command = ["-m", "astra_ds"] if probe is None else [
        "-c", f"import atexit, runpy, sys; atexit.register(lambda: print('probe:', {probe}, file=sys.stderr)); "
              "sys.argv[0] = 'astra-ds'; runpy.run_module('astra_ds', run_name='__main__')"]
    return subprocess.run([sys.executable, *command, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env=fresh_process_env())


def fresh_process_env() -> dict[str, str]:
    """This environment without the launch variables an in-process Trainer set (a child would otherwise
    join, or bind the port of, this process's group)."""
    return {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}


def rewrite_meta(checkpoint: Path, **changes) -> None:
    """A checkpoint's meta.json with `changes`, its own digest made again: as if it had been written so."""
    import json

    from astra_ds.training.checkpoint import meta_digest

    meta = json.loads((checkpoint / "meta.json").read_text()) | changes
    meta["meta_digest"] = meta_digest(meta)
    (checkpoint / "meta.json").write_text(json.dumps(meta))


@pytest.fixture
def small_disk(tmp_path):
    """`make(megabytes)`: a file system of that size (a tmpfs mounted under tmp_path; root only), and `fill(path)`:
    it filled to the last byte, as a disk is that a command then writes to."""
    mounts = []

    def make(megabytes: float) -> Path:
        path = tmp_path / f"disk{len(mounts)}"
        path.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(megabytes * 1024)}k", "tmpfs", str(path)],
                                capture_output=True, text=True)
        if result.returncode:
            pytest.skip(f"a small disk needs mount (root): {result.stderr.strip()}")
        mounts.append(path)
        return path

    def fill(path: Path) -> None:
        fd = os.open(path / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            for size in (1 << 20, 1 << 12, 1):  # big writes, then the last blocks and bytes
                try:
                    while os.write(fd, b"\0" * size):
                        pass
                except OSError:
                    pass
        finally:
            os.close(fd)

    yield make, fill
    for path in mounts:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
