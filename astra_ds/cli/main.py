"""astra-ds: train, evaluate and manage data for extreme classification.

    astra-ds data synth --out data/synthetic            write the default synthetic dataset
    astra-ds data stats data/synthetic                  summarise a dataset (any format)
    astra-ds data validate data/synthetic               check it: empty rows, unseen labels, truncation
    astra-ds data convert data/synthetic --to xc_json --out data/synthetic_json   another format
    astra-ds train --config configs/synthetic.yaml      train, then evaluate on the test split
    astra-ds eval --run-dir runs/synthetic              evaluate a finished run again
    astra-ds predict --run-dir runs/synthetic --text "..."   tag new text (also --input FILE, or - for stdin)
    astra-ds serve --run-dir runs/synthetic             answer HTTP requests (POST /v1/predict), batched
    astra-ds labels add --run-dir runs/synthetic --labels new.txt   add labels to a trained run (also retire)
    astra-ds index --run-dir runs/synthetic             (re)build the run's serving ANN index
    astra-ds export --run-dir runs/synthetic --out x    the encoder for sentence-transformers, label vectors, index
    astra-ds plan --config configs/synthetic.yaml       memory per rank, and whether the run fits
    astra-ds config show --config configs/synthetic.yaml   every key: its default and effective value

Several ranks (see launchers/ and docs/guides/several-nodes.md): `deepspeed --module astra_ds train ...`,
`mpirun -np N python -m astra_ds train ...`, or `srun` in launchers/slurm.sbatch.

Config: YAML (see configs/), every key overridable with --set section.key=value; the effective config is
saved as <out_dir>/config.yaml.
"""

# torch, DeepSpeed and transformers are imported inside the commands that use them: --help, --version and config
# mistakes answer at once.

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys

from astra_ds import __version__
from astra_ds.cli import data, evaluate, export, labels, plan, predict, serve, train
from astra_ds.errors import Preempted, UserError
from astra_ds.launch import discover_launch, end_mpi_job

log = logging.getLogger("astra_ds")

COMMAND_GROUPS = (train, evaluate, predict, serve, labels, export, plan, data)  # in the order --help lists them


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="astra-ds", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # the deepspeed launcher passes --local_rank=N before the command; LOCAL_RANK in the environment says the same
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--version", action="version", version=f"astra-ds {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for group in COMMAND_GROUPS:
        group.add_commands(commands)
    return parser


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(message)s", datefmt="%H:%M:%S")


def _end_rank(code: int, multi_rank: bool, failed: bool = True) -> int:
    """In a multi-rank run a failed rank ends the job at once (the launcher then stops the others), rather than
    returning through interpreter shutdown, which can wait on peers that wait on it. A rank stopped by a signal
    (`failed=False`) exits with its peers, which stop at the same step."""
    if multi_rank:
        sys.stdout.flush()
        sys.stderr.flush()
        if failed:
            end_mpi_job(code)
        os._exit(code)
    return code


def _message(err: Exception) -> str:
    """One line for a user mistake; an OS error by its text and path, not its number."""
    if isinstance(err, OSError):
        text = "the disk is full" if err.errno == errno.ENOSPC else err.strerror
        return f"{text}: {err.filename}" if err.filename else text
    return str(err)


def _failed_rank(err: Exception, rank: str) -> None:
    """What a rank of a multi-rank run says when it fails for a reason other than a user mistake."""
    from astra_ds.dist import lost_peer

    lost = lost_peer(err)
    if lost:  # a rank or its host went away: one line, not this rank's traceback
        print(f"astra-ds: error: rank {rank} lost {lost} during a collective: that rank or its host ended (see "
              "its log); the last checkpoint is intact, `astra-ds train --resume auto` continues on any number "
              "of ranks", file=sys.stderr)
        return
    hint = ""
    if "timed out" in str(err).lower() or "timeout" in type(err).__name__.lower():
        hint = (" (a collective timed out after train.collective_timeout_s: another rank probably failed, "
                "see its error, or is stuck)")
    log.exception("rank %s failed%s", rank, hint)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("train", "finalize"):
        discover_launch()  # rank and world size, for the log lines, from the launcher, MPI or SLURM
    _setup_logging()
    rank, multi_rank = os.environ.get("RANK", "0"), int(os.environ.get("WORLD_SIZE", "1")) > 1
    try:
        args.func(args)
    except Preempted as err:
        if rank == "0":
            print(f"astra-ds: {err}", file=sys.stderr)
        return _end_rank(err.exit_status, multi_rank, failed=False)
    except BrokenPipeError:  # the output was piped into `head` and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except KeyboardInterrupt:  # before or after training (during it, SIGINT ends in a checkpoint)
        print("astra-ds: interrupted", file=sys.stderr)
        return _end_rank(130, multi_rank)
    except (UserError, OSError) as err:
        if isinstance(err, OSError) and not err.strerror:
            raise
        print(f"astra-ds: error: {_message(err)}", file=sys.stderr)
        return _end_rank(2, multi_rank)
    except Exception as err:
        if not multi_rank:
            raise
        _failed_rank(err, rank)
        return _end_rank(1, multi_rank)
    return 0


if __name__ == "__main__":
    sys.exit(main())
