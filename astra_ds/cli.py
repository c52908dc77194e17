"""astra-ds: train, evaluate and manage data for extreme classification.

    astra-ds data synth --out data/synthetic            write the default synthetic dataset
    astra-ds data stats data/synthetic                  summarise a dataset (any layout)
    astra-ds data validate data/synthetic               check it: empty rows, unseen labels, truncation
    astra-ds data convert data/synthetic --to xc_json --out data/synthetic_json   another layout
    astra-ds train --config configs/synthetic.yaml      train, then evaluate on the test split
    astra-ds eval --run-dir runs/synthetic              evaluate a finished run again
    astra-ds predict --run-dir runs/synthetic --text "..."   tag new text (also --input FILE, or - for stdin)
    astra-ds serve --run-dir runs/synthetic             answer HTTP requests (POST /v1/predict), batched
    astra-ds labels add --run-dir runs/synthetic --labels new.txt   add labels to a trained run (also retire)
    astra-ds index --run-dir runs/synthetic             (re)build the run's serving ANN index
    astra-ds export --run-dir runs/synthetic --out x    the encoder for sentence-transformers, label vectors, index
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
import errno
import functools
import logging
import os
import sys
from pathlib import Path

from astra_ds import __version__, layout
from astra_ds.choices import READERS, SAMPLERS
from astra_ds.config import describe, load_config
from astra_ds.data.synth import SynthConfig
from astra_ds.errors import ConfigError, Preempted, UserError
from astra_ds.files import utf8_lines
from astra_ds.launch import discover_launch, end_mpi_job
from astra_ds.serve.requests import Limits
from astra_ds.serve.settings import ServeSettings
from astra_ds.libraries import quiet_libraries

log = logging.getLogger("astra_ds")


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(message)s", datefmt="%H:%M:%S")


# ---- commands -------------------------------------------------------------------------------------------------

def cmd_train(args) -> None:
    cfg = load_config(args.config, args.set)  # before torch is imported: a config mistake answers at once
    if args.resume and args.init_from:
        raise ConfigError("--resume continues a run, --init-from starts a new one from its weights: pick one")
    if not Path(cfg.data.path).is_dir():
        raise UserError(f"data.path {cfg.data.path} is not a directory (a dataset is a directory of files)")
    for option, path in (("--resume", args.resume), ("--init-from", args.init_from)):
        if path and path != "auto" and not Path(path).is_dir():
            raise UserError(f"{option}: no {'checkpoint' if option == '--resume' else 'run or checkpoint'} at {path}")
    from astra_ds.run import train

    train(cfg, resume=args.resume, init_from=args.init_from, evaluate=not args.no_eval, overwrite=args.overwrite,
          allow_changes=args.allow_changes)


def cmd_plan(args) -> None:
    cfg = load_config(args.config, args.set)
    if args.world_size < 1 or args.ranks_per_host < 1:
        raise ConfigError("--world-size and --ranks-per-host must be >= 1")
    given = [args.num_labels, args.num_train, args.num_test]
    if any(value is not None for value in given) and not all(value is not None and value >= 1 for value in given):
        raise ConfigError("--num-labels, --num-train and --num-test go together (each >= 1): the data's shape, "
                          "when it is not read from data.path")
    from astra_ds.dist import configure_accelerator

    configure_accelerator()
    quiet_libraries()
    import deepspeed  # noqa: F401  (held by every training process: the measured part of the plan includes it)
    import torch

    from astra_ds.model.encoder import QueryEncoder
    from astra_ds.plan import DataShape, GiB, advice, available_host_bytes, plan_run, process_bytes
    from astra_ds.training.build import build_data, build_encoder

    if args.num_labels is None:
        _, data = build_data(cfg)
        shape = DataShape.of(data)
    else:
        data, shape = None, DataShape(args.num_labels, args.num_train, args.num_test, args.labels_per_query,
                                      args.query_tokens, args.label_tokens)
    SAMPLERS.get(cfg.negatives.strategy).import_dependencies()
    held = process_bytes()
    encoder = build_encoder(cfg, data) if data is not None else QueryEncoder(cfg.encoder, shape.num_labels)
    on_gpu = args.gpu or torch.cuda.is_available()
    plan = plan_run(cfg, shape, encoder, args.world_size, 0, on_gpu, held)
    print(plan.format())
    per_host = min(args.ranks_per_host, args.world_size)
    need = per_host * plan.to_allocate() + held  # shown with this process's own part
    gpu = f"; each GPU: {plan.total('device') / GiB:.2f} GiB" if on_gpu else ""
    if args.num_labels is not None or on_gpu and not torch.cuda.is_available():  # planned for other machines
        print(f"\na host: {per_host} rank(s) x plan = {need / GiB:.2f} GiB{gpu}")
        return
    available = available_host_bytes() + held
    print(f"\nthis host: {per_host} rank(s) x plan = {need / GiB:.2f} GiB of {available / GiB:.2f} GiB available: "
          + ("fits" if need <= available else "does NOT fit") + gpu)
    if need > available:
        raise ConfigError(f"the run does not fit this host's memory. {advice(plan)}")


def _fresh_output(path: Path, overwrite: bool) -> Path:
    """`path`, refused when it exists (results are never overwritten silently) unless --overwrite, or when it
    cannot be written: said before the model loads."""
    if path.exists() and not overwrite:
        raise UserError(f"{path} exists: pass --overwrite to replace it, or choose another path")
    folder = next(parent for parent in (path.parent, *path.parent.parents) if parent.exists())
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {path}: {folder} is not a writable directory")
    return path


def _finished_run(run_dir: str) -> Path:
    """--run-dir, refused at once (before the libraries load) when it is not a finished run; its digests are
    checked when the model loads."""
    from astra_ds.serve.card import check_published

    check_published(Path(run_dir))
    return Path(run_dir)


def _claim_eval_dir(run_dir: Path) -> Path:
    """The next free <run>/evals/<n>, created here: evaluations running at once each get their own."""
    evals = run_dir / layout.EVALS
    evals.mkdir(exist_ok=True)
    while True:
        taken = [int(p.name) for p in evals.glob("*") if p.name.isdigit()]
        path = evals / str(max(taken, default=0) + 1)
        try:
            path.mkdir()  # atomic: of two evaluations choosing the same n, one gets it, the other tries n + 1
            return path
        except FileExistsError:
            continue


def cmd_eval(args) -> None:
    if args.exact and args.ann:
        raise ConfigError("--exact uses exact search only, --ann both: pick one")
    _finished_run(args.run_dir)
    if args.out_dir:
        _fresh_output(Path(args.out_dir) / layout.METRICS, args.overwrite)
    quiet_libraries()
    import time

    from astra_ds.eval.evaluate import MODEL, MODEL_ANN, ann_recall, evaluate, search_k
    from astra_ds.eval.metrics import format_table
    from astra_ds.serve.model import XCModel

    model = XCModel.load(args.run_dir, args.set, progress=True)
    data = model.load_data()
    split = data.split(args.split)
    if args.ann and model.index is None:
        raise UserError(f"{args.run_dir} has no serving index: build it with `astra-ds index --run-dir {args.run_dir}`")
    k = search_k(model.cfg.eval, split.filter)
    if k > model.num_labels:
        raise ConfigError(f"eval.ks asks for the top {k} (filtered pairs included) of {model.num_labels} labels")
    queries, calibration = model.encode_tokens(split.tokens)
    if args.ann:
        searches = {MODEL: "exact", MODEL_ANN: "ann"}
    else:
        searches = {MODEL: "exact" if args.exact or model.index is None else "ann"}
    topk, seconds = {}, {}
    for name, kind in searches.items():
        started = time.perf_counter()
        topk[name] = model.topk(queries, k, exact=kind == "exact")
        seconds[kind] = time.perf_counter() - started
    about = {"step": model.card.step, "dataset": str(Path(model.cfg.data.path).resolve()), "split": split.name,
             "topk": " and ".join(seconds), "topk_seconds": {kind: round(s, 3) for kind, s in seconds.items()}}
    if args.ann:
        about[f"ann_recall@{k}"] = ann_recall(topk[MODEL_ANN][1], topk[MODEL][1])
    if args.out_dir:
        out_dir = Path(args.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
    else:
        out_dir = _claim_eval_dir(Path(args.run_dir))
    results = evaluate(topk, calibration, split.labels, data.dataset.train.labels, model.cfg.eval, model.num_labels,
                       out_dir, about, split.filter)
    print(format_table(results, model.cfg.eval.ks))
    print(f"top-k of {len(queries)} queries: " + ", ".join(f"{kind} {s:.2f} s" for kind, s in seconds.items())
          + (f" | ANN recall@{k} against exact: {about[f'ann_recall@{k}']:.4f}" if args.ann else "")
          + (f"\nfilter_labels_test.txt applied: {split.filter.nnz} reciprocal pairs left out"
             if split.filter is not None else "") + f"\nwritten to {out_dir}")


def _read_texts(args) -> list[str]:
    """--text, or the lines of --input (a file, or - for stdin): UTF-8, one text a line (none: no predictions)."""
    if args.text:
        return args.text
    stream = sys.stdin.buffer if args.input == "-" else open(args.input, "rb")
    with stream:
        texts = utf8_lines(stream.read(), args.input)
    empty = [i for i, text in enumerate(texts, 1) if not text.strip()]
    if empty:
        raise UserError(f"{args.input}: line {empty[0]} is empty ({len(empty)} empty lines): one text a line")
    return texts


def _write_predictions(predictions, texts: list[str], out, fmt: str, num_labels: int) -> None:
    import json

    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
    if fmt == "npz":
        from astra_ds.eval.evaluate import save_predictions

        save_predictions(out, predictions.scores, predictions.ids, num_labels)  # logits, as every .npz
        return
    stream = open(out, "w", encoding="utf-8") if out else sys.stdout
    for text, ids, scores, names in zip(texts, predictions.ids, predictions.scores, predictions.names):
        if fmt == "jsonl":
            stream.write(json.dumps({"text": text, "ids": ids.tolist(), "names": names,
                                     "scores": [round(float(s), 6) for s in scores]}, ensure_ascii=False) + "\n")
        else:
            stream.write("".join(f"{text}\t{rank}\t{i}\t{s:.6g}\t{name}\n"
                                 for rank, (i, s, name) in enumerate(zip(ids, scores, names), 1)))
    if out:
        stream.close()


def cmd_predict(args) -> None:
    if args.top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, not {args.top_k}")
    fmt = args.format or (Path(args.out).suffix.lstrip(".") if args.out else "jsonl")
    if fmt not in ("jsonl", "tsv", "npz"):
        raise ConfigError(f"--out {args.out}: the format comes from the extension, .jsonl, .tsv or .npz (or --format)")
    if fmt == "npz" and not args.out:
        raise ConfigError("--format npz needs --out FILE.npz")
    _finished_run(args.run_dir)
    if args.out:
        _fresh_output(Path(args.out), args.overwrite)
    texts = _read_texts(args)
    quiet_libraries()
    import time

    from astra_ds.serve.model import XCModel

    model = XCModel.load(args.run_dir, args.set, progress=True)
    if args.top_k > model.predictable_labels:
        raise ConfigError(f"--top-k {args.top_k} exceeds the model's {model.predictable_labels} labels")
    started = time.perf_counter()
    predictions = model.predict(texts, args.top_k, exact=args.exact, logits=args.logits or fmt == "npz")
    log.info("%d texts: top-%d by %s search in %.2f s", len(texts), args.top_k,
             "exact" if args.exact or model.index is None else "ANN", time.perf_counter() - started)
    _write_predictions(predictions, texts, args.out, fmt, model.num_labels)


def cmd_serve(args) -> None:
    for name in ("max_batch", "max_queue", "max_texts", "max_chars", "max_body_bytes"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, not {getattr(args, name)}")
    if args.max_wait_ms < 0 or args.drain_s < 0:
        raise ConfigError("--max-wait-ms and --drain-s must be >= 0")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be between 0 and 65535, not {args.port}")
    _finished_run(args.run_dir)
    # torch's OpenMP threads sleep between batches instead of spinning on the cores the event loop answers on
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    quiet_libraries()
    from astra_ds.serve.server import serve

    serve(ServeSettings(args.run_dir, args.host, args.port, args.max_batch, args.max_wait_ms, args.max_queue,
                        Limits(args.max_texts, args.max_chars, args.max_body_bytes), args.set, args.device,
                        args.drain_s))


def cmd_labels(args) -> None:
    run_dir = Path(args.run_dir)
    if args.labels_command != "finish":
        _finished_run(args.run_dir)
    quiet_libraries()
    from astra_ds.serve import labels
    from astra_ds.serve.model import XCModel

    new = labels.read_label_file(Path(args.labels)) if args.labels_command == "add" else None

    @functools.cache
    def model() -> XCModel:  # the run's encoder, loaded only when labels are added
        return XCModel.load(run_dir, progress=True, changing=True)

    def embed(texts: list[str]):
        return model().embed_label_texts(texts)

    if args.labels_command == "add":
        ids = labels.add_labels(run_dir, new, embed, lambda texts: model().encode_queries(texts), args.row_scale)
        print(f"{len(ids)} labels added to {run_dir}: ids {ids.start}-{ids.stop - 1}")
    elif args.labels_command == "finish":
        done = labels.finish_pending(run_dir, embed)
        print(f"{run_dir}: " + ("the interrupted change is finished" if done else "no change to finish"))
    else:
        change = labels.retire_labels if args.labels_command == "retire" else labels.restore_labels
        retired = change(run_dir, args.ids or [], args.names or [], embed)
        print(f"{run_dir}: {len(retired)} labels retired" + (f" (ids {_ids_text(retired)})" if retired else ""))


def _ids_text(ids: list[int]) -> str:
    return ", ".join(map(str, ids[:10])) + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")


def cmd_index(args) -> None:
    _finished_run(args.run_dir)
    quiet_libraries()
    from astra_ds.config import load_config
    from astra_ds.serve.ann import build_serving_index
    from astra_ds.serve.card import read_card

    run_dir = Path(args.run_dir)
    card = read_card(run_dir)  # verified
    cfg = load_config(run_dir / layout.CONFIG, args.set)
    info = build_serving_index(run_dir, cfg.index, cfg.train.seed, True, card)
    print(f"serving index ({info['kind']}) over {info['num_labels']} labels, built in {info['build_seconds']:.1f} s: "
          f"{run_dir / layout.ANN_DIR}")


def cmd_finalize(args) -> None:
    run_dir = Path(args.run_dir)
    if not (run_dir / layout.CONFIG).is_file():
        raise UserError(f"{run_dir} holds no run ({layout.CONFIG} is missing)")
    cfg = load_config(run_dir / layout.CONFIG, args.set)
    cfg.out_dir = str(run_dir)  # where the run is now, wherever it was trained
    quiet_libraries()
    from astra_ds.run import train
    from astra_ds.training.checkpoint import CheckpointManager, check_checkpoint

    checkpoint = Path(args.checkpoint) if args.checkpoint else CheckpointManager(cfg.checkpoint, run_dir, 0,
                                                                                 1).resolve("auto")
    if checkpoint is None:
        raise UserError(f"{run_dir} has no checkpoint to publish")
    step = check_checkpoint(checkpoint)["step"]
    cfg.train.max_steps = step  # resumed there, and trained no further
    train(cfg, resume=str(checkpoint), evaluate=not args.no_eval)
    log.info("%s is a finished run: the model of %s (step %d)", run_dir, checkpoint.name, step)


def cmd_export(args) -> None:
    _finished_run(args.run_dir)
    quiet_libraries()
    from astra_ds.serve.export import export

    out = export(args.run_dir, args.out, progress=True)
    print(f"exported to {out}: SentenceTransformer('{out}') encodes queries; {out}/labels holds the label "
          "vectors, the index and the score card")


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


def cmd_validate(args) -> None:
    cfg = load_config(args.config, args.set)
    quiet_libraries()
    from astra_ds.data.readers import read_dataset
    from astra_ds.data.validate import validate
    from astra_ds.model.encoder import build_tokenizer

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


def _run_command(commands, name: str, func, help_text: str, description: str, output: str | None = None):
    """A command that reads a finished run (see _run_arguments)."""
    parser = commands.add_parser(name, help=help_text, description=description)
    parser.set_defaults(func=func)
    _run_arguments(parser, output)
    return parser


def _run_arguments(parser: argparse.ArgumentParser, output: str | None = None) -> None:
    """--run-dir and --set of the commands that read a finished run; for those that search it and write `output`,
    --exact and --overwrite."""
    parser.add_argument("--run-dir", required=True, help="out_dir of a finished `astra-ds train`")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the run's config, e.g. --set index.nprobe=64")
    if output:
        parser.add_argument("--exact", action="store_true", help="exact search over the rows, not the serving index")
        parser.add_argument("--overwrite", action="store_true", help=f"replace {output} when it exists")


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

    evaluate = _run_command(
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

    predict = _run_command(
        commands, "predict", cmd_predict, "tag new text with a trained run",
        "The top-k labels of each text: JSONL (text, ids, names, scores) on stdout or --out; .tsv (text, rank, id, "
        "score, name a line) and .npz (an N x L CSR matrix of scores) by extension. Scores are sigmoid "
        "probabilities (--logits: scale * <q, v> + bias); an .npz always holds logits, as the evaluation's "
        "predictions.npz (its array 'score' says so).", "--out")
    source = predict.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", action="append", help="a text to tag (repeatable)")
    source.add_argument("--input", metavar="FILE", help="one text a line; - reads standard input")
    predict.add_argument("--top-k", type=int, default=5, help="labels a text (default 5)")
    predict.add_argument("--out", help="output file (.jsonl, .tsv, .npz); default: JSONL on stdout")
    predict.add_argument("--format", choices=["jsonl", "tsv", "npz"], help="output format, if not the extension's")
    predict.add_argument("--logits", action="store_true", help="scores as logits, not probabilities (.npz: always)")

    serve = _run_command(
        commands, "serve", cmd_serve, "answer HTTP requests with a trained run (batched, reloadable)",
        "An HTTP server (FastAPI on uvicorn) over a finished run: POST /v1/predict {\"texts\": [...], \"k\": 5}, "
        "POST /v1/encode, GET /v1/model, POST /v1/reload (also SIGHUP), GET /healthz, /readyz, /metrics "
        "(Prometheus). Concurrent requests are batched into one encoder forward. SIGTERM answers the requests in "
        "flight, then exits 0. It listens on loopback unless --host says otherwise: put it behind a proxy that "
        "does not expose /v1/reload.")
    defaults, limits = ServeSettings(run_dir=""), Limits()
    serve.add_argument("--host", default=defaults.host,
                       help=f"address to listen on (default {defaults.host}; 0.0.0.0: all)")
    serve.add_argument("--port", type=int, default=defaults.port,
                       help=f"port (default {defaults.port}; 0: any free one, logged)")
    serve.add_argument("--max-batch", type=int, default=defaults.max_batch,
                       help=f"texts a model batch (default {defaults.max_batch})")
    serve.add_argument("--max-wait-ms", type=float, default=defaults.max_wait_ms,
                       help=f"how long a request may wait for others to batch with while the model is idle (default "
                            f"{defaults.max_wait_ms:g}: batches form from the requests that arrive while the model "
                            "works)")
    serve.add_argument("--max-queue", type=int, default=defaults.max_queue,
                       help=f"texts waiting for the model; more are answered 503 with Retry-After (default "
                            f"{defaults.max_queue})")
    serve.add_argument("--max-texts", type=int, default=limits.max_texts,
                       help=f"texts a request (default {limits.max_texts}; more: 413)")
    serve.add_argument("--max-chars", type=int, default=limits.max_chars,
                       help=f"characters a text (default {limits.max_chars}; more: 413)")
    serve.add_argument("--max-body-bytes", type=int, default=limits.max_body_bytes,
                       help=f"bytes a request body (default {limits.max_body_bytes >> 20} MiB)")
    serve.add_argument("--drain-s", type=float, default=defaults.drain_s,
                       help=f"on SIGTERM, the longest to wait for the requests in flight (default {defaults.drain_s:g})")
    serve.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when present)")

    label_commands = _command_group(commands, "labels", "add or retire labels of a trained run")
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

    _run_command(commands, "index", cmd_index, "build the serving index of a trained run",
                 "A faiss index over the run's scoring vectors (classifier rows, plus label-text embeddings with dual "
                 "scoring) in <run-dir>/ann/, the kind chosen by L as for training (index.kind to force one): "
                 "predict and eval use it. `train` builds it at its end unless eval.ann_index=false.")

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

    export = commands.add_parser("export", help="export a trained run for serving",
                                 description="The encoder as a sentence-transformers model (SentenceTransformer(OUT)"
                                             " loads it), and in OUT/labels the label vectors (.npy), the faiss "
                                             "index, the label names and a card with the score formula.")
    export.add_argument("--run-dir", required=True, help="out_dir of a finished `astra-ds train`")
    export.add_argument("--out", required=True, help="a new directory")
    export.set_defaults(func=cmd_export)

    plan = commands.add_parser("plan", help="memory per rank of a run, and whether it fits this host",
                               description="Bytes per rank for the classifier table and its optimizer state, "
                                           "the encoder under its ZeRO stage, the index, staging buffers and "
                                           "evaluation, from the run's config and data. `train` checks the same "
                                           "plan at start-up and refuses a run that does not fit.")
    _config_arguments(plan)
    plan.add_argument("--world-size", type=int, default=1, help="ranks of the run (the table is split over them)")
    plan.add_argument("--ranks-per-host", type=int, default=1, help="ranks that share this host's memory")
    plan.add_argument("--gpu", action="store_true",
                      help="plan the run as it will be on GPUs (train.ds_config auto: zero2 in bf16; the table's "
                           "step staging on the device), also from a machine without one")
    shape = plan.add_argument_group("the data's shape, when the dataset is not on this machine (all three)")
    shape.add_argument("--num-labels", type=int, help="labels L")
    shape.add_argument("--num-train", type=int, help="training queries (the validation split left out)")
    shape.add_argument("--num-test", type=int, help="test queries")
    shape.add_argument("--labels-per-query", type=float, default=5.0,
                       help="positives a training query has, on average (default 5)")
    shape.add_argument("--query-tokens", type=int, help="the longest query in tokens (default data.max_len)")
    shape.add_argument("--label-tokens", type=int,
                       help="the longest label text in tokens (default siamese.label_max_len)")
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
    validate = data_commands.add_parser(
        "validate", help="check a dataset and report what training would meet",
        description="Reads the dataset (header and row counts, id ranges, malformed lines end with one line) and "
                    "reports queries without labels, labels without training points, test labels unseen in "
                    "training, filter pairs, and the token lengths of queries and label texts against data.max_len "
                    "and siamese.label_max_len of the config (tokenizer of encoder.model).")
    validate.add_argument("path", help="dataset directory")
    validate.add_argument("--format", default="auto", choices=["auto", *READERS.names])
    _config_arguments(validate)
    validate.set_defaults(func=cmd_validate)
    convert = data_commands.add_parser(
        "convert", help="write a dataset in another layout",
        description="Writes the dataset at PATH into a new directory in the layout --to: raw_text, xc_json (gzipped "
                    "JSON lines) or bow (words counted; word order is lost). Filter files are copied.")
    convert.add_argument("path", help="dataset directory")
    convert.add_argument("--to", required=True, choices=["raw_text", "xc_json", "bow"], help="the target layout")
    convert.add_argument("--out", required=True, help="a new directory")
    convert.add_argument("--format", default="auto", choices=["auto", *READERS.names], help="the source layout")
    convert.add_argument("--text-fields", default="title", choices=["title", "title_content"],
                         help="JSON sources: the query text is the title, or title and content")
    convert.set_defaults(func=cmd_convert)
    return parser


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
        from astra_ds.dist import lost_peer

        lost = lost_peer(err)
        if lost:  # a rank or its host went away: one line, not this rank's traceback
            print(f"astra-ds: error: rank {rank} lost {lost} during a collective: that rank or its host ended (see "
                  "its log); the last checkpoint is intact, `astra-ds train --resume auto` continues on any number "
                  "of ranks", file=sys.stderr)
            return _end_rank(1, multi_rank)
        hint = ""
        if "timed out" in str(err).lower() or "timeout" in type(err).__name__.lower():
            hint = (" (a collective timed out after train.collective_timeout_s: another rank probably failed, "
                    "see its error, or is stuck)")
        log.exception("rank %s failed%s", rank, hint)
        return _end_rank(1, multi_rank)
    return 0


if __name__ == "__main__":
    sys.exit(main())
