"""Preparation of a dataset (`astra-ds data prepare`) against its limit, in one run: the tokenizer alone on the
same texts (its fast batch encoder, no reading, no writing), then the whole preparation with 1 worker and with W;
printed are the queries a second of each (the best of --repeats runs: this machine's speed varies by 10-20% from
one run to the next), the ratios (preparation / tokenizer alone, W workers / 1) and the disk a query and a
positive take. With --start, a training run's start-up on the prepared directory (--start-files: on the
dataset's files too, prepared into the run's cache by a first run; --start-on DIR: on DIR alone, nothing prepared):
seconds from the command to the trainer built (data, model, table, engine: the log's "data ..." line) and to the
end of its first step, and the process's private memory (RssAnon) as that step began.

    python tools/bench_data.py --num-train 1000000 --num-labels 100000 --workers 2 --repeats 2 --start
    python tools/bench_data.py --data ../shared/data/WordNetHyper --set encoder.model=all-MiniLM-L6-v2
    python tools/bench_data.py --start-on /data/prepared_1e7
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from astra_ds.config import load_config
from astra_ds.data.preparation import MANIFEST, prepare
from astra_ds.data.readers import read_lines
from astra_ds.data.synth import SynthConfig, generate
from astra_ds.encoder.encoder import build_tokenizer
from astra_ds.libraries import quiet_libraries


def tokenizer_alone(cfg, texts: list[str], max_len: int, block: int = 8192) -> float:
    """Seconds the fast tokenizer takes over `texts` (truncated at `max_len`), in blocks as preparation does."""
    backend = build_tokenizer(cfg.encoder).backend_tokenizer
    backend.enable_truncation(max_len)
    started = time.perf_counter()
    for start in range(0, len(texts), block):
        backend.encode_batch_fast(texts[start:start + block])
    return time.perf_counter() - started


def prepared(cfg, out: Path, workers: int, unit_rows: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    assert prepare(cfg, out, functools.partial(build_tokenizer, cfg.encoder), workers, unit_rows=unit_rows,
                   progress=False)
    return time.perf_counter() - started


START_RUN = ["train.max_steps=1", "train.log_every=1", "negatives.strategy=uniform", "batching.mode=random",
             "eval.ann_index=false"]


def start_up(sets: list[str], data: Path, out: Path, cache: Path) -> tuple[float, float, int]:
    """(seconds from the command to the trainer built (its "data ..." line), to the end of the first step, RssAnon
    as the step began) of `astra-ds train`."""
    shutil.rmtree(out, ignore_errors=True)
    args = [a for s in [*sets, *START_RUN, f"data.path={data}", f"out_dir={out}", f"data.cache_dir={cache}"]
            for a in ("--set", s)]
    started = time.perf_counter()
    job = subprocess.Popen([sys.executable, "-m", "astra_ds", "train", "--no-eval", *args],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    built, lines = [], []

    def watch() -> None:  # the log as it comes: the moment the trainer is built
        for line in job.stderr:
            lines.append(line)
            if not built and "] data " in line and " | stages " in line:
                built.append(time.perf_counter() - started)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    log = out / "train_log.jsonl"
    while not (log.is_file() and '"loss"' in log.read_text()):
        if job.poll() is not None and not log.is_file():
            watcher.join()
            raise SystemExit("the run failed:\n" + "".join(lines)[-2000:])
        time.sleep(0.02)
    seconds = time.perf_counter() - started
    status = job.wait()
    watcher.join()
    if status != 0 or not built:
        raise SystemExit("the run failed:\n" + "".join(lines)[-2000:])
    return built[0], seconds, json.loads((out / "memory.json").read_text())["rss_anon_at_start_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="a dataset directory (default: a synthetic one of --num-train queries)")
    parser.add_argument("--num-train", type=int, default=200_000)
    parser.add_argument("--num-labels", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--unit-rows", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each measurement; the best is printed")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--start", action="store_true", help="also time a training run's start-up on the prepared "
                        "directory")
    parser.add_argument("--start-files", action="store_true", help="with --start, on the dataset's files too")
    parser.add_argument("--start-on", metavar="DIR", help="only time the start-up on this prepared directory "
                        "(prepared with the same --set), e.g. one too large to prepare again here")
    parser.add_argument("--work-dir", help="where the data and the prepared directories go (default: a temporary one)")
    args = parser.parse_args()
    quiet_libraries()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_data_"))
    sets = ["encoder.model=all-MiniLM-L6-v2", "data.validation_fraction=0", *args.set]  # as prepared
    try:
        if args.start_on:
            print_start_up(f"prepared directory {args.start_on}",
                           start_up(sets, Path(args.start_on), work / "run", work / "cache"))
        else:
            measure(args, sets, work)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)


def print_start_up(name: str, measured: tuple[float, float, int]) -> None:
    built, seconds, private = measured
    print(f"start-up, {name}: {built:.1f} s to the trainer built, {seconds:.1f} s to the end of the first step, "
          f"RssAnon {private / 2**20:,.1f} MiB as it began")


def measure(args, sets: list[str], work: Path) -> None:
    """The tokenizer alone, the preparation with 1 and W workers, the disk, and with --start the start-ups."""
    data = Path(args.data) if args.data else generate(
        SynthConfig(num_labels=args.num_labels, num_train=args.num_train, num_test=1000, seed=1), work / "synth",
        exist_ok=True)
    cfg = load_config(None, [*sets, f"data.path={data}"])
    texts = read_lines(data / "trn_X.txt") + read_lines(data / "tst_X.txt")
    label_texts = read_lines(data / "Y.txt") if (data / "Y.txt").is_file() else []
    alone = min(tokenizer_alone(cfg, texts, cfg.data.max_len) + tokenizer_alone(cfg, label_texts,
                                                                                 cfg.siamese.label_max_len)
                for _ in range(args.repeats))
    rows = len(texts) + len(label_texts)
    seconds = {w: min(prepared(cfg, work / f"prepared_{w}", w, args.unit_rows) for _ in range(args.repeats))
               for w in sorted({1, args.workers})}
    manifest = json.loads((work / "prepared_1" / MANIFEST).read_text())
    queries = sum(manifest["splits"][part]["rows"] for part in ("train", "validation", "test")
                  if part in manifest["splits"])
    positives = sum(manifest["splits"][part].get("positives", 0) for part in manifest["splits"])
    units = work / "prepared_1" / "units"
    query_bytes = sum(p.stat().st_size for pattern in ("train-*/*", "test-*/*") for p in units.glob(pattern))
    disk = sum(p.stat().st_size for p in (work / "prepared_1").rglob("*") if p.is_file())
    print(f"data {data}: {len(texts):,} query texts (max_len {cfg.data.max_len}), {len(label_texts):,} label texts "
          f"(max_len {cfg.siamese.label_max_len}), {cfg.encoder.model} tokens")
    print(f"tokenizer alone (encode_batch_fast)  {rows / alone:12,.0f} texts/s")
    for workers, s in seconds.items():
        print(f"data prepare, {workers} worker(s)        {rows / s:12,.0f} texts/s   {alone / s:.2f} of the tokenizer "
              "alone")
    if args.workers > 1:
        print(f"{args.workers} workers / 1: {seconds[1] / seconds[args.workers]:.2f}x")
    print(f"disk: {(query_bytes - 4 * positives) / queries:.1f} B a query + 4 B a positive "
          f"({disk / 2**20:.1f} MiB in all, with the label texts and counts)")
    if args.start:
        runs = {"prepared directory": (work / "prepared_1", 1)}
        if args.start_files:
            runs["dataset files, prepared into the cache"] = (data, 2)  # the first run prepares them
        for name, (path, times) in runs.items():
            print_start_up(name, [start_up(sets, path, work / "run", work / "cache") for _ in range(times)][-1])


if __name__ == "__main__":
    main()
