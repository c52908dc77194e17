"""Training end to end: the CLI, what a run writes, evaluation, and the step against its definition."""

import json
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import yaml

import astra_ds
from astra_ds.cli.main import main
from astra_ds.rng import Stream, numpy_rng
from conftest import REPO, SHARED_DATA, TINY_RUN, make_trainer, run_cli


def _sets(*pairs: str) -> list[str]:
    return [arg for pair in pairs for arg in ("--set", pair)]


@pytest.mark.slow
def test_train_then_eval_from_the_cli(synth_dir, data_cache, tmp_path):
    out = tmp_path / "run"
    result = run_cli("train", *_sets(*TINY_RUN, f"data.path={synth_dir}", f"data.cache_dir={data_cache}",
                                     f"out_dir={out}", "train.epochs=5"),
                     probe="[m in sys.modules for m in ('deepspeed.runtime.zero.muon.muon_optimizer', "
                           "'torch._inductor.compile_fx')]")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "@1" in result.stdout and "popularity" in result.stdout
    # DeepSpeed's Muon module is imported without compiling (torch's inductor compiler: ~3 s of start-up)
    assert "probe: [True, False]" in result.stderr

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["astra_ds"]["P@1"] > metrics["popularity"]["P@1"] + 0.2  # it learnt the structure
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 80 and log[-1]["loss"] < 0.5 * log[0]["loss"]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["epochs"] == 5 and saved["encoder"]["model"] == "tiny-random"
    assert json.loads((out / "ds_config.json").read_text())["train_batch_size"] == 32
    predictions = sp.load_npz(out / "predictions.npz")
    assert predictions.shape == (128, 50) and np.all(np.diff(predictions.indptr) == 5)

    assert main(["eval", "--run-dir", str(out), "--out-dir", str(tmp_path / "eval")]) == 0
    recomputed = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for name, value in metrics["astra_ds"].items():
        assert recomputed["astra_ds"][name] == pytest.approx(value, abs=1e-6), name


@pytest.mark.slow
def test_train_on_bibtex_from_the_cli(data_cache, tmp_path, capsys, monkeypatch):
    if not (SHARED_DATA / "Bibtex").is_dir():
        pytest.skip("shared Bibtex data not present")
    monkeypatch.chdir(REPO)  # the recipe names its data relative to the checkout
    assert main(["train", "--config", "configs/bibtex.yaml",
                 *_sets(*TINY_RUN, f"data.cache_dir={data_cache}", f"out_dir={tmp_path / 'bibtex'}",
                        "train.max_steps=5", "data.max_len=32")]) == 0
    assert "@1" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "bibtex" / "metrics.json").read_text())
    assert (metrics["num_labels"], metrics["num_test"]) == (159, 2515)


def test_python_overrides_are_the_cli_s_set_values():
    from astra_ds.run import _config

    as_mapping = _config(None, {"train.epochs": 2, "data.path": REPO / "data", "eval.ks": [1, 10], "encoder.dim": None,
                                "table.init": "label_text"})
    as_sets = _config(None, ["train.epochs=2", f"data.path={REPO / 'data'}", "eval.ks=[1, 10]", "encoder.dim=",
                             "table.init=label_text"])
    assert as_mapping == as_sets and as_mapping.train.epochs == 2 and as_mapping.encoder.dim is None
    with pytest.raises(astra_ds.errors.ConfigError, match="pick one"):
        astra_ds.train(None, resume="auto", init_from="runs/x/checkpoints/global_step1")


@pytest.mark.parametrize("args, message", [
    (["train", "--set", "train.epoch=3"], "unknown config key train.epoch "),
    (["train", "--set", "train.epochs=many"], "train.epochs must be an integer"),
    (["train", "--set", "table.optimizer=sgd"], "table.optimizer must be one of rowwise_adagrad, lazy_adam, lazy_sgd, not 'sgd'"),
    (["train", "--config", "no/such.yaml"], "config file not found: no/such.yaml"),
    (["train", "--resume", "auto", "--init-from", "x"], "--resume continues a run, --init-from starts a new one"),
    (["train", "--set", "encoder.model=tiny-random", "--set", "data.path=no/such/dir"],
     "data.path no/such/dir is not a directory"),
    (["train", "--set", "data.path={synth}", "--set", "train.ds_config=zero9"],
     "train.ds_config='zero9' is neither a file nor one of"),
    (["eval", "--run-dir", "no/such/run"], "no run at no/such/run"),
    (["plan", "--world-size", "0"], "--world-size and --ranks-per-host must be >= 1"),
    (["config", "show", "--set", "batching.mode=kmeans"], "batching.mode must be one of random, clustered"),
    (["data", "synth", "--out", "x", "--min-words", "9", "--max-words", "2"], "need 1 <= min_words <= max_words"),
])
def test_user_mistakes_give_one_line_errors(args, message, synth_dir, capsys):
    assert main([arg.format(synth=synth_dir) for arg in args]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0, err
    assert err.startswith("astra-ds: error: ") and message in err


def test_a_choice_that_depends_on_the_encoder_is_refused_at_start_up(synth_dir, data_cache, tmp_path, capsys):
    """index.pq_m must divide the row width (32 for tiny-random): refused before training, not after warm-up."""
    args = _sets(*TINY_RUN, f"data.path={synth_dir}", f"data.cache_dir={data_cache}", f"out_dir={tmp_path}",
                 "negatives.strategy=astra", "index.kind=ivf_pq", "index.pq_m=5")
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "astra-ds: error: index.pq_m=5 must divide the row dimension 32"
    assert not (tmp_path / "train_log.jsonl").exists()


def test_malformed_dataset_gives_one_line_error(synth_dir, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    for path in synth_dir.iterdir():
        if path.is_file():
            (bad / path.name).write_bytes(path.read_bytes())
    (bad / "tst_X_Y.txt").write_text("128 50\n" + "51:1\n" * 128)
    assert main(["train", "--set", f"data.path={bad}", "--set", "encoder.model=tiny-random"]) == 2
    err = capsys.readouterr().err
    assert "tst_X_Y.txt:2: label id 51 out of range [0, 50)" in err and err.strip().count("\n") == 0


def test_data_stats_help_version_and_config_show(synth_dir, capsys):
    assert main(["data", "stats", str(synth_dir)]) == 0
    out = capsys.readouterr().out
    assert "50 labels" in out and "train: 512 queries" in out
    for args in (["train", "--help"], ["--version"]):
        with pytest.raises(SystemExit) as exit_:
            main(args)
        assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--set" in out and "--config" in out and f"astra-ds {astra_ds.__version__}" in out
    assert main(["config", "show", "--config", "configs/synthetic.yaml", "--set", "train.epochs=2"]) == 0
    out = capsys.readouterr().out
    assert "* train.epochs" in out and "* out_dir" in out and "  train.seed" in out


def test_help_answers_before_torch_is_imported():
    """--help and a config mistake never load torch: they answer at once."""
    code = ("import sys; from astra_ds.cli.main import main\n"
            "assert main(['config', 'show', '--set', 'train.epochs=-1']) == 2\n"
            "assert 'torch' not in sys.modules and 'deepspeed' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "train.epochs must be >= 0" in result.stderr


def test_train_step_matches_its_definition(synth_dir, data_cache, tmp_path):
    """One step's loss equals the sampled BCE recomputed densely from the encoder and the table, and only the
    rows of sampled labels change."""
    trainer = make_trainer(synth_dir, data_cache, tmp_path / "a")
    rows = trainer.stages[-1].batches.epoch_batches(0)[0]
    before = trainer.table.rows.clone()
    input_ids, attention_mask = trainer.data.train.batch(rows)
    with torch.no_grad():
        queries, calibration = trainer.engine.module(input_ids, attention_mask)
    rng = numpy_rng(trainer.cfg.train.seed, Stream.NEGATIVES, 0)
    positives = trainer.data.train.labels(rows)
    from astra_ds.negatives.uniform import sample_uniform

    negatives = sample_uniform(positives, trainer.cfg.negatives.num_negatives, rng)
    scores = calibration[0].exp() * queries @ torch.nn.functional.normalize(before, dim=-1).T + calibration[1]
    expected = (torch.nn.functional.softplus(-scores)[torch.from_numpy(positives.toarray()) > 0].sum()
                + sum(torch.nn.functional.softplus(scores[i, negatives.global_ids[i]]).sum()
                      * np.exp(-negatives.log_q[i, 0]) / negatives.global_ids.shape[1] for i in range(len(rows))))
    stats = trainer.stages[-1].step(rows, 0)
    assert stats["loss"] == pytest.approx(expected.item() / len(rows), rel=1e-4)

    changed = set((trainer.table.rows != before).any(1).nonzero().flatten().tolist())
    sampled = set(positives.indices.tolist()) | set(negatives.global_ids.reshape(-1).tolist())
    assert changed and changed <= sampled and stats["rows"] == len(sampled)


def step_side_by_side(reference, other, steps: int, rel: float) -> None:
    """Both trainers take the reference's first `steps` batches; their losses agree within `rel`."""
    for step in range(steps):
        rows = reference.stages[-1].batches.epoch_batches(0)[step]
        expected, got = (trainer.stages[-1].step(rows, step)["loss"] for trainer in (reference, other))
        assert got == pytest.approx(expected, rel=rel)


def test_gradient_accumulation_equals_the_full_batch(synth_dir, data_cache, tmp_path):
    full = make_trainer(synth_dir, data_cache, tmp_path / "full")
    accumulated = make_trainer(synth_dir, data_cache, tmp_path / "acc", "train.grad_accum=2")
    step_side_by_side(full, accumulated, 3, rel=1e-4)
    torch.testing.assert_close(accumulated.table.rows, full.table.rows, rtol=1e-4, atol=1e-6)


def test_bf16_autocast_trains_through_deepspeed_as_float32_does(synth_dir, data_cache, tmp_path):
    """encoder.compute_dtype=bfloat16 under the DeepSpeed engine: the losses of the first steps and the rows they
    train are float32's within bfloat16 precision, and the engine's weights stay float32."""
    full = make_trainer(synth_dir, data_cache, tmp_path / "fp32")
    mixed = make_trainer(synth_dir, data_cache, tmp_path / "bf16", "encoder.compute_dtype=bfloat16")
    step_side_by_side(full, mixed, 3, rel=1e-3)
    assert all(p.dtype == torch.float32 for p in mixed.engine.module.parameters())
    assert not torch.equal(mixed.table.rows, full.table.rows)
    torch.testing.assert_close(mixed.table.rows, full.table.rows, rtol=0, atol=1e-3)  # rows move by 0.2


def test_zero3_trains_and_saves_full_encoder_weights(synth_dir, data_cache, tmp_path):
    """Under ZeRO-3 each rank holds a parameter shard; the saved encoder.pt must hold the full weights."""
    ds_config = tmp_path / "zero3_cpu.json"
    ds_config.write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
                                     "zero_optimization": {"stage": 3}}))
    trainer = make_trainer(synth_dir, data_cache, tmp_path / "z3", f"train.ds_config={ds_config}")
    assert trainer.engine.zero_optimization_stage() == 3
    for step in range(2):
        trainer.stages[-1].step(trainer.stages[-1].batches.epoch_batches(0)[step], step)
    trainer.save_model()

    from astra_ds.encoder.encoder import QueryEncoder

    encoder = QueryEncoder(trainer.cfg.encoder, trainer.table.num_labels)
    encoder.load_state_dict(torch.load(tmp_path / "z3" / "encoder.pt"))
    input_ids, attention_mask = trainer.data.test.tokens.batch(np.arange(8))
    trainer.engine.eval()
    with torch.no_grad():
        expected, _ = trainer.engine(input_ids, attention_mask)
        got, _ = encoder.eval()(input_ids, attention_mask)
    torch.testing.assert_close(got, expected)
