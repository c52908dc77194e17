import json

import pytest

from astra_ds.config import ConfigError, RunConfig, load_config
from astra_ds.train.ds_config import resolve_ds_config


def test_defaults_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 3\n  batch_size: 16\ntable:\n  lr: 0.5\n")
    cfg = load_config(path, ["train.epochs=4", "encoder.dim=64", "train.max_steps=", "eval.ks=[1, 10]",
                             "table.lr=1e-3"])
    assert cfg.train.epochs == 4 and cfg.train.batch_size == 16 and cfg.table.lr == 1e-3
    assert cfg.encoder.dim == 64 and cfg.train.max_steps is None and cfg.eval.ks == [1, 10]
    assert cfg.negatives == RunConfig().negatives


def test_saved_config_loads_back(tmp_path):
    cfg = load_config(None, ["train.seed=7", "table.optimizer=lazy_adam"])
    cfg.save(tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize("override, message", [
    ("nope.x=1", "unknown config key nope"),
    ("train=3", "train must be a mapping"),
    ("table.normalize_rows=maybe", "table.normalize_rows must be true or false"),
    ("train.batch_size=0", "train.batch_size must be >= 1"),
    ("eval.ks=[0]", "eval.ks must be positive"),
    ("data.format=csv", "data.format must be"),
    ("epochs", "--set expects key=value"),
])
def test_bad_values_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_ds_config_is_checked_against_the_trainer_config(tmp_path):
    train = load_config(None, ["train.batch_size=32", "train.grad_accum=2"]).train
    config, _ = resolve_ds_config(train, world_size=2, on_gpu=False)
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"],
            config["gradient_accumulation_steps"]) == (32, 8, 2)
    assert config["zero_optimization"]["stage"] == 2  # the CPU default is ZeRO-2

    mismatched = tmp_path / "ds.json"
    mismatched.write_text(json.dumps({"train_batch_size": 64}))
    train.ds_config = str(mismatched)
    with pytest.raises(ConfigError, match="sets train_batch_size=64 but the trainer config implies 32"):
        resolve_ds_config(train, 2, False)
    train.ds_config = "zero2"
    with pytest.raises(ConfigError, match="enables bf16, which CPU runs do not use"):
        resolve_ds_config(train, 1, False)
    assert resolve_ds_config(train, 1, True)[0]["bf16"]["enabled"]
    train.ds_config, train.batch_size = "cpu", 30
    with pytest.raises(ConfigError, match="not divisible"):
        resolve_ds_config(train, 4, False)
