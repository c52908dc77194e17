import dataclasses
import json
import typing

import pytest

from astra_ds import choices
from astra_ds import config as config_module
from astra_ds.config import ConfigError, RunConfig, describe, load_config
from astra_ds.ds_config import resolve_ds_config
from astra_ds.index.kinds import IndexKind, check_index_config
from astra_ds.negatives.base import NegativeSampler
from astra_ds.table.optim import RowSparseOptimizer
from astra_ds.training.batching import RandomBatches
from astra_ds.training.stages import Stage
from conftest import REPO


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
    (tmp_path / "config.yaml").write_text(cfg.to_yaml())
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize("override, message", [
    ("nope.x=1", "unknown config key nope"),
    ("train=3", "train must be a mapping"),
    ("table.normalize_rows=maybe", "table.normalize_rows must be true or false"),
    ("train.batch_size=0", "train.batch_size must be >= 1"),
    ("eval.ks=[0]", "eval.ks must be positive"),
    ("data.format=csv", "data.format must be one of auto, raw_text, bow, pairs, xc_json, xc_parquet, not 'csv'"),
    ("negatives.strategy=hard", "negatives.strategy must be one of uniform, astra, not 'hard'"),
    ("index.kind=lsh", "index.kind must be one of auto, flat, hnsw, ivf_flat, ivf_pq"),
    ("index.pq_m=0", "index.pq_m must be >= 1"),
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


@pytest.mark.parametrize("alias, registry, extra, base", [
    ("DataFormat", choices.READERS, ("auto",), None), ("TableOptimizer", choices.OPTIMIZERS, (), RowSparseOptimizer),
    ("SamplerName", choices.SAMPLERS, (), NegativeSampler), ("IndexKind", choices.INDEX_KINDS, ("auto",), IndexKind),
    ("TableInit", choices.TABLE_INITS, (), None), ("ShortlistMode", choices.SHORTLISTS, (), None),
    ("BatchingMode", choices.BATCHING, (), RandomBatches),
])
def test_config_choices_are_the_registries_names_and_each_entry_imports(alias, registry, extra, base):
    assert typing.get_args(getattr(config_module, alias)) == (*extra, *registry.names)
    for name in registry.names:
        entry = registry.get(name)
        assert callable(entry) and (base is None or issubclass(entry, base)), name


def test_stages_are_known_by_their_registry_name_and_each_has_its_own_random_stream():
    stages = [choices.STAGES.get(name) for name in choices.STAGES.names]
    assert all(issubclass(stage, Stage) for stage in stages)
    assert [stage.name for stage in stages] == list(choices.STAGES.names)
    streams = [stage.stream for stage in stages]
    assert len(set(streams)) == len(streams) and min(streams) >= 0
    # the streams the stages drew from when their random stream was their position: checkpoints stay valid
    assert dict(zip(choices.STAGES.names, streams)) == {"siamese": 0, "classifier": 1, "joint": 2, "refit": 3}


def test_no_module_compares_a_choice_by_its_name_outside_its_owner():
    """A choice is branched on only inside the component that owns it (its registered class)."""
    import pathlib
    import re

    package = pathlib.Path(choices.__file__).parent
    names = {name for registry in vars(choices).values() if isinstance(registry, choices.Registry)
             for name in registry.names}
    pattern = re.compile(r"[=!]= *[\"'](" + "|".join(sorted(names)) + r")[\"']|[\"'](" + "|".join(sorted(names))
                         + r")[\"'] *[=!]=")
    offenders = [f"{path.relative_to(package)}:{n}" for path in package.rglob("*.py")
                 for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []


def test_choices_that_depend_on_the_row_width_are_checked():
    check_index_config(load_config(None, ["index.pq_m=8"]).index, 32)
    with pytest.raises(ConfigError, match="index.pq_m=5 must divide the row dimension 32"):
        check_index_config(load_config(None, ["index.pq_m=5"]).index, 32)


def test_describe_lists_every_key_with_default_and_effective_value():
    lines = describe(load_config(None, ["train.epochs=3"])).splitlines()
    rows = {line[2:].split()[0]: (line[0], line[2:].split()[1:]) for line in lines[1:]}
    assert len(rows) == len(config_module.flat_items(RunConfig()))
    assert rows["train.epochs"] == ("*", ["1", "3"]) and rows["train.batch_size"] == (" ", ["64", "64"])
    assert rows["eval.ks"] == (" ", ["[1,", "3,", "5]", "[1,", "3,", "5]"])


def test_the_recipes_are_one_family_that_differs_in_paths_and_sizes():
    """configs/recipe/*.yaml load, and differ only in where the data and the run are and in sizes (query length,
    the validation share)."""
    sized = {"out_dir", "data.path", "data.max_len", "data.validation_fraction"}

    def settings(path) -> dict:
        flat = {}
        for section, values in dataclasses.asdict(load_config(path)).items():
            items = values.items() if isinstance(values, dict) else [(None, values)]
            flat |= {f"{section}.{key}" if key else section: value for key, value in items}
        return {key: value for key, value in flat.items() if key not in sized}

    recipes = sorted((REPO / "configs" / "recipe").glob("*.yaml"))
    assert len(recipes) == 3
    for path in recipes[1:]:
        assert settings(path) == settings(recipes[0]), path
