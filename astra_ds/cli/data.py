"""`astra-ds data synth|prepare|stats|validate|convert`: datasets written, prepared for training, summarised,
checked and converted."""

from __future__ import annotations

import argparse
import dataclasses
import functools
from pathlib import Path

from astra_ds.choices import READERS
from astra_ds.cli.arguments import command_group, config_arguments
from astra_ds.config import load_config
from astra_ds.data.synth import SynthConfig
from astra_ds.errors import ConfigError, DataError
from astra_ds.libraries import quiet_libraries


def cmd_synth(args) -> None:
    from astra_ds.data.synth import generate

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(SynthConfig)}
    try:
        cfg = SynthConfig(**values)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    out = generate(cfg, args.out, exist_ok=args.exist_ok)
    print(f"dataset at {out}: {cfg.num_train} train / {cfg.num_test} test queries over {cfg.num_labels} labels")


def cmd_prepare(args) -> None:
    from astra_ds.data.preparation import parse_part

    cfg = load_config(args.config, args.set)
    part = _task_part() if args.part == "auto" else parse_part(args.part) if args.part else (0, 1)
    if args.workers < 1 or args.unit_rows < 1:
        raise ConfigError("--workers and --unit-rows must be at least 1")
    if part != (0, 1) and args.workers > 1:
        raise ConfigError("--part runs one task of a cluster job: give each task its part, and no --workers")
    if not Path(cfg.data.path).is_dir():  # before the libraries load
        raise ConfigError(f"data.path {cfg.data.path} is not a directory (a dataset is a directory of files)")
    quiet_libraries()
    from astra_ds.data.preparation import prepare
    from astra_ds.encoder.encoder import build_tokenizer

    ready = prepare(cfg, args.out, functools.partial(build_tokenizer, cfg.encoder), args.workers, part, args.unit_rows)
    print(f"{args.out}: " + ("prepared" if ready else f"part {part[0]}/{part[1]} prepared; the other parts are still "
                                                      "to come (the last one to finish writes manifest.json)"))


def _task_part() -> tuple[int, int]:
    from astra_ds.launch import TASK_VARIABLES, task_of_job

    task = task_of_job()
    if task is None:
        raise ConfigError("--part auto takes the part from a launcher's environment, and there is none here ("
                          + ", ".join("/".join(pair) for pair in TASK_VARIABLES) + "): give --part i/n")
    return task


def cmd_stats(args) -> None:
    from astra_ds.data.prepared import PreparedDirectory, is_prepared
    from astra_ds.data.readers import read_dataset
    from astra_ds.data.stats import prepared_summary_lines, summary_lines

    if is_prepared(args.path):
        print("\n".join(prepared_summary_lines(PreparedDirectory(args.path))))
        return
    print("\n".join(summary_lines(read_dataset(args.path, args.format))))


def cmd_validate(args) -> None:
    cfg = load_config(args.config, args.set)
    from astra_ds.data.prepared import PreparedDirectory, is_prepared

    if is_prepared(args.path):  # its rows were checked when prepared: its arrays against their digests
        directory = PreparedDirectory(args.path)
        damaged = directory.damaged_units()
        splits = directory.manifest["splits"]
        print(f"prepared dataset {args.path}: " + ", ".join(f"{name} {split['rows']:,} rows"
                                                            for name, split in splits.items()))
        if damaged:
            raise DataError(f"{len(damaged)} of the arrays of {args.path} are missing or changed since preparation "
                            f"({', '.join(damaged[:3])}{', ...' if len(damaged) > 3 else ''}): prepare it again")
        print(f"every array of its {sum(len(split['units']) for split in splits.values())} units verifies")
        return
    quiet_libraries()
    from astra_ds.data.readers import read_dataset
    from astra_ds.data.validate import validate
    from astra_ds.encoder.encoder import build_tokenizer

    dataset = read_dataset(args.path, args.format, cfg.data.text_fields, cfg.data.on_bad_text)
    lines, warnings = validate(dataset, build_tokenizer(cfg.encoder), cfg.data.max_len, cfg.siamese.label_max_len)
    print(f"dataset {args.path} ({cfg.encoder.model} tokens):\n  " + "\n  ".join(lines))
    print("warnings:\n  " + "\n  ".join(warnings) if warnings else "no warnings")


def cmd_convert(args) -> None:
    from astra_ds.data.convert import convert
    from astra_ds.data.readers import read_dataset

    dataset = read_dataset(args.path, args.format, args.text_fields)
    convert(dataset, Path(args.path), Path(args.out), args.to)
    print(f"{args.path} -> {args.out} ({args.to}): {len(dataset.train.texts)} train / {len(dataset.test.texts)} test "
          f"queries, {dataset.num_labels} labels")


def _synth_arguments(parser: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(SynthConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            kind = {"int": int, "float": float}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)
            parser.add_argument(flag, dest=f.name, type=kind, default=f.default, help=f"(default {f.default})")


def add_commands(commands) -> None:
    data_commands = command_group(commands, "data", "create or inspect datasets")
    synth = data_commands.add_parser("synth", help="write a synthetic text XC dataset (raw-text format)",
                                     description="Labels are topics over pseudo-words; queries are noisy word "
                                                 "draws from 1-5 labels. Streams to disk at any number of labels.")
    synth.add_argument("--out", required=True, help="output directory (must not exist)")
    synth.add_argument("--exist-ok", action="store_true",
                       help="keep --out if it already holds a dataset generated with the same settings")
    _synth_arguments(synth)
    synth.set_defaults(func=cmd_synth)
    prepare = data_commands.add_parser(
        "prepare", help="tokenise a dataset once into memory-mappable arrays for training",
        description="Reads data.path of the config (any layout; the raw-text layout is read in parallel from the "
                    "middle of its files), tokenises it with encoder.model at data.max_len (label texts at "
                    "siamese.label_max_len), holds data.validation_fraction of the training rows out by a hash of "
                    "each row, and writes --out: units of --unit-rows source rows, each written whole, then "
                    "manifest.json. Interrupted, it resumes where it stopped. Under a cluster launcher, give each "
                    "task --part i/n, or --part auto (no process group is needed); on one host, --workers.")
    config_arguments(prepare)
    prepare.add_argument("--out", required=True, help="the prepared directory (created; resumed when it exists)")
    prepare.add_argument("--workers", type=int, default=1, help="processes on this host (default 1)")
    prepare.add_argument("--part", metavar="i/n", help="this task's part of a job of n tasks (unit k goes to "
                                                       "part k mod n); auto: i and n from the launcher (srun, "
                                                       "mpirun, the deepspeed launcher, torchrun)")
    prepare.add_argument("--unit-rows", type=int, default=1_000_000,
                         help="source rows a unit (default 1,000,000): what a kill can lose at most, per worker")
    prepare.set_defaults(func=cmd_prepare)
    stats = data_commands.add_parser("stats", help="summarise a dataset")
    stats.add_argument("path", help="dataset directory")
    stats.add_argument("--format", default="auto", choices=["auto", *READERS.names])
    stats.set_defaults(func=cmd_stats)
    validate = data_commands.add_parser(
        "validate", help="check a dataset and report what training would meet",
        description="Reads the dataset (header and row counts, id ranges, malformed lines end with one line) and "
                    "reports queries without labels, labels without training points, test labels unseen in "
                    "training, filter pairs, and the token lengths of queries and label texts against data.max_len "
                    "and siamese.label_max_len of the config (tokenizer of encoder.model).")
    validate.add_argument("path", help="dataset directory")
    validate.add_argument("--format", default="auto", choices=["auto", *READERS.names])
    config_arguments(validate)
    validate.set_defaults(func=cmd_validate)
    convert = data_commands.add_parser(
        "convert", help="write a dataset in another format",
        description="Writes the dataset at PATH into a new directory in the format --to: raw_text, xc_json (gzipped "
                    "JSON lines) or bow (words counted; word order is lost). Filter files are copied.")
    convert.add_argument("path", help="dataset directory")
    convert.add_argument("--to", required=True, choices=["raw_text", "xc_json", "bow"], help="the target format")
    convert.add_argument("--out", required=True, help="a new directory")
    convert.add_argument("--format", default="auto", choices=["auto", *READERS.names], help="the source format")
    convert.add_argument("--text-fields", default="title", choices=["title", "title_content"],
                         help="JSON sources: the query text is the title, or title and content")
    convert.set_defaults(func=cmd_convert)
