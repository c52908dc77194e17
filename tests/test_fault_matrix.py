"""The fault matrix of the commands on a finished run (predict, eval, index, export, labels add, retire, restore,
finish; training and finalize: tests/test_fault_matrix_train.py): each run with a fault at each of its write points
(tests/faults.py), then the user's next command. Checked each time:

- the previous good state is intact, or the new one is complete and verifies (the run loads, with its old model
  or its new one, never a mix);
- the faulted command says what happened in one line (a full disk names it), and the next command either works or
  says in one line what to run, which then works;
- no temporary file is left that a re-run trips on.

Faults: a full disk at every place in the code that writes, and a kill there (the crash image of tests/faults.py:
the directories as a kill leaves them at that point; the next command runs on the image). A signal (SIGTERM)
outside a training ends the process as a kill does.
"""

import shutil
from pathlib import Path

import pytest

import astra_ds
from astra_ds.cli.main import main
from conftest import TINY_RUN, run_main
from faults import Crashed, Injector, one_line, point_at, sites, temporary_files

UNIFORM = [*TINY_RUN, "negatives.strategy=uniform", "batching.mode=random", "eval.label_text_weight=0.5"]


@pytest.fixture(scope="module")
def run(synth_dir, data_cache, tmp_path_factory):
    """A finished run with dual scoring and a serving index; its checkpoints gone (the commands here do not read
    them), so that each case copies little."""
    out = tmp_path_factory.mktemp("fault_matrix") / "run"
    run_main("train", "--no-eval", *[arg for override in (*UNIFORM, "train.max_steps=2", f"data.path={synth_dir}",
                                                          f"data.cache_dir={data_cache}", f"out_dir={out}")
                                     for arg in ("--set", override)])
    shutil.rmtree(out / "checkpoints")
    return out


def _labels_file(directory: Path) -> Path:
    path = directory / "new_labels.txt"
    path.write_text("fresh\ttova rebu kide\n")
    return path


# command name -> (its arguments, given the run and a scratch directory; the next command; what must then hold)
def _predict(run, scratch):
    return ["predict", "--run-dir", str(run), "--text", "tova rebu", "--out", str(scratch / "top.jsonl")]


def _eval(run, scratch):
    return ["eval", "--run-dir", str(run), "--exact", "--out-dir", str(scratch / "eval")]


def _index(run, scratch):
    return ["index", "--run-dir", str(run)]


def _export(run, scratch):
    return ["export", "--run-dir", str(run), "--out", str(scratch / "exported")]


def _retire(run, scratch):
    return ["labels", "retire", "--run-dir", str(run), "--ids", "3"]


def _add(run, scratch):
    return ["labels", "add", "--run-dir", str(run), "--labels", str(_labels_file(scratch))]


def _restore(run, scratch):
    return ["labels", "restore", "--run-dir", str(run), "--ids", "3"]


def _finish(run, scratch):
    return ["labels", "finish", "--run-dir", str(run)]


COMMANDS = {"predict": _predict, "eval": _eval, "index": _index, "export": _export, "labels retire": _retire,
            "labels add": _add, "labels restore": _restore, "labels finish": _finish}
# the run each command starts from (a fixture): restore, a run with a label retired; finish, one whose `labels add`
# was killed
STARTS = {"labels restore": "retired", "labels finish": "pending"}


@pytest.fixture(scope="module")
def retired(run, tmp_path_factory):
    copy = shutil.copytree(run, tmp_path_factory.mktemp("retired") / "run")
    assert main(_retire(copy, None)) == 0
    return copy


@pytest.fixture(scope="module")
def pending(run, tmp_path_factory):
    """The run as a kill at the last write point of `labels add` leaves it: the change begun, not finished."""
    base = tmp_path_factory.mktemp("pending")
    counted, killed = shutil.copytree(run, base / "count"), shutil.copytree(run, base / "killed")
    with Injector() as counting:
        assert main(_add(counted, base)) == 0
    with pytest.raises(Crashed):
        with Injector("crash", point_at(counting.points, -1), {killed: base / "run"}):
            main(_add(killed, base))
    assert (base / "run" / "labels_change.json").is_file()
    return base / "run"


def _state(run: Path) -> dict:
    """What a user sees of the run: loadable (verified), its labels, retired ones, and what it predicts."""
    model = astra_ds.load(run)
    return {"labels": model.num_labels, "retired": model.retired.tolist(),
            "top": model.predict(["tova rebu kide"], k=3).ids.tolist()}


def _recover(run: Path, capsys) -> dict:
    """The user's next command on the run: it works, or says in one line what to run, which then works; the
    run's state then."""
    try:
        return _state(run)
    except astra_ds.errors.UserError as err:
        message = str(err)
    assert "astra-ds labels finish" in message or "astra-ds index" in message, message
    capsys.readouterr()
    run_main(*(["labels", "finish"] if "labels finish" in message else ["index"]), "--run-dir", str(run))
    return _state(run)


def _next_run(command, copy, scratch, state, before, expected, capsys) -> None:
    """The state is the old or the new one; the command run again does the work still to do, or says in one line
    that it is done."""
    assert state in (before, expected)
    capsys.readouterr()
    status = main(command(copy, scratch))
    err = capsys.readouterr().err
    if state != expected:
        assert status == 0, err
    else:
        assert status == 0 or (status == 2 and err.strip().splitlines()[-1].startswith("astra-ds: error: ")), err
    if before != expected:  # a command that changes the run: it has changed it once
        assert _state(copy) == expected


def _points(command, run, tmp_path, capsys) -> list[str]:
    copy, scratch = shutil.copytree(run, tmp_path / "count" / "run"), tmp_path / "count"
    argv = command(copy, scratch)
    with Injector() as counting:
        assert main(argv) == 0
    capsys.readouterr()
    return counting.points


@pytest.mark.parametrize("name", COMMANDS)
def test_a_full_disk_at_each_write_point(name, request, tmp_path, capsys):
    command, run = COMMANDS[name], request.getfixturevalue(STARTS.get(name, "run"))
    before = None if name == "labels finish" else _state(run)  # a change pending: no model to load
    points = _points(command, run, tmp_path, capsys)
    expected = _state(tmp_path / "count" / "run")  # what the command makes of the run when the disk has room
    assert points, "the command writes nothing?"
    for case_number, at in enumerate(sites(points)):
        case = tmp_path / str(case_number)
        copy, scratch = shutil.copytree(run, case / "run"), case
        killed_change = set(temporary_files(copy))  # a killed change's, which this command need not remove
        capsys.readouterr()
        argv = command(copy, scratch)
        with Injector("full", at):
            status = main(argv)
        line = one_line(capsys, status)
        assert "the disk is full" in line, (at, line)
        left = set(temporary_files(copy, scratch)) - killed_change
        assert not left, (at, left)
        _next_run(command, copy, scratch, _recover(copy, capsys), before, expected, capsys)


# eval and export, which write a temporary file or directory renamed once complete as predict does, are left to the
# full-disk matrix (the suite's time)
@pytest.mark.slow
@pytest.mark.parametrize("name", ["predict", "index", "labels retire", "labels add", "labels restore",
                                  "labels finish"])
def test_a_kill_at_each_write_point(name, request, tmp_path, capsys):
    command, run = COMMANDS[name], request.getfixturevalue(STARTS.get(name, "run"))
    before = None if name == "labels finish" else _state(run)  # a change pending: no model to load
    points = _points(command, run, tmp_path, capsys)
    expected = _state(tmp_path / "count" / "run")
    for case_number, at in enumerate(sites(points)):
        case = tmp_path / str(case_number)
        copy, scratch = shutil.copytree(run, case / "run"), case / "scratch"
        scratch.mkdir()
        image = case / "image"
        argv = command(copy, scratch)
        with pytest.raises(Crashed):
            with Injector("crash", at, {copy: image / "run", scratch: image / "scratch"}):
                main(argv)
        copy, scratch = image / "run", image / "scratch"
        scratch.mkdir(exist_ok=True)
        _next_run(command, copy, scratch, _recover(copy, capsys), before, expected, capsys)  # not tripped by leftovers
