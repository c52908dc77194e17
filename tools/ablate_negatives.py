"""Negative-sampling ablation: the same model trained with each negative sampler, on each dataset.

Variants (DESIGN §2):
  uniform      uniform negatives only, importance-weighted
  hard_only    stale hard negatives only: shortlist softmax (alpha = 1), no uniform part, no weights
  astra        the ASTRA mixture (alpha from the config), importance-weighted
  ngame        NGAME: clustered mini-batches, in-batch negatives + uniform ones outside the batch
  ngame_astra  NGAME batches and in-batch negatives + the ASTRA mixture outside the batch
  *_label_init the same with classifier rows initialised from the label texts (astra_label_init,
               ngame_astra_label_init)
Each dataset comes with its run config (which names the data); every run is a fresh `python -m astra_ds
train` with that config, the common overrides and the variant's, and the same seed. The table prints P@1,
P@5, PSP@5 and wall time per run, and P@1 after each epoch when runs evaluate every epoch
(--set eval.every_epoch=true); ablation.json keeps everything.

    python tools/ablate_negatives.py --dataset synthetic=configs/synthetic.yaml \\
        --dataset delicious=configs/delicious.yaml \\
        --set train.epochs=2 --set negatives.warmup_epochs=1 --set negatives.refresh_every=1
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {
    "uniform": ["negatives.strategy=uniform"],
    "hard_only": ["negatives.strategy=astra", "negatives.alpha=1.0", "negatives.importance_weights=false"],
    "astra": ["negatives.strategy=astra"],
    "ngame": ["negatives.strategy=uniform", "negatives.in_batch=true", "batching.mode=clustered"],
    "ngame_astra": ["negatives.strategy=astra", "negatives.in_batch=true", "batching.mode=clustered"],
}
VARIANTS |= {f"{name}_label_init": [*VARIANTS[name], "table.init=label_text"] for name in ("astra", "ngame_astra")}
DEFAULT_VARIANTS = ["uniform", "hard_only", "astra", "ngame", "ngame_astra"]


def run_variant(config: str, overrides: list[str], out_dir: Path) -> dict:
    args = [sys.executable, "-m", "astra_ds", "train", "--config", config]
    for override in [*overrides, f"out_dir={out_dir}"]:
        args += ["--set", override]
    started = time.perf_counter()
    result = subprocess.run(args, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"run failed ({' '.join(args)}):\n{result.stderr[-2000:]}")
    metrics = json.loads((out_dir / "metrics.json").read_text())
    records = [json.loads(line) for line in (out_dir / "train_log.jsonl").read_text().splitlines()]
    p1_by_epoch = [r["test_P@1"] for r in records if "test_P@1" in r] + [metrics["astra_ds"]["P@1"]]
    return {"seconds": seconds, **metrics["astra_ds"], "P@1_by_epoch": p1_by_epoch,
            "popularity_P@1": metrics["popularity"]["P@1"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", action="append", required=True, metavar="NAME=CONFIG",
                        help="a name and the run config that trains on it (repeatable)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    parser.add_argument("--out-dir", default="runs/ablation")
    args = parser.parse_args()

    results = {}
    for spec in args.dataset:
        name, _, config = spec.partition("=")
        for variant in args.variants:
            out = Path(args.out_dir) / name / variant
            print(f"training {name} / {variant} ...", flush=True)
            results[f"{name}/{variant}"] = run_variant(config, [*args.set, *VARIANTS[variant]], out)
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.out_dir) / "ablation.json").write_text(json.dumps({"overrides": args.set, "results": results}, indent=2))

    print(f"\n{'dataset / variant':<40}{'P@1':>8}{'P@5':>8}{'PSP@5':>8}{'wall s':>9}   P@1 after each epoch")
    for key, r in results.items():
        curve = " ".join(f"{100 * p:.2f}" for p in r["P@1_by_epoch"])
        print(f"{key:<40}{100 * r['P@1']:8.2f}{100 * r['P@5']:8.2f}{100 * r['PSP@5']:8.2f}{r['seconds']:9.0f}   {curve}")


if __name__ == "__main__":
    main()
