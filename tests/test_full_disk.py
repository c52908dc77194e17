"""A full disk, a real one (a small tmpfs filled to the last byte): every command that writes a result says so in
one line naming where, leaves nothing half-written (no torn file, no temporary directory that a re-run would trip
on), leaves what was there before as it was, and works once there is room."""

import json
import shutil

import pytest

import astra_ds
from astra_ds.cli.main import main
from conftest import TINY_RUN, run_main

UNIFORM = [*TINY_RUN, "negatives.strategy=uniform", "batching.mode=random"]


@pytest.fixture(scope="module")
def run(synth_dir, data_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("full_disk") / "run"
    run_main("train", "--no-eval", *[arg for override in (*UNIFORM, "train.max_steps=2", f"data.path={synth_dir}",
                                                          f"data.cache_dir={data_cache}", f"out_dir={out}")
                                     for arg in ("--set", override)])
    shutil.rmtree(out / "checkpoints")  # the model alone: small enough for a small disk
    return out


def _full(capsys, *args: str) -> str:
    capsys.readouterr()
    assert main(list(args)) == 2
    err = capsys.readouterr().err
    assert err.startswith("astra-ds: error: the disk is full") and err.count("\n") == 1, err
    return err


def _names(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name != "filler")


def test_predict_out_on_a_full_disk(run, synth_dir, small_disk, capsys):
    make, fill = small_disk
    disk = make(1)
    texts = disk.parent / "texts.txt"
    texts.write_text("\n".join((synth_dir / "tst_X.txt").read_text().splitlines() * 4))
    for name in ("top5.jsonl", "top5.npz"):
        fill(disk)
        before = _names(disk)
        err = _full(capsys, "predict", "--run-dir", str(run), "--input", str(texts), "--out", str(disk / name))
        assert f"writing {disk / name} failed" in err
        assert _names(disk) == before  # no torn file, no temporary one
        (disk / "filler").unlink()
        run_main("predict", "--run-dir", str(run), "--input", str(texts), "--out", str(disk / name))
        assert (disk / name).stat().st_size > 0


def test_eval_on_a_full_disk_leaves_no_results_that_block_a_rerun(run, small_disk, capsys):
    make, fill = small_disk
    disk = make(1)
    fill(disk)
    out = disk / "eval"
    _full(capsys, "eval", "--run-dir", str(run), "--out-dir", str(out))
    assert not (out / "metrics.json").exists() and not list(out.glob("*.tmp*"))
    (disk / "filler").unlink()
    run_main("eval", "--run-dir", str(run), "--out-dir", str(out))  # not refused as "exists"
    assert json.loads((out / "metrics.json").read_text())["astra_ds"]["P@1"] >= 0


def test_export_on_a_full_disk_is_one_line_and_leaves_no_temporary_directory(run, small_disk, capsys):
    make, fill = small_disk
    disk = make(8)
    fill(disk)
    err = _full(capsys, "export", "--run-dir", str(run), "--out", str(disk / "exported"))
    assert f"exporting into {disk / 'exported'} failed" in err
    assert _names(disk) == []


def test_the_serving_index_on_a_full_disk_keeps_the_old_one(run, small_disk, capsys):
    make, fill = small_disk
    disk = make(64)
    copy = shutil.copytree(run, disk / "run")
    before = (copy / "ann" / "index.faiss").read_bytes()
    fill(disk)
    err = _full(capsys, "index", "--run-dir", str(copy))
    assert "writing the serving index into" in err and "`astra-ds index --run-dir" in err
    assert (copy / "ann" / "index.faiss").read_bytes() == before and not (copy / "ann.tmp").exists()
    (disk / "filler").unlink()
    assert astra_ds.load(copy).predict(["tova rebu"], k=3).ids.shape == (1, 3)
