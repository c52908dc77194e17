"""The memory plan: its parts by hand, its total against a real run's peak RSS, and the refusal of a run that
does not fit."""

import json
import re

import pytest

from astra_ds.cli.main import main
from astra_ds.config import load_config
from astra_ds.data.synth import SynthConfig, generate
from astra_ds.index.kinds import index_bytes
from astra_ds.plan import GiB, encoder_state_bytes
from conftest import run_cli

MB = 2**20


def test_encoder_state_under_each_zero_stage():
    params, ranks = 1000, 4
    assert encoder_state_bytes(params, 0, ranks, False) == {"weights": 4000, "grads": 4000, "master": 4000, "adam": 8000}
    # stages 1 and 2 shard the master copy and Adam; the partition's reduced gradients sit beside the full ones
    assert encoder_state_bytes(params, 2, ranks, False) == {"weights": 4000, "grads": 5000, "master": 1000, "adam": 2000}
    assert encoder_state_bytes(params, 3, ranks, False) == {"weights": 1000, "grads": 1000, "master": 1000, "adam": 2000}
    assert encoder_state_bytes(params, 3, ranks, True) == {"weights": 500, "grads": 500, "master": 1000, "adam": 2000}


def test_index_bytes_by_kind():
    cfg = load_config(None, ["index.nlist=100", "index.pq_m=8"])
    cfg.index.kind = "flat"
    assert index_bytes(cfg.index, 10_000, 32) == (10_000 * 128, "flat")
    cfg.index.kind = "ivf_pq"  # 8 code bytes + an 8-byte id a row, list slack, centroids, codebooks
    assert index_bytes(cfg.index, 10_000, 32) == (int(10_000 * 16 * 1.25) + 100 * 128 + 256 * 128, "ivf_pq, 100 lists")


@pytest.fixture(scope="module")
def million_labels(tmp_path_factory):
    return generate(SynthConfig(num_labels=1_000_000, num_train=512, num_test=64, vocab_size=500, label_texts=False),
                    tmp_path_factory.mktemp("data") / "million")


def _run_sets(data, data_cache, out, *overrides):
    sets = [f"data.path={data}", f"data.cache_dir={data_cache}", f"out_dir={out}", "encoder.model=tiny-random",
            "encoder.dim=128", "data.max_len=16", "train.batch_size=32", "train.max_steps=3",
            "negatives.strategy=astra", "negatives.warmup_epochs=0", "index.kind=flat", *overrides]
    return [arg for s in sets for arg in ("--set", s)]


@pytest.mark.slow
def test_plan_is_within_15_percent_of_the_peak_rss(million_labels, data_cache, tmp_path):
    """A run whose table and index dominate its memory: trains, checkpoints, evaluates; its peak RSS is
    measured by the kernel (ru_maxrss)."""
    result = run_cli("train", *_run_sets(million_labels, data_cache, tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    memory = json.loads((tmp_path / "run" / "memory.json").read_text())
    plan, peak = memory["plan_host_bytes"], memory["peak_rss_bytes"]
    parts = {line["component"]: line["host"] for line in memory["plan"]}
    assert parts["table rows"] == 1_000_000 * 128 * 4 and parts["index"] == 1_000_000 * 128 * 4
    assert parts["table rows"] + parts["index"] > 0.45 * plan  # not a plan of the interpreter alone
    # never more than 15% under the peak; over it by up to 20% (measured: 17% since the serving index is built
    # after the training state is let go, the index rebuild phase being the plan's largest)
    assert -0.15 * peak <= plan - peak <= 0.20 * peak, f"plan {plan / GiB:.2f} GiB, peak RSS {peak / GiB:.2f} GiB"


def test_a_run_that_does_not_fit_is_refused_with_what_to_change(million_labels, data_cache, tmp_path, capsys):
    # 1M rows x 100k dims: 400 GB of float32 rows
    sets = _run_sets(million_labels, data_cache, tmp_path / "run", "encoder.dim=100000")
    assert main(["train", *sets]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("astra-ds: error: this run needs") and "\n" not in error
    assert "table.dtype=bfloat16 (saves 186.3 GiB)" in error and "index.kind=ivf_pq" in error
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before anything was built

    assert main(["plan", *sets]) == 2
    output = capsys.readouterr()
    assert "does NOT fit" in output.out and "table.dtype=bfloat16" in output.err


def test_plan_splits_the_table_over_ranks(million_labels, data_cache, tmp_path, capsys):
    sets = _run_sets(million_labels, data_cache, tmp_path / "run", "table.dtype=bfloat16", "table.chunk_mb=1")
    outputs = {}
    for world in (1, 4):
        assert main(["plan", *sets, "--world-size", str(world)]) == 0
        outputs[world] = capsys.readouterr().out
    rows = {w: next(line for line in out.splitlines() if line.startswith("table rows")) for w, out in outputs.items()}
    assert "1,000,000 of 1,000,000 rows x 128 x bfloat16" in rows[1]
    assert "253,952 of 1,000,000 rows" in rows[4]  # whole 4,096-row chunks: 62 of 245 on rank 0
    assert "fits" in outputs[1]


def test_the_plan_counts_each_stage_s_step_as_a_phase_and_the_frozen_embeddings():
    from astra_ds.encoder.encoder import QueryEncoder
    from astra_ds.plan import DataShape, activation_bytes, plan_run

    shape = DataShape(num_labels=1000, num_train=20_000, num_test=100, positives_per_query=4.0)

    def plan(*overrides):
        cfg = load_config(None, ["encoder.model=tiny-random", "train.batch_size=64", *overrides])
        encoder = QueryEncoder(cfg.encoder, shape.num_labels)
        memory = plan_run(cfg, shape, encoder, 2, 0, False, 0)
        return {line.component: line for line in memory.resident + memory.phases}, encoder, cfg

    joint, encoder, cfg = plan("siamese.epochs=0", "classifier.epochs=0", "classifier.refit_epochs=0")
    num_params = sum(p.numel() for p in encoder.parameters())
    optimizer_step = 3 * num_params * 4 // 2  # the flat fp32 gradient partition and AdamW's two temporaries
    queries = activation_bytes(encoder, 32, cfg.data.max_len)
    assert joint["joint step"].host - queries - optimizer_step > 0  # and the rows the step fetches
    assert {"Siamese step", "classifier step", "frozen query embeddings", "label-text embeddings"}.isdisjoint(joint)
    staged, _, _ = plan("siamese.epochs=1", "classifier.epochs=2", "eval.label_text_weight=0.5")
    # 2 ranks: each encodes its 32 queries and half of the ~64 x 4 labels of the global micro-batch
    assert staged["Siamese step"].host == (queries + activation_bytes(encoder, 128, cfg.siamese.label_max_len)
                                           + optimizer_step)
    assert staged["joint step"].host == joint["joint step"].host
    assert staged["joint step"].host - queries - optimizer_step == staged["classifier step"].host  # fetched rows
    assert staged["frozen query embeddings"].host == 20_000 * encoder.dim * 4
    assert staged["label-text embeddings"].host == staged["table rows"].host  # this rank's rows, float32


def test_plan_without_the_dataset_and_for_gpus_from_a_machine_without_one(tmp_path, capsys):
    args = ["plan", "--set", "encoder.model=tiny-random", "--set", f"data.path={tmp_path / 'elsewhere'}", "--set",
            "table.chunk_mb=1",
            "--num-labels", "1000000", "--num-train", "3000000", "--num-test", "100000", "--world-size", "8",
            "--ranks-per-host", "8", "--gpu"]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0].split()[-2:] == ["host", "GPU"] and "ZeRO-2 (zero2.json)" in result.stdout
    rows = int(re.search(r"([\d,]+) of 1,000,000 rows", result.stdout).group(1).replace(",", ""))
    assert abs(rows - 1_000_000 / 8) < 8192 and lines[-1].startswith("a host: 8 rank(s) x plan = ")
    assert main([*args[:7], "--num-labels", "10"]) == 2  # answered before the libraries load
    assert "--num-labels, --num-train and --num-test go together" in capsys.readouterr().err


def test_features_that_hold_a_value_per_training_query_are_refused_above_max_held_queries(synth_dir, data_cache,
                                                                                           tmp_path, capsys):
    sets = [f"data.path={synth_dir}", f"data.cache_dir={data_cache}", f"out_dir={tmp_path / 'run'}",
            "encoder.model=tiny-random", "train.batch_size=32", "batching.mode=clustered", "classifier.epochs=1",
            "data.max_held_queries=500"]
    assert main(["train", *[arg for s in sets for arg in ("--set", s)]]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and (
        "512 training queries are over data.max_held_queries=500, and frozen query embeddings, NGAME query "
        "embeddings hold a value per training query in memory: set classifier.epochs=0 and "
        "classifier.refit_epochs=0; batching.mode=random, or raise data.max_held_queries if the plan fits") in error
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())
