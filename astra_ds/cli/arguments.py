"""Arguments and checks that several commands share: a config with overrides, a finished run, a fresh output."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from astra_ds.errors import UserError


def config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML run config (defaults apply to keys it leaves out)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.epochs=3 (repeatable)")


def run_command(commands, name: str, func, help_text: str, description: str, output: str | None = None):
    """A command that reads a finished run (see run_arguments)."""
    parser = commands.add_parser(name, help=help_text, description=description)
    parser.set_defaults(func=func)
    run_arguments(parser, output)
    return parser


def run_arguments(parser: argparse.ArgumentParser, output: str | None = None) -> None:
    """--run-dir and --set of the commands that read a finished run; for those that search it and write `output`,
    --exact and --overwrite."""
    parser.add_argument("--run-dir", required=True, help="out_dir of a finished `astra-ds train`")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the run's config, e.g. --set index.nprobe=64")
    if output:
        parser.add_argument("--exact", action="store_true", help="exact search over the rows, not the serving index")
        parser.add_argument("--overwrite", action="store_true", help=f"replace {output} when it exists")


def command_group(commands, name: str, help_text: str):
    """A command with subcommands of its own (`astra-ds data synth`)."""
    return commands.add_parser(name, help=help_text).add_subparsers(dest=f"{name}_command", required=True)


def finished_run(run_dir: str) -> Path:
    """--run-dir, refused at once (before the libraries load) when it is not a finished run; its digests are
    checked when the model loads."""
    from astra_ds.rundir.run_dir import RunDir

    RunDir(run_dir).check_finished()
    return Path(run_dir)


def fresh_output(path: Path, overwrite: bool) -> Path:
    """`path`, refused when it exists (results are never overwritten silently) unless --overwrite, or when it
    cannot be written: said before the model loads."""
    if path.exists() and not overwrite:
        raise UserError(f"{path} exists: pass --overwrite to replace it, or choose another path")
    folder = next(parent for parent in (path.parent, *path.parent.parents) if parent.exists())
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {path}: {folder} is not a writable directory")
    return path
