"""Our P@k beside PECOS XR-Linear and omikuji (Parabel/Bonsai-style label trees) on the same splits.

The peers train on TF-IDF features (sublinear tf, word n-grams up to --ngrams) of the same query texts our
readers produce (for the BoW benchmarks: the documents' words) and are scored by our metrics code (xclib
conventions, P@k and PSP@k computed on their top-5 predictions). They pin numpy < 2, so they run
in their own virtual environment, .venv-peers, which this tool creates on first use (libpecos is installed
without its optional deep-learning dependencies, which XR-Linear does not use).

    python tools/compare_peers.py --dataset bibtex=../shared/data/Bibtex --ours bibtex=runs/bibtex \\
        --dataset delicious=../shared/data/Delicious --ours delicious=runs/delicious
    python tools/compare_peers.py --ngrams 2 --dataset wordnet=../shared/data/WordNetHyper \\
        --ours wordnet=runs/wordnet_hyper
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / ".venv-peers"
PEER_PACKAGES = ["numpy<2", "scipy<1.14", "scikit-learn", "omikuji", "milksnake"]


def _in_peer_venv() -> bool:
    return Path(sys.prefix).resolve() == VENV.resolve()


def _ensure_venv() -> Path:
    python = VENV / "bin" / "python"
    if not python.exists():
        print(f"creating {VENV} (PECOS, omikuji) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER_PACKAGES], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "libpecos"], check=True)
    return python


def _tfidf(dataset, ngrams: int):
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(token_pattern=r"\S+", sublinear_tf=True, dtype="float32", ngram_range=(1, ngrams))
    return vectorizer.fit_transform(dataset.train.texts), vectorizer.transform(dataset.test.texts)


def train_pecos(x_train, y_train, x_test, k: int):
    import numpy as np
    from pecos.xmc import Indexer, LabelEmbeddingFactory
    from pecos.xmc.xlinear.model import XLinearModel

    y_train = y_train.astype(np.float32).tocsr()
    label_features = LabelEmbeddingFactory.create(y_train, x_train, method="pifa")
    model = XLinearModel.train(x_train, y_train, C=Indexer.gen(label_features))
    scores = model.predict(x_test, beam_size=max(10, k), only_topk=k)
    return _topk_ids(scores.tocsr(), k)


def train_omikuji(x_train, y_train, x_test, k: int):
    import numpy as np
    import omikuji

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.txt"
        with open(path, "w") as f:
            f.write(f"{x_train.shape[0]} {x_train.shape[1]} {y_train.shape[1]}\n")
            for i in range(x_train.shape[0]):
                labels = ",".join(map(str, y_train[i].indices))
                row = x_train[i]
                f.write(labels + " " + " ".join(f"{j}:{v:.6f}" for j, v in zip(row.indices, row.data)) + "\n")
        model = omikuji.Model.train_on_data(str(path), omikuji.Model.default_hyper_param())
    ids = np.full((x_test.shape[0], k), -1, dtype=np.int64)
    for i in range(x_test.shape[0]):
        row = x_test[i]
        predicted = model.predict(list(zip(row.indices.tolist(), row.data.tolist())), top_k=k)
        ids[i, :len(predicted)] = [label for label, _ in predicted]
    return ids


def _topk_ids(scores, k: int):
    import numpy as np

    ids = np.full((scores.shape[0], k), -1, dtype=np.int64)
    for i in range(scores.shape[0]):
        lo, hi = scores.indptr[i], scores.indptr[i + 1]
        order = np.argsort(-scores.data[lo:hi])[:k]
        ids[i, :len(order)] = scores.indices[lo:hi][order]
    return ids


def run_peers(datasets: dict[str, str], ngrams: int, k: int = 5) -> dict:
    """In the peer venv: train both peers on each dataset, return their metrics and timings."""
    sys.path.insert(0, str(REPO))
    from astra_ds.data.readers import read_dataset
    from astra_ds.data.queries import TrainCounts
    from astra_ds.eval.metrics import compute_metrics, inverse_propensity

    results = {}
    for name, path in datasets.items():
        dataset = read_dataset(path)
        x_train, x_test = _tfidf(dataset, ngrams)
        inv_psp = inverse_propensity(TrainCounts.of(dataset.train.labels))
        for peer, train in (("pecos_xr_linear", train_pecos), ("omikuji", train_omikuji)):
            started = time.perf_counter()
            ids = train(x_train, dataset.train.labels, x_test, k)
            seconds = time.perf_counter() - started
            results[f"{name}/{peer}"] = {"seconds": seconds, **compute_metrics(ids, dataset.test.labels, inv_psp)}
            print(f"{name}/{peer}: P@1 {100 * results[f'{name}/{peer}']['P@1']:.2f} ({seconds:.0f}s)", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", action="append", required=True, metavar="NAME=PATH")
    parser.add_argument("--ours", action="append", default=[], metavar="NAME=RUN_DIR",
                        help="a finished astra-ds run on that dataset (its metrics.json)")
    parser.add_argument("--ngrams", type=int, default=1, help="TF-IDF over word n-grams up to this n")
    parser.add_argument("--peers-json", help=argparse.SUPPRESS)  # set when re-run inside the peer venv
    args = parser.parse_args()
    datasets = dict(spec.partition("=")[::2] for spec in args.dataset)

    if args.peers_json:  # inside the venv
        Path(args.peers_json).write_text(json.dumps(run_peers(datasets, args.ngrams)))
        return
    python = _ensure_venv()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "peers.json"
        command = [str(python), str(Path(__file__).resolve()), *sum((["--dataset", d] for d in args.dataset), []),
                   "--ngrams", str(args.ngrams), "--peers-json", str(out)]
        with open(Path(tmp) / "peers.log", "w+") as log:  # omikuji draws progress bars on stderr
            done = subprocess.run(command, stderr=log, env={**os.environ, "PYTHONPATH": str(REPO)})
            if done.returncode != 0:
                log.seek(0)
                raise SystemExit(f"peer training failed:\n{log.read()[-3000:]}")
        results = json.loads(out.read_text())
    for spec in args.ours:
        name, _, run_dir = spec.partition("=")
        metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
        results[f"{name}/astra_ds"] = metrics["astra_ds"]

    columns = ["P@1", "P@3", "P@5", "PSP@1", "PSP@3", "PSP@5"]
    print(f"\n{'dataset / method':<28}" + "".join(f"{c:>8}" for c in columns))
    for key in sorted(results):
        print(f"{key:<28}" + "".join(f"{100 * results[key][c]:8.2f}" for c in columns))


if __name__ == "__main__":
    main()
