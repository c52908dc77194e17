"""astra-ds: train, evaluate and manage data for extreme classification.

    astra-ds data synth --out data/synthetic            write the default synthetic dataset
    astra-ds data stats data/synthetic                  summarise a dataset (any layout)
    astra-ds train --config configs/synthetic.yaml      train, then evaluate on the test split
    astra-ds eval --run-dir runs/synthetic              evaluate a finished run again
    astra-ds plan --config configs/synthetic.yaml       memory per rank, and whether the run fits
    astra-ds config show --config configs/synthetic.yaml   every key: its default and effective value

Several ranks (see launchers/ and the README): `deepspeed --module astra_ds train ...`, `mpirun -np N python -m
astra_ds train ...`, or `srun` in launchers/slurm.sbatch.

Config: YAML (see configs/), every key overridable with --set section.key=value; the effective config is
saved as <out_dir>/config.yaml.
"""

# torch, DeepSpeed and transformers are imported inside the commands that use them: --help, --version and config
# mistakes answer at once.

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

from astra_ds import __version__
from astra_ds.config import describe, load_config
from astra_ds.data import READERS
from astra_ds.data.synth import SynthConfig
from astra_ds.errors import ConfigError, UserError
from astra_ds.launch import discover_launch

log = logging.getLogger("astra_ds")


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models are never downloaded
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # it reports each CPU variant it tries


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(message)s", datefmt="%H:%M:%S")


# ---- commands -------------------------------------------------------------------------------------------------

def cmd_train(args) -> None:
    if args.resume and args.init_from:
        raise ConfigError("--resume continues a run, --init-from starts a new one from its weights: pick one")
    cfg = load_config(args.config, args.set)
    from astra_ds.dist import configure_accelerator

    configure_accelerator()
    _quiet_libraries()
    from astra_ds.plan import report_memory
    from astra_ds.train.trainer import Trainer

    trainer = Trainer(cfg, resume=args.resume, init_from=args.init_from)
    trainer.fit()
    trainer.save_model()
    if not args.no_eval:
        trainer.evaluate()
        log.info("metrics written to %s", trainer.run_dir / "metrics.json")
    report_memory(trainer.memory_plan, trainer.run_dir, trainer.dist.is_main)


def cmd_plan(args) -> None:
    cfg = load_config(args.config, args.set)
    if args.world_size < 1 or args.ranks_per_host < 1:
        raise ConfigError("--world-size and --ranks-per-host must be >= 1")
    from astra_ds.dist import configure_accelerator

    configure_accelerator()
    _quiet_libraries()
    import deepspeed  # noqa: F401  (held by every training process: the measured part of the plan includes it)
    import torch

    from astra_ds.build import build_data, build_encoder
    from astra_ds.negatives import SAMPLERS
    from astra_ds.plan import GiB, advice, available_host_bytes, plan_run, process_bytes

    _, data = build_data(cfg)
    SAMPLERS.get(cfg.negatives.strategy).import_dependencies()
    held = process_bytes()
    encoder = build_encoder(cfg, data.dataset.num_labels)
    plan = plan_run(cfg, data, encoder, args.world_size, 0, torch.cuda.is_available(), held)
    print(plan.format())
    per_host = min(args.ranks_per_host, args.world_size)
    need = per_host * plan.to_allocate() + held  # shown with this process's own part
    available = available_host_bytes() + held
    print(f"\nthis host: {per_host} rank(s) x plan = {need / GiB:.2f} GiB of {available / GiB:.2f} GiB available: "
          + ("fits" if need <= available else "does NOT fit"))
    if need > available:
        raise ConfigError(f"the run does not fit this host's memory. {advice(plan)}")


def cmd_eval(args) -> None:
    _quiet_libraries()
    from astra_ds.build import load_trained
    from astra_ds.eval.evaluate import evaluate
    from astra_ds.eval.metrics import format_table
    from astra_ds.eval.predict import encode_queries

    progress = sys.stderr.isatty()
    model = load_trained(args.run_dir, args.set, progress)
    out_dir = Path(args.out_dir) if args.out_dir else Path(args.run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    queries, calibration = encode_queries(model.encoder, model.data.test_tokens, model.cfg.eval.batch_size,
                                          model.table.device, progress)
    results = evaluate(queries, calibration, model.table, model.data.dataset.test.labels,
                       model.data.dataset.train.labels, model.cfg.eval, model.cfg.table.normalize_rows, out_dir,
                       model.label_embeddings, progress)
    print(format_table(results, model.cfg.eval.ks))


def cmd_config_show(args) -> None:
    print(describe(load_config(args.config, args.set)))


def cmd_synth(args) -> None:
    from astra_ds.data.synth import generate

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(SynthConfig)}
    try:
        cfg = SynthConfig(**values)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    out = generate(cfg, args.out, exist_ok=args.exist_ok)
    print(f"dataset at {out}: {cfg.num_train} train / {cfg.num_test} test queries over {cfg.num_labels} labels")


def cmd_stats(args) -> None:
    import numpy as np

    from astra_ds.data.readers import read_dataset

    dataset = read_dataset(args.path, args.format)
    print(f"dataset {dataset.name}: {dataset.num_labels} labels, label texts: "
          f"{'yes' if dataset.label_texts is not None else 'no'}")
    for name, split in (("train", dataset.train), ("test", dataset.test)):
        per_point = np.diff(split.labels.indptr)
        per_label = np.asarray((split.labels != 0).sum(axis=0)).ravel()
        words = np.array([len(t.split()) for t in split.texts])
        print(f"  {name}: {len(split.texts)} queries, {split.labels.nnz} positives | labels/query "
              f"mean {per_point.mean():.2f} max {per_point.max()} | queries without labels {(per_point == 0).sum()} "
              f"| queries/label mean {per_label.mean():.2f} max {per_label.max()} | labels never seen "
              f"{(per_label == 0).sum()} | words/query mean {words.mean():.1f} max {words.max()}")


# ---- parser ---------------------------------------------------------------------------------------------------

def _synth_arguments(parser: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(SynthConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            kind = {"int": int, "float": float}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)
            parser.add_argument(flag, dest=f.name, type=kind, default=f.default, help=f"(default {f.default})")


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML run config (defaults apply to keys it leaves out)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.epochs=3 (repeatable)")


def _command_group(commands, name: str, help_text: str):
    """A command with subcommands of its own (`astra-ds data synth`)."""
    return commands.add_parser(name, help=help_text).add_subparsers(dest=f"{name}_command", required=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="astra-ds", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # the deepspeed launcher passes --local_rank=N before the command; LOCAL_RANK in the environment says the same
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--version", action="version", version=f"astra-ds {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a model, then evaluate it",
                                description="Train the encoder (DeepSpeed) and the classifier table, save them in "
                                            "out_dir, then evaluate on the test split.")
    _config_arguments(train)
    train.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    train.add_argument("--resume", metavar="auto|PATH",
                       help="continue a run from a checkpoint: auto = the latest one in checkpoint.dir (start "
                            "from scratch if there is none), or a global_step<N> directory; any number of ranks")
    train.add_argument("--init-from", metavar="PATH",
                       help="start a new run from a checkpoint's weights (encoder, classifier rows), with fresh "
                            "optimizer states")
    train.set_defaults(func=cmd_train)

    evaluate = commands.add_parser("eval", help="evaluate a trained run",
                                   description="Recompute predictions and metrics of a finished run.")
    evaluate.add_argument("--run-dir", required=True, help="out_dir of a finished `astra-ds train`")
    evaluate.add_argument("--out-dir", help="where metrics.json and predictions.npz go (default: the run dir)")
    evaluate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                          help="override a key of the run's config, e.g. --set data.path=other/data")
    evaluate.set_defaults(func=cmd_eval)

    plan = commands.add_parser("plan", help="memory per rank of a run, and whether it fits this host",
                               description="Bytes per rank for the classifier table and its optimizer state, "
                                           "the encoder under its ZeRO stage, the index, staging buffers and "
                                           "evaluation, from the run's config and data. `train` checks the same "
                                           "plan at start-up and refuses a run that does not fit.")
    _config_arguments(plan)
    plan.add_argument("--world-size", type=int, default=1, help="ranks of the run (the table is split over them)")
    plan.add_argument("--ranks-per-host", type=int, default=1, help="ranks that share this host's memory")
    plan.set_defaults(func=cmd_plan)

    show = _command_group(commands, "config", "inspect run configs").add_parser("show", help="every config key with its default and effective value",
                                      description="Print every key of the run config: its default, and its value "
                                                  "after the YAML file and --set overrides (* marks the changed ones).")
    _config_arguments(show)
    show.set_defaults(func=cmd_config_show)

    data_commands = _command_group(commands, "data", "create or inspect datasets")
    synth = data_commands.add_parser("synth", help="write a synthetic text XC dataset (raw-text layout)",
                                     description="Labels are topics over pseudo-words; queries are noisy word "
                                                 "draws from 1-5 labels. Streams to disk at any number of labels.")
    synth.add_argument("--out", required=True, help="output directory (must not exist)")
    synth.add_argument("--exist-ok", action="store_true",
                       help="keep --out if it already holds a dataset generated with the same settings")
    _synth_arguments(synth)
    synth.set_defaults(func=cmd_synth)
    stats = data_commands.add_parser("stats", help="summarise a dataset")
    stats.add_argument("path", help="dataset directory")
    stats.add_argument("--format", default="auto", choices=["auto", *READERS.names])
    stats.set_defaults(func=cmd_stats)
    return parser


def _end_rank(code: int, multi_rank: bool) -> int:
    """In a multi-rank run a failed rank exits at once (the launcher then stops the others), rather than
    returning through interpreter shutdown, which can wait on peers that wait on it."""
    if multi_rank:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _message(err: Exception) -> str:
    """One line for a user mistake; an OS error by its text and path, not its number."""
    if isinstance(err, OSError) and err.strerror:
        return f"{err.strerror}: {err.filename}" if err.filename else err.strerror
    return str(err.args[0]) if isinstance(err, OSError) and err.args else str(err)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        discover_launch()  # rank and world size, for the log lines, from the launcher, MPI or SLURM
    _setup_logging()
    rank, multi_rank = os.environ.get("RANK", "0"), int(os.environ.get("WORLD_SIZE", "1")) > 1
    try:
        args.func(args)
    except (UserError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError) as err:
        print(f"astra-ds: error: {_message(err)}", file=sys.stderr)
        return _end_rank(2, multi_rank)
    except BrokenPipeError:  # the output was piped into `head` and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except Exception as err:
        if not multi_rank:
            raise
        hint = ""
        if "timed out" in str(err).lower() or "timeout" in type(err).__name__.lower():
            hint = (" (a collective timed out after train.collective_timeout_s: another rank probably failed, "
                    "see its error, or is stuck)")
        log.exception("rank %s failed%s", rank, hint)
        return _end_rank(1, multi_rank)
    return 0


if __name__ == "__main__":
    sys.exit(main())
