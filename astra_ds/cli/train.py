"""`astra-ds train` and `astra-ds finalize`: a run trained into its directory, or its checkpoint published."""

from __future__ import annotations

import logging
from pathlib import Path

from astra_ds.cli.arguments import config_arguments
from astra_ds.config import load_config
from astra_ds.errors import UserError
from astra_ds.libraries import quiet_libraries
from astra_ds.training.start import check_start_options

log = logging.getLogger("astra_ds")


def cmd_train(args) -> None:
    cfg = load_config(args.config, args.set)  # before torch is imported: a config mistake answers at once
    check_start_options(args.resume, args.init_from)
    if not Path(cfg.data.path).is_dir():
        raise UserError(f"data.path {cfg.data.path} is not a directory (a dataset is a directory of files)")
    from astra_ds.run import train

    train(cfg, resume=args.resume, init_from=args.init_from, evaluate=not args.no_eval, overwrite=args.overwrite,
          allow_changes=args.allow_changes)


def cmd_finalize(args) -> None:
    from astra_ds.rundir.run_dir import RunDir

    run = RunDir(args.run_dir)
    if not run.has_run():
        raise UserError(f"{run} holds no run ({RunDir.config} is missing)")
    cfg = run.read_config(args.set)
    cfg.out_dir = str(run)  # where the run is now, wherever it was trained
    quiet_libraries()
    from astra_ds.run import train
    from astra_ds.training.checkpoint import CheckpointManager, check_checkpoint

    checkpoint = Path(args.checkpoint) if args.checkpoint else CheckpointManager(cfg.checkpoint, run, 0,
                                                                                 1).resolve("auto")
    if checkpoint is None:
        raise UserError(f"{run} has no checkpoint to publish")
    step = check_checkpoint(checkpoint)["step"]
    cfg.train.max_steps = step  # resumed there, and trained no further
    train(cfg, resume=str(checkpoint), evaluate=not args.no_eval)
    log.info("%s is a finished run: the model of %s (step %d)", run, checkpoint.name, step)


def add_commands(commands) -> None:
    train = commands.add_parser("train", help="train a model, then evaluate it",
                                description="Train the encoder (DeepSpeed) and the classifier table, save them in "
                                            "out_dir, then evaluate on the test split.")
    config_arguments(train)
    train.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    train.add_argument("--resume", metavar="auto|PATH",
                       help="continue a run from a checkpoint: auto = the latest one in checkpoint.dir (start "
                            "from scratch if there is none), or a global_step<N> directory; any number of ranks")
    train.add_argument("--init-from", metavar="PATH",
                       help="start a new run from a finished run directory (its encoder, and its rows with their "
                            "optimizer state, matched to this dataset's labels by name; new labels start from their "
                            "texts) or from a checkpoint's weights (encoder and rows of the same labels, fresh "
                            "optimizer states)")
    train.add_argument("--overwrite", action="store_true",
                       help="out_dir holds an earlier run: delete it (model, checkpoints, evaluations) and start "
                            "a new one there (without this, such an out_dir is refused)")
    train.add_argument("--allow-changes", action="store_true",
                       help="with --resume: accept settings that differ from the checkpoint's in ways that change "
                            "the steps to come (batch size, learning rates, ...); the changes are logged")
    train.set_defaults(func=cmd_train)

    finalize = commands.add_parser(
        "finalize", help="publish a checkpoint of a run as its finished model",
        description="A run killed or stopped before it saved its model is not a finished run (predict, eval and "
                    "export refuse it). This publishes its newest checkpoint that verifies (or --checkpoint) as the "
                    "run's model, as training would have at that step: the validation choices, the model files, "
                    "the evaluation on the test split and the serving index. It reads the run's dataset.")
    finalize.add_argument("--run-dir", required=True, help="out_dir of the run")
    finalize.add_argument("--checkpoint", metavar="PATH", help="a global_step<N> directory (default: the newest "
                                                               "that verifies)")
    finalize.add_argument("--no-eval", action="store_true", help="skip the evaluation on the test split")
    finalize.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                          help="override a key of the run's config (those a resume may change)")
    finalize.set_defaults(func=cmd_finalize)
