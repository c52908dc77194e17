"""`astra-ds labels add|retire|restore|finish`: the labels of a finished run changed without training
(astra_ds/labels/)."""

from __future__ import annotations

import functools
from pathlib import Path

from astra_ds.cli.arguments import command_group, finished_run
from astra_ds.libraries import quiet_libraries


def _ids_text(ids: list[int]) -> str:
    return ", ".join(map(str, ids[:10])) + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")


def cmd_labels(args) -> None:
    if args.labels_command != "finish":
        finished_run(args.run_dir)
    quiet_libraries()
    from astra_ds.inference.xc_model import XCModel
    from astra_ds.labels import change as labels
    from astra_ds.labels.label_file import read_label_file
    from astra_ds.rundir.run_dir import RunDir

    run = RunDir(args.run_dir)
    new = read_label_file(Path(args.labels)) if args.labels_command == "add" else None

    @functools.cache
    def model() -> XCModel:  # the run's encoder, loaded only when labels are added
        return XCModel.load(run.path, progress=True, changing=True)

    def embed(texts: list[str]):
        return model().embed_label_texts(texts)

    if args.labels_command == "add":
        ids = labels.add_labels(run, new, embed, lambda texts: model().encode_queries(texts), args.row_scale)
        print(f"{len(ids)} labels added to {run}: ids {ids.start}-{ids.stop - 1}")
    elif args.labels_command == "finish":
        done = labels.finish_pending(run, embed)
        print(f"{run}: " + ("the interrupted change is finished" if done else "no change to finish"))
    else:
        change = labels.retire_labels if args.labels_command == "retire" else labels.restore_labels
        retired = change(run, args.ids or [], args.names or [], embed)
        print(f"{run}: {len(retired)} labels retired" + (f" (ids {_ids_text(retired)})" if retired else ""))


def add_commands(commands) -> None:
    label_commands = command_group(commands, "labels", "add or retire labels of a trained run")
    add = label_commands.add_parser(
        "add", help="add labels to a finished run from their texts",
        description="Each new label gets its row from its text through the run's final encoder (and its label-text "
                    "embedding for dual scoring); rows, names, model card and serving index grow in place, and the "
                    "run's version moves. --labels: one label a line, its text; or NAME<TAB>TEXT; or JSON lines "
                    '{"text": ..., "name": ...}. A name may not repeat one the run has. The new rows\' scores are '
                    "scaled so that the new labels come first for no more than their share of the labels on 2,000 of "
                    "the run's training queries (the card's row_scales; --row-scale sets it instead).")
    add.add_argument("--run-dir", required=True, help="out_dir of a finished `astra-ds train`")
    add.add_argument("--labels", required=True, metavar="FILE", help="the new labels (UTF-8)")
    add.add_argument("--row-scale", type=float, metavar="S",
                     help="scale of the new rows' scores (default: chosen on the run's training queries; 1: as "
                          "mapped from their texts)")
    for name, text in (("retire", "remove labels from every prediction (ids are kept)"),
                       ("restore", "undo `labels retire` for some labels")):
        change = label_commands.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        change.add_argument("--run-dir", required=True, help="out_dir of a finished `astra-ds train`")
        change.add_argument("--ids", type=int, nargs="+", help="label ids")
        change.add_argument("--names", nargs="+", help="label names (label_names.txt)")
    finish = label_commands.add_parser("finish", help="finish a labels change that was interrupted",
                                       description="A crash during `labels add/retire/restore` leaves the run "
                                                   "withdrawn; this applies the recorded change again.")
    finish.add_argument("--run-dir", required=True, help="the run directory")
    for label_command in label_commands.choices.values():
        label_command.set_defaults(func=cmd_labels)
