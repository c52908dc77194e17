"""Ablation: the same model trained with each variant, on each dataset, in one table.

Named variants (overrides of the dataset's run config):
  uniform        uniform negatives only, importance-weighted
  hard_only      stale hard negatives only: shortlist softmax (alpha = 1), no uniform part, no weights
  astra          the ASTRA mixture (alpha from the config), importance-weighted
  ngame          NGAME: clustered mini-batches, in-batch negatives + uniform ones outside the batch
  ngame_astra    NGAME batches and in-batch negatives + the ASTRA mixture outside the batch
  *_label_init   the same with classifier rows initialised from the label texts (astra_label_init,
                 ngame_astra_label_init)
  config         the dataset's config as it is (a recipe such as configs/wordnet_hyper.yaml)
and ad-hoc ones: --variant NAME:KEY=VALUE,KEY=VALUE (e.g. no_dual:eval.label_text_weight=0).
Each dataset comes with its run config (which names the data); every run is a fresh `python -m astra_ds train`
with that config, the common overrides and the variant's; with --seeds, once per seed (train.seed), and the
table prints the mean and, beside it, the standard deviation of P@1. The table prints P@1/3/5, PSP@1/3/5, wall
time and training time (evaluations excluded) per run, and the P@1 curve when runs evaluate along the way
(--set eval.every_epochs=0.5); then, per dataset, each variant's P@1 at the training time of the dataset's
fastest run (its last evaluation before that time): the comparison at equal wall time. With --reach 0.5 0.6,
also the epochs each run took to reach each P@1 (its first evaluation at or above it; a curve starts with an
evaluation before training). Runs with a validation split (--set data.validation_fraction=0.05) evaluate along
the way on it, and are evaluated on it at the end too (`astra-ds eval --split validation`): the table adds its
P@1 and P@5 (val P@1, val P@5), and the curves are validation P@1, so that choices are made on validation data.
ablation.json keeps everything.

    python tools/ablate.py --dataset synthetic=configs/synthetic.yaml \\
        --dataset delicious=configs/delicious.yaml --set eval.every_epochs=0.5 \\
        --set train.epochs=2 --set negatives.warmup_epochs=1 --set negatives.refresh_every=1
    python tools/ablate.py --dataset wordnet=configs/wordnet_hyper.yaml --variants config \\
        --variant no_dual:eval.label_text_weight=0 --variant uniform:negatives.strategy=uniform
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

VARIANTS = {
    "uniform": ["negatives.strategy=uniform"],
    "hard_only": ["negatives.strategy=astra", "negatives.alpha=1.0", "negatives.importance_weights=false"],
    "astra": ["negatives.strategy=astra"],
    "ngame": ["negatives.strategy=uniform", "negatives.in_batch=true", "batching.mode=clustered"],
    "ngame_astra": ["negatives.strategy=astra", "negatives.in_batch=true", "batching.mode=clustered"],
}
VARIANTS |= {f"{name}_label_init": [*VARIANTS[name], "table.init=label_text"] for name in ("astra", "ngame_astra")}
VARIANTS["config"] = []
DEFAULT_VARIANTS = ["uniform", "hard_only", "astra", "ngame", "ngame_astra"]
METRICS = ["P@1", "P@3", "P@5", "PSP@1", "PSP@3", "PSP@5"]
VALIDATION_METRICS = ["P@1", "P@5"]


def _run(args: list[str]) -> None:
    result = subprocess.run(args, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"run failed ({' '.join(args)}):\n{result.stderr[-2000:]}")


def validation_metrics(out_dir: Path) -> dict | None:
    """A finished run's metrics on its validation split, when it has one."""
    if not yaml.safe_load((out_dir / "config.yaml").read_text())["data"].get("validation_fraction"):
        return None
    _run([sys.executable, "-m", "astra_ds", "eval", "--run-dir", str(out_dir), "--split", "validation", "--exact",
          "--out-dir", str(out_dir / "validation"), "--overwrite"])
    return json.loads((out_dir / "validation" / "metrics.json").read_text())["astra_ds"]


def run_variant(config: str, overrides: list[str], out_dir: Path) -> dict:
    args = [sys.executable, "-m", "astra_ds", "train", "--config", config]
    for override in [*overrides, f"out_dir={out_dir}"]:
        args += ["--set", override]
    started = time.perf_counter()
    _run(args)
    seconds = time.perf_counter() - started
    metrics = json.loads((out_dir / "metrics.json").read_text())
    validation = validation_metrics(out_dir)
    records = [json.loads(line) for line in (out_dir / "train_log.jsonl").read_text().splitlines()]
    end = [r for r in records if "loss" in r][-1]
    along = "validation_P@1" if validation else "test_P@1"  # the split evaluated along the way
    curve = [(r["epochs_done"], r["train_seconds"], r[along]) for r in records if along in r]
    curve.append((end["epochs_done"], end["train_seconds"], (validation or metrics["astra_ds"])["P@1"]))
    return {"seconds": seconds, "train_seconds": end["train_seconds"], **metrics["astra_ds"], "validation": validation,
            "P@1_curve": curve, "popularity_P@1": metrics["popularity"]["P@1"]}


def p1_at(curve: list, seconds: float) -> float | None:
    """P@1 of the last evaluation within `seconds` of training."""
    within = [p1 for _, trained, p1 in curve if trained <= seconds + 1e-6]
    return within[-1] if within else None


def epochs_to_reach(curve: list, p1: float) -> float | None:
    """Epochs done at the first evaluation with a P@1 of at least `p1`."""
    return next((epochs for epochs, _, reached in curve if reached >= p1), None)


def parse_variant(spec: str) -> tuple[str, list[str]]:
    name, sep, overrides = spec.partition(":")
    if not sep or not name:
        raise SystemExit(f"--variant expects NAME:KEY=VALUE[,KEY=VALUE...], not {spec!r}")
    return name, [o for o in overrides.split(",") if o]


def summarise(runs: list[dict]) -> dict:
    """One variant over its seeds: the mean of each figure, the standard deviation of P@1, the first curve."""
    mean = {key: sum(r[key] for r in runs) / len(runs) for key in [*METRICS, "seconds", "train_seconds"]}
    spread = (sum((r["P@1"] - mean["P@1"]) ** 2 for r in runs) / max(len(runs) - 1, 1)) ** 0.5
    validation = None
    if all(r["validation"] for r in runs):
        validation = {key: sum(r["validation"][key] for r in runs) / len(runs) for key in VALIDATION_METRICS}
    return mean | {"P@1_sd": spread, "seeds": len(runs), "validation": validation, "P@1_curve": runs[0]["P@1_curve"],
                   "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", action="append", required=True, metavar="NAME=CONFIG",
                        help="a name and the run config that trains on it (repeatable)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    parser.add_argument("--variants", nargs="*", default=None, choices=list(VARIANTS),
                        help=f"named variants (default: {' '.join(DEFAULT_VARIANTS)}, unless --variant is given)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                        help="an ad-hoc variant (repeatable)")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="train each variant once per seed")
    parser.add_argument("--out-dir", default="runs/ablation")
    parser.add_argument("--reach", nargs="+", type=float, default=[], metavar="P@1",
                        help="print the epochs each run took to reach these P@1 values (0.6 for 60%%)")
    args = parser.parse_args()
    names = args.variants if args.variants is not None else ([] if args.variant else DEFAULT_VARIANTS)
    variants = {name: VARIANTS[name] for name in names} | dict(map(parse_variant, args.variant))

    results = {}
    for spec in args.dataset:
        name, _, config = spec.partition("=")
        for variant, overrides in variants.items():
            runs = []
            for seed in args.seeds or [None]:
                out = Path(args.out_dir) / name / (variant if seed is None else f"{variant}_seed{seed}")
                seed_override = [] if seed is None else [f"train.seed={seed}"]
                print(f"training {name} / {variant}{'' if seed is None else f' (seed {seed})'} ...", flush=True)
                runs.append(run_variant(config, [*args.set, *overrides, *seed_override], out))
            results[f"{name}/{variant}"] = summarise(runs)
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.out_dir) / "ablation.json").write_text(json.dumps(
        {"overrides": args.set, "variants": variants, "seeds": args.seeds, "results": results}, indent=2))

    validated = any(r["validation"] for r in results.values())
    print(f"\n{'dataset / variant':<36}" + "".join(f"{m:>7}" for m in METRICS) + f"{'P@1 sd':>7}"
          + ("".join(f"{'val ' + m:>10}" for m in VALIDATION_METRICS) if validated else "")
          + f"{'wall s':>8}{'train s':>8}   {'validation' if validated else 'test'} P@1 along the way (epochs: P@1)")
    for key, r in results.items():
        curve = " ".join(f"{epochs:.2f}:{100 * p1:.2f}" for epochs, _, p1 in r["P@1_curve"])
        spread = f"{100 * r['P@1_sd']:7.2f}" if r["seeds"] > 1 else f"{'-':>7}"
        columns = ""
        if validated:
            columns = "".join(f"{100 * r['validation'][m]:10.2f}" if r["validation"] else f"{'-':>10}"
                              for m in VALIDATION_METRICS)
        print(f"{key:<36}" + "".join(f"{100 * r[m]:7.2f}" for m in METRICS) + spread + columns
              + f"{r['seconds']:8.0f}{r['train_seconds']:8.0f}   {curve}")
    for spec in args.dataset:
        name = spec.partition("=")[0]
        runs = {key: r for key, r in results.items() if key.startswith(f"{name}/")}
        budget = min(r["train_seconds"] for r in runs.values())
        print(f"\n{name}: P@1 within {budget:.0f} s of training (the fastest run's time)")
        for key, r in runs.items():
            p1 = p1_at(r["P@1_curve"], budget)
            print(f"  {key:<34}{'-' if p1 is None else f'{100 * p1:.2f}':>7}")
        if args.reach:
            print(f"\n{name}: epochs to reach a P@1 of " + ", ".join(f"{100 * p1:.1f}" for p1 in args.reach))
            for key, r in runs.items():
                reached = [epochs_to_reach(r["P@1_curve"], p1) for p1 in args.reach]
                print(f"  {key:<34}" + "".join(f"{'-' if e is None else f'{e:.2f}':>7}" for e in reached))


if __name__ == "__main__":
    main()
