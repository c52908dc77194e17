"""A user's work is never replaced or mixed silently: `--resume auto` without a checkpoint of a finished model,
a resume after a `labels` change, two runs in one checkpoint.dir, a name that would shift label_names.txt, a file
the manifest does not list, a text that is no text, an empty test split, a signal during a checkpoint. Each ends
in one line saying what to do, with the published model as it was. Retired labels stay out of every answer: the
serving index's when it finds too few, and an export's."""

import json
import shutil
import signal

import numpy as np
import pytest

import astra_ds
import astra_ds.inference.export
from astra_ds.cli.main import main
from astra_ds.errors import UserError
from conftest import TINY_RUN, make_trainer, run_main

UNIFORM = [*TINY_RUN, "negatives.strategy=uniform", "batching.mode=random", "train.log_every=1"]
SAVED = ("checkpoint.save_every=2", "train.max_steps=4")


def _args(synth_dir, data_cache, out, *overrides: str) -> list[str]:
    return [arg for override in (*UNIFORM, f"data.path={synth_dir}", f"data.cache_dir={data_cache}",
                                 f"out_dir={out}", *overrides) for arg in ("--set", override)]


def _error(capsys, *args: str) -> str:
    capsys.readouterr()
    assert main(list(args)) == 2
    err = capsys.readouterr().err
    assert err.startswith("astra-ds: error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture(scope="module")
def run(synth_dir, data_cache, tmp_path_factory):
    """A finished run with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("nothing_lost") / "run"
    run_main("train", "--no-eval", *_args(synth_dir, data_cache, out, *SAVED))
    return out


@pytest.fixture
def copy(run, tmp_path):
    return shutil.copytree(run, tmp_path / "run", symlinks=True)


def _version(run_dir) -> str:
    return astra_ds.load(run_dir).description()["version"]


def test_resume_auto_never_trains_over_a_finished_model_whose_checkpoints_are_gone(copy, synth_dir, data_cache,
                                                                                  capsys):
    version = _version(copy)
    shutil.rmtree(copy / "checkpoints")  # deleted to save space, or a checkpoint.dir on a volume not mounted
    err = _error(capsys, "train", "--resume", "auto", *_args(synth_dir, data_cache, copy, *SAVED, "table.lr=0.5"))
    assert "holds a finished model, but" in err and "pass --overwrite instead of --resume" in err
    assert _version(copy) == version  # the published model, as it was
    run_main("train", "--overwrite", "--no-eval", *_args(synth_dir, data_cache, copy, *SAVED, "table.lr=0.5"))
    assert _version(copy) != version


def test_resume_and_finalize_refuse_a_checkpoint_older_than_a_labels_change(copy, synth_dir, data_cache, capsys):
    astra_ds.load(copy).add_labels(["tova rebu kide"], names=["added"])
    version = _version(copy)
    resume = ["train", "--resume", "auto", *_args(synth_dir, data_cache, copy, *SAVED)]
    assert "changed by `astra-ds labels` after checkpoint global_step4 (51 labels" in _error(capsys, *resume)
    assert "--init-from" in _error(capsys, "finalize", "--run-dir", str(copy), "--no-eval")
    assert _version(copy) == version and astra_ds.load(copy).num_labels == 51
    model = astra_ds.load(copy)
    model.retire_labels(names=["added"])
    assert "1 retired" in _error(capsys, *resume)


def test_a_run_never_writes_into_a_checkpoint_dir_holding_another_run_s_checkpoints(synth_dir, data_cache,
                                                                                    tmp_path, capsys):
    shared = tmp_path / "checkpoints"
    first = ["train", "--no-eval", *_args(synth_dir, data_cache, tmp_path / "a", *SAVED,
                                          f"checkpoint.dir={shared}")]
    run_main(*first)
    written = sorted(p.name for p in shared.glob("global_step*"))
    run_id = json.loads((tmp_path / "a" / "run.json").read_text())["run_id"]
    assert all(json.loads((shared / name / "meta.json").read_text())["run_id"] == run_id for name in written)
    second = ["train", "--no-eval", *_args(synth_dir, data_cache, tmp_path / "b", *SAVED,
                                           f"checkpoint.dir={shared}")]
    assert "holds checkpoints of another run (global_step4, global_step2)" in _error(capsys, *second)
    assert sorted(p.name for p in shared.glob("global_step*")) == written  # nothing pruned or replaced
    assert not (tmp_path / "b" / "config.yaml").exists()
    # the first run goes on from its own checkpoints; --overwrite replaces its own, not another run's
    run_main("train", "--resume", "auto", "--no-eval", *first[2:], "--set", "train.max_steps=6")
    assert (shared / "global_step6").is_dir()


def test_a_label_name_holding_a_line_break_is_refused_and_a_dataset_s_is_kept_on_one_line(copy, tmp_path):
    from astra_ds.rundir.run_dir import RunDir

    model = astra_ds.load(copy)
    with pytest.raises(UserError, match="holds a line break"):
        model.add_labels(["tova rebu"], names=["two\nlines"])
    labels = tmp_path / "labels.jsonl"
    labels.write_text(json.dumps({"text": "tova rebu", "name": "one\rtwo"}) + "\n")
    assert main(["labels", "add", "--run-dir", str(copy), "--labels", str(labels)]) == 2
    run = RunDir(tmp_path / "names")
    run.path.mkdir()
    run.write_label_names(["first", "a\nb", "c\r\nd", "last"])
    assert run.read_label_names(4) == ["first", "a b", "c d", "last"]


def test_a_model_file_the_manifest_does_not_list_is_refused(copy, capsys):
    (copy / "retired_labels.json").write_text(json.dumps({"retired": [0, 1, 2]}))  # dropped in by hand
    err = _error(capsys, "predict", "--run-dir", str(copy), "--text", "tova rebu")
    assert "holds retired_labels.json, which its manifest does not list" in err
    (copy / "retired_labels.json").unlink()
    run_main("predict", "--run-dir", str(copy), "--text", "tova rebu")


def test_a_text_holding_a_lone_surrogate_is_one_line_not_a_traceback(copy, capsys):
    with pytest.raises(UserError, match=r"position 1 holds a lone surrogate \('\\ud800'\)"):
        astra_ds.load(copy).predict(["tova rebu", "bad \ud800 text"], k=3)
    assert "lone surrogate" in _error(capsys, "predict", "--run-dir", str(copy), "--text", "a \udcff b")


def test_eval_of_an_empty_test_split_is_one_line_and_claims_no_directory(copy, synth_dir, tmp_path, capsys):
    data = shutil.copytree(synth_dir, tmp_path / "data")
    (data / "tst_X.txt").write_text("")
    (data / "tst_X_Y.txt").write_text("0 50\n")
    err = _error(capsys, "eval", "--run-dir", str(copy), "--set", f"data.path={data}")
    assert "the test split of" in err and "holds no queries" in err
    assert not (copy / "evals").exists() or not list((copy / "evals").iterdir())


def test_a_signal_during_a_checkpoint_ends_in_that_one_checkpoint(synth_dir, data_cache, tmp_path, monkeypatch):
    from astra_ds.errors import Preempted
    from astra_ds.training.checkpoint import CheckpointManager

    trainer = make_trainer(synth_dir, data_cache, tmp_path, "negatives.strategy=uniform", "batching.mode=random",
                           "checkpoint.save_every=2", "train.max_steps=6")
    saves, save = [], CheckpointManager.save

    def save_and_be_signalled(self, step, meta):
        saves.append(step)
        if step == 2:
            signal.raise_signal(signal.SIGTERM)  # preemption arrives while the checkpoint is written
        return save(self, step, meta)

    monkeypatch.setattr(CheckpointManager, "save", save_and_be_signalled)
    with pytest.raises(Preempted) as stopped:
        trainer.fit()
    assert saves == [2] and stopped.value.step == 2


def test_the_serving_index_with_most_labels_retired_still_names_k_labels(copy):
    model = astra_ds.load(copy)
    kept = [3, 17, 29, 41, 48]
    model.retire_labels(ids=[i for i in range(model.num_labels) if i not in kept])
    model = astra_ds.load(copy)
    assert model.index is not None
    texts = ["tova rebu kide", "pode gubi", "lebu"]
    served, exact = model.predict(texts, k=5), model.predict(texts, k=5, exact=True)
    assert sorted(served.ids[0].tolist()) == kept and (served.ids >= 0).all()
    assert served.ids.tolist() == exact.ids.tolist() and "-1" not in sum(served.names, [])


def test_the_export_leaves_retired_labels_out_of_its_index_and_lists_them(copy, tmp_path):
    import faiss

    model = astra_ds.load(copy)
    texts = ["tova rebu kide", "pode gubi", "lebu"]
    best = sorted({int(i) for i in model.predict(texts, k=1, exact=True).ids[:, 0]})
    model.retire_labels(ids=best)
    out = astra_ds.inference.export.export(copy, tmp_path / "export")
    card = json.loads((out / "labels" / "card.json").read_text())
    assert card["retired"] == best and card["num_labels"] == 50
    assert np.load(out / "labels" / "label_vectors.npy").shape[0] == 50  # ids stay the run's
    index = faiss.read_index(str(out / "labels" / "index.faiss"))
    _, ids = index.search(astra_ds.load(copy).encode(texts), 5)
    assert not set(ids.ravel().tolist()) & set(best)
    assert ids.tolist() == astra_ds.load(copy).predict(texts, k=5, exact=True).ids.tolist()
