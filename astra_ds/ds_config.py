"""The DeepSpeed config of a run: read, checked against the trainer config, completed.

Batch size and accumulation have one source of truth: keys the DeepSpeed file sets must equal the trainer's
(`train.batch_size`, `train.grad_accum`); keys it leaves out are filled from the trainer config.
"""

from __future__ import annotations

import json
from pathlib import Path

from astra_ds.config import TrainConfig
from astra_ds.errors import ConfigError

DS_CONFIG_DIR = Path(__file__).resolve().parent / "ds_configs"  # package data: shipped with the package


def _config_path(name: str, on_gpu: bool) -> Path:
    """A file path, or the name of a config shipped in astra_ds/ds_configs/."""
    if name == "auto":
        name = "zero2" if on_gpu else "cpu"
    path = Path(name)
    if path.is_file():
        return path
    named = DS_CONFIG_DIR / f"{name}.json"
    if named.is_file():
        return named
    choices = ", ".join(sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json")))
    raise ConfigError(f"train.ds_config={name!r} is neither a file nor one of: {choices}")


def resolve_ds_config(train: TrainConfig, world_size: int, on_gpu: bool) -> tuple[dict, Path]:
    path = _config_path(train.ds_config, on_gpu)
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from None

    per_step = world_size * train.grad_accum
    if train.batch_size % per_step:
        raise ConfigError(f"train.batch_size={train.batch_size} is not divisible by world size {world_size} "
                          f"x train.grad_accum={train.grad_accum}")
    expected = {"train_batch_size": train.batch_size,
                "train_micro_batch_size_per_gpu": train.batch_size // per_step,
                "gradient_accumulation_steps": train.grad_accum}
    for key, value in expected.items():
        if key in config and config[key] != value:
            raise ConfigError(f"{path} sets {key}={config[key]} but the trainer config implies {value} "
                              f"(train.batch_size={train.batch_size}, train.grad_accum={train.grad_accum}, "
                              f"world size {world_size}); make them agree")
        config[key] = value

    if config.get("fp16", {}).get("enabled"):
        raise ConfigError(f"{path} enables fp16, whose loss scaling would also scale the classifier table's "
                          f"gradients; use bf16")
    if not on_gpu and config.get("bf16", {}).get("enabled"):
        raise ConfigError(f"{path} enables bf16, which CPU runs do not use; pick train.ds_config=cpu (or auto)")
    if train.encoder_lr is not None:
        config.setdefault("optimizer", {"type": "AdamW", "params": {}}).setdefault("params", {})["lr"] = train.encoder_lr
    if "optimizer" not in config:
        raise ConfigError(f"{path} sets no optimizer, which DeepSpeed ZeRO needs (as astra_ds/ds_configs/cpu.json: "
                          '"optimizer": {"type": "AdamW", "params": {"lr": 5e-5}}), and train.encoder_lr is unset')
    if (train.encoder_warmup > 0 or train.encoder_decay == "linear") and "scheduler" in config:
        raise ConfigError(f"{path} sets a scheduler, and so do train.encoder_warmup / train.encoder_decay: keep one")
    return config, path


def add_scheduler(config: dict, train: TrainConfig, steps: int) -> None:
    """train.encoder_warmup / encoder_decay over the encoder's `steps` optimizer steps: DeepSpeed's linear warm-up
    to the optimizer's lr (WarmupLR), or warm-up then linear decay to 0 (WarmupDecayLR)."""
    if train.encoder_warmup == 0 and train.encoder_decay == "constant":
        return
    lr = config.get("optimizer", {}).get("params", {}).get("lr", 1e-3)
    params = {"warmup_min_lr": 0.0, "warmup_max_lr": lr, "warmup_type": "linear",
              "warmup_num_steps": max(1, round(train.encoder_warmup * steps))}
    if train.encoder_decay == "constant":
        config["scheduler"] = {"type": "WarmupLR", "params": params}
    else:
        total = max(steps, params["warmup_num_steps"] + 1)
        config["scheduler"] = {"type": "WarmupDecayLR", "params": params | {"total_num_steps": total}}
