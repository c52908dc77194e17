"""The encoder under DeepSpeed: the engine, its full weights, and the engine as a checkpoint component."""

from __future__ import annotations

import importlib
from pathlib import Path

from astra_ds.files import check_only_tensors
from astra_ds.libraries import DEEPSPEED_MUON, import_uncompiled
from astra_ds.encoder.encoder import QueryEncoder
from astra_ds.training.checkpoint import convert_encoder_to_universal

ZERO_TAG = "zero"  # the DeepSpeed checkpoint tag inside the checkpoint's encoder/ directory


def build_engine(encoder: QueryEncoder, ds_config: dict):
    import deepspeed

    if "muon" not in str(ds_config.get("optimizer", {}).get("type", "")).lower():
        import_uncompiled(DEEPSPEED_MUON)  # ZeRO imports it to check the optimizer's type: ~3 s of compiler
    engine, _, _, _ = deepspeed.initialize(
        model=encoder, model_parameters=[p for p in encoder.parameters() if p.requires_grad], config=ds_config)
    return engine


def encoder_state_dict(engine) -> dict | None:
    """Full encoder weights (on rank 0 under ZeRO-3, where each rank holds a shard)."""
    if engine.zero_optimization_stage() == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}


class EngineCheckpoint:
    """The DeepSpeed engine (weights, ZeRO optimizer shards, scheduler) as a checkpoint component. Loaded on
    another number of ranks, it goes through DeepSpeed's universal checkpoint (the engine must have been built
    with `checkpoint.load_universal`)."""

    def __init__(self, engine, rank: int):
        self.engine, self.rank = engine, rank

    def save_files(self, directory: Path, previous: Path | None) -> None:
        from deepspeed.checkpoint import UNIVERSAL_CHECKPOINT_INFO

        self.engine.save_checkpoint(str(directory), tag=ZERO_TAG, client_state={UNIVERSAL_CHECKPOINT_INFO: {}},
                                    save_latest=False)

    def load_files(self, directory: Path, resharded: bool) -> None:
        _check_zero_files(directory / ZERO_TAG)
        tag = convert_encoder_to_universal(directory, ZERO_TAG, self.rank) if resharded else ZERO_TAG
        self.engine.load_checkpoint(str(directory), tag=tag, load_optimizer_states=True,
                                    load_lr_scheduler_states=True)

    def load_weights(self, directory: Path) -> None:
        _check_zero_files(directory / ZERO_TAG)
        self.engine.load_checkpoint(str(directory), tag=ZERO_TAG, load_module_only=True,
                                    load_optimizer_states=False, load_lr_scheduler_states=False)



def _check_zero_files(directory: Path) -> None:
    """DeepSpeed unpickles its files in full: refuse them first if they name anything but tensors, containers and
    DeepSpeed's own classes (its loss scaler, enums, fragment addresses), never a function or another module's."""
    for path in sorted(directory.rglob("*.pt")):
        check_only_tensors(path, allowed=_is_deepspeed_class)


def _is_deepspeed_class(name: str) -> bool:
    module, _, attribute = name.rpartition(".")
    if not module.startswith("deepspeed."):
        return False
    try:
        return isinstance(getattr(importlib.import_module(module), attribute), type)
    except (ImportError, AttributeError):
        return False
