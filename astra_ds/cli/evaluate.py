"""`astra-ds eval`: a finished run evaluated again (XCModel.evaluate)."""

from __future__ import annotations

from pathlib import Path

from astra_ds.cli.arguments import finished_run, fresh_output, run_command
from astra_ds.errors import ConfigError
from astra_ds.libraries import quiet_libraries


def cmd_eval(args) -> None:
    if args.exact and args.ann:
        raise ConfigError("--exact uses exact search only, --ann both: pick one")
    finished_run(args.run_dir)
    if args.out_dir:
        from astra_ds.eval.outputs import METRICS_FILE

        fresh_output(Path(args.out_dir) / METRICS_FILE, args.overwrite)
    quiet_libraries()
    from astra_ds.inference.xc_model import XCModel

    model = XCModel.load(args.run_dir, args.set, progress=True)
    search = "both" if args.ann else "exact" if args.exact else "served"
    print(model.evaluate(args.split, search, args.out_dir).format())


def add_commands(commands) -> None:
    evaluate = run_command(
        commands, "eval", cmd_eval, "evaluate a trained run",
        "Predictions and metrics of a finished run on its test split (or another dataset of the same labels: --set "
        "data.path=...). The top-k comes from the run's serving index when it has one.", "the results in --out-dir")
    evaluate.add_argument("--out-dir", help="where metrics.json and predictions.npz go (default: the next "
                                            "<run-dir>/evals/<n>)")
    evaluate.add_argument("--ann", action="store_true",
                          help="both searches: metrics of each and the recall of the ANN top-k against exact")
    evaluate.add_argument("--split", choices=["test", "validation"], default="test",
                          help="the test split, or the validation split the run held out of its training queries "
                               "(data.validation_fraction): choose settings such as eval.label_text_weight on it")
