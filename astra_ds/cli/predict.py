"""`astra-ds predict`: new texts tagged by a finished run, written as JSON lines, TSV or a CSR .npz."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from astra_ds.cli.arguments import finished_run, fresh_output, run_command
from astra_ds.errors import ConfigError, UserError
from astra_ds.files import output_file, utf8_lines
from astra_ds.libraries import quiet_libraries

log = logging.getLogger("astra_ds")


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


def _write_predictions(predictions, texts: list[str], out: str | None, fmt: str, num_labels: int) -> None:
    """To stdout, or into `out` whole or not at all (a full disk leaves no part of it)."""
    if not out:
        _write_lines(predictions, texts, sys.stdout, fmt)
        return
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with output_file(Path(out)) as tmp:
        if fmt == "npz":
            from astra_ds.eval.evaluate import save_predictions

            save_predictions(tmp, predictions.scores, predictions.ids, num_labels)  # logits, as every .npz
        else:
            with open(tmp, "w", encoding="utf-8") as stream:
                _write_lines(predictions, texts, stream, fmt)


def _write_lines(predictions, texts: list[str], stream, fmt: str) -> None:
    for text, ids, scores, names in zip(texts, predictions.ids, predictions.scores, predictions.names):
        if fmt == "jsonl":
            stream.write(json.dumps({"text": text, "ids": ids.tolist(), "names": names,
                                     "scores": [round(float(s), 6) for s in scores]}, ensure_ascii=False) + "\n")
        else:
            stream.write("".join(f"{text}\t{rank}\t{i}\t{s:.6g}\t{name}\n"
                                 for rank, (i, s, name) in enumerate(zip(ids, scores, names), 1)))


def cmd_predict(args) -> None:
    if args.top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, not {args.top_k}")
    fmt = args.format or (Path(args.out).suffix.lstrip(".") if args.out else "jsonl")
    if fmt not in ("jsonl", "tsv", "npz"):
        raise ConfigError(f"--out {args.out}: the format comes from the extension, .jsonl, .tsv or .npz (or --format)")
    if fmt == "npz" and not args.out:
        raise ConfigError("--format npz needs --out FILE.npz")
    finished_run(args.run_dir)
    if args.out:
        fresh_output(Path(args.out), args.overwrite)
    texts = _read_texts(args)
    quiet_libraries()
    from astra_ds.inference.xc_model import XCModel

    model = XCModel.load(args.run_dir, args.set, progress=True)
    if args.top_k > model.predictable_labels:
        raise ConfigError(f"--top-k {args.top_k} exceeds the model's {model.predictable_labels} labels")
    started = time.perf_counter()
    predictions = model.predict(texts, args.top_k, exact=args.exact, logits=args.logits or fmt == "npz")
    log.info("%d texts: top-%d by %s search in %.2f s", len(texts), args.top_k,
             "exact" if args.exact or model.index is None else "ANN", time.perf_counter() - started)
    _write_predictions(predictions, texts, args.out, fmt, model.num_labels)


def add_commands(commands) -> None:
    predict = run_command(
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
