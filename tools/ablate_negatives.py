"""Negative-sampling ablation: the same model trained with each negative sampler, on each dataset.

Variants (DESIGN §2):
  uniform    uniform negatives only, importance-weighted
  hard_only  stale hard negatives only: shortlist softmax (alpha = 1), no uniform part, no weights
  astra      the ASTRA mixture (alpha from the config), importance-weighted
Every run is a fresh `python -m astra_ds train` with the same config and seed; the table prints P@1, P@5,
PSP@5 and wall time per run, and ablation.json keeps everything.

    python tools/ablate_negatives.py --dataset synthetic=data/synthetic --dataset delicious=../shared/data/Delicious \\
        --set train.epochs=4 --set negatives.warmup_epochs=1 --set negatives.refresh_every=1
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
}


def run_variant(config: str | None, overrides: list[str], out_dir: Path) -> dict:
    args = [sys.executable, "-m", "astra_ds", "train", *(["--config", config] if config else [])]
    for override in [*overrides, f"out_dir={out_dir}"]:
        args += ["--set", override]
    started = time.perf_counter()
    result = subprocess.run(args, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"run failed ({' '.join(args)}):\n{result.stderr[-2000:]}")
    metrics = json.loads((out_dir / "metrics.json").read_text())
    return {"seconds": seconds, **metrics["astra_ds"], "popularity_P@1": metrics["popularity"]["P@1"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", action="append", required=True, metavar="NAME=PATH")
    parser.add_argument("--config", help="base YAML config (default: the built-in defaults)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out-dir", default="runs/ablation")
    args = parser.parse_args()

    results = {}
    for spec in args.dataset:
        name, _, path = spec.partition("=")
        for variant in args.variants:
            out = Path(args.out_dir) / name / variant
            print(f"training {name} / {variant} ...", flush=True)
            results[f"{name}/{variant}"] = run_variant(args.config, [f"data.path={path}", *args.set,
                                                                     *VARIANTS[variant]], out)
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.out_dir) / "ablation.json").write_text(json.dumps({"overrides": args.set, "results": results}, indent=2))

    print(f"\n{'dataset / variant':<28}{'P@1':>8}{'P@5':>8}{'PSP@5':>8}{'wall s':>9}")
    for key, r in results.items():
        print(f"{key:<28}{100 * r['P@1']:8.2f}{100 * r['P@5']:8.2f}{100 * r['PSP@5']:8.2f}{r['seconds']:9.0f}")


if __name__ == "__main__":
    main()
