"""Labels that change, measured: a share of the labels is held out of training, then added to the trained model.

    python tools/label_churn.py --config configs/recipe/delicious.yaml --out /tmp/churn_delicious
    python tools/label_churn.py --config configs/recipe/wordnet_hyper.yaml --out /tmp/churn_wnh \\
        --full-run runs/wordnet_hyper          # (c) from a finished run of the same config on all labels

The held-out labels (--fraction of L, seeded; drawn among the labels whose name no other label has, so that the
grown label set matches the run's by name without ambiguity) are removed from the dataset: the other labels are
renumbered, the held-out ones' positives dropped from every query. Then, each an `astra-ds` command:
  kept       the config trained on the remaining labels;
  zero_shot  (a) a copy of `kept` with the held-out labels added by `astra-ds labels add` (rows from their texts);
  grown      (b) `train --init-from kept` on the full label set, the classifier stage only (no Siamese, joint or
             refit stage): the held-out labels start from their texts, every row trains;
  full       (c) the config trained on all labels from the start (or --full-run).
The commands run in this process, one after another (their logs on stderr).
Every model is scored on the full test split in the dataset's label ids, top-k exact: P@1 and P@5 over all
labels; P@1, P@5 (over the test queries with a held-out positive) and recall@5 (held-out positives found in the
top 5, of all held-out positives) of the held-out labels; and P@1/P@5 counting only hits on the kept labels, which
shows whether added labels push good old ones out of the top k, as does the share of the test queries whose top-1 is
a held-out label. Training times come from each run's log
(evaluations excluded). churn.json keeps everything.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from astra_ds.config import load_config  # noqa: E402
from astra_ds.data.convert import with_labels, write_raw_text  # noqa: E402
from astra_ds.data.readers import read_dataset  # noqa: E402

K = 5
GROWN = ["siamese.epochs=0", "train.epochs=0", "classifier.refit_epochs=0"]  # (b): the classifier stage only


def held_out_labels(names: list[str] | None, num_labels: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted ids of round(fraction * L) labels drawn at random among those with a name of their own."""
    counts = Counter(names or [])
    candidates = [i for i in range(num_labels) if names is None or counts[names[i]] == 1]
    size = round(fraction * num_labels)
    if not 0 < size < len(candidates):
        raise SystemExit(f"--fraction {fraction} holds out {size} of {num_labels} labels: choose another")
    return np.sort(np.random.default_rng(seed).choice(candidates, size, replace=False))


def astra_ds(*args: str) -> None:
    """`astra-ds ARGS` in this process (the imports paid once); its log goes to stderr."""
    from astra_ds.cli.main import main

    if main(list(args)) != 0:
        raise SystemExit(f"astra-ds {' '.join(args)} failed (its error is above)")


def train(config: str, sets: list[str], out: Path, *more: str) -> None:
    if (out / "manifest.json").is_file():
        print(f"{out}: trained already, kept", flush=True)
        return
    resume = ["--resume", "auto"] if (out / "config.yaml").is_file() else ["--overwrite"] if out.exists() else []
    astra_ds("train", "--config", config, *[a for s in [*sets, f"out_dir={out}"] for a in ("--set", s)], "--no-eval",
             *resume, *more)


def train_seconds(run: Path) -> float | None:
    records = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    seconds = [r["train_seconds"] for r in records if "train_seconds" in r]
    return seconds[-1] if seconds else None


def scores(run: Path, ids_of: np.ndarray, texts: list[str], truth, held_out: np.ndarray, encoded: dict) -> dict:
    """The metrics of the model at `run` on the test split (`truth`: CSR, queries x labels); `ids_of`: the dataset's
    id of each of the model's labels; `encoded`: the test queries by encoder digest (runs that share an encoder
    encode them once)."""
    import astra_ds as api
    from astra_ds.digests import file_digest

    model = api.load(run)
    encoder = file_digest(run / "encoder.pt")
    if encoder not in encoded:
        encoded[encoder] = model.encode_tokens(model.tokenize(texts))
    predicted = ids_of[model.rank(*encoded[encoder], k=K, exact=True).ids]  # (N, K) in the dataset's ids
    rows = np.repeat(np.arange(len(texts)), K)
    hits = np.asarray(truth[rows, predicted.ravel()]).reshape(predicted.shape).astype(bool)
    is_new = np.isin(predicted, held_out)
    with_new = np.asarray(truth[:, held_out].sum(axis=1)).ravel() > 0
    new_positives = truth[:, held_out].sum()
    return {"P@1": hits[:, :1].mean() * 100, "P@5": hits.mean() * 100,
            "new P@1": (hits & is_new)[with_new, :1].mean() * 100, "new P@5": (hits & is_new)[with_new].mean() * 100,
            "new R@5": (hits & is_new).sum() / new_positives * 100,
            "old P@1": (hits & ~is_new)[:, :1].mean() * 100, "old P@5": (hits & ~is_new).mean() * 100,
            "new top-1 %": is_new[:, 0].mean() * 100}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the run config (its data.path is the full dataset)")
    parser.add_argument("--out", required=True, type=Path, help="a directory for the data and the runs (reused)")
    parser.add_argument("--fraction", type=float, default=0.1, help="share of the labels held out (default 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="draws the held-out labels")
    parser.add_argument("--full-run", type=Path, help="(c): a finished run of the config on all labels")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="for every training")
    args = parser.parse_args(argv)

    cfg = load_config(args.config, args.set)
    dataset = read_dataset(cfg.data.path)
    held_out = held_out_labels(dataset.label_texts, dataset.num_labels, args.fraction, args.seed)
    kept = np.setdiff1d(np.arange(dataset.num_labels), held_out)
    args.out.mkdir(parents=True, exist_ok=True)
    kept_data = args.out / "data_kept"
    if not kept_data.is_dir():
        kept_data.mkdir()
        write_raw_text(with_labels(dataset, kept), kept_data)
    names = dataset.label_texts or [str(i) for i in range(dataset.num_labels)]
    new_labels = args.out / "held_out_labels.txt"
    new_labels.write_text("".join(f"{names[i]}\t{names[i]}\n" for i in held_out), encoding="utf-8")
    print(f"{dataset.name}: {len(held_out)} of {dataset.num_labels} labels held out (seed {args.seed}); "
          f"{int(dataset.train.labels[:, held_out].sum())} training positives dropped", flush=True)

    runs = {"kept": args.out / "kept", "zero_shot": args.out / "zero_shot", "grown": args.out / "grown",
            "full": args.full_run or args.out / "full"}
    train(args.config, [*args.set, f"data.path={kept_data}"], runs["kept"])
    if not (runs["zero_shot"] / "manifest.json").is_file():
        shutil.rmtree(runs["zero_shot"], ignore_errors=True)
        shutil.copytree(runs["kept"], runs["zero_shot"], ignore=shutil.ignore_patterns("checkpoints", ".lock"))
        astra_ds("labels", "add", "--run-dir", str(runs["zero_shot"]), "--labels", str(new_labels))
    train(args.config, [*args.set, *GROWN], runs["grown"], "--init-from", str(runs["kept"]))
    if args.full_run is None:
        train(args.config, args.set, runs["full"])

    truth = dataset.test.labels.tocsr().astype(bool)
    ids_of = {"kept": kept, "zero_shot": np.concatenate([kept, held_out]), "grown": np.arange(dataset.num_labels),
              "full": np.arange(dataset.num_labels)}
    table, encoded = {}, {}
    for name, run in runs.items():
        table[name] = scores(run, ids_of[name], dataset.test.texts, truth, held_out, encoded)
        table[name]["train s"] = None if name == "zero_shot" else train_seconds(run)
    columns = list(next(iter(table.values())))
    print("\n| model | " + " | ".join(columns) + " |\n|" + " --- |" * (len(columns) + 1))
    for name, row in table.items():
        print(f"| {name} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in row.values()) + " |")
    full = table["full"]
    print(f"\nzero-shot new R@5 / full's: {table['zero_shot']['new R@5'] / max(full['new R@5'], 1e-9):.2f}; grown P@5 - "
          f"full's: {table['grown']['P@5'] - full['P@5']:+.2f}; grown training time / full's: "
          f"{(table['grown']['train s'] or 0) / max(full['train s'] or 1e-9, 1e-9):.2f}")
    (args.out / "churn.json").write_text(json.dumps({"config": args.config, "sets": args.set, "seed": args.seed,
                                                     "held_out": held_out.tolist(), "table": table}, indent=2))


if __name__ == "__main__":
    main()
