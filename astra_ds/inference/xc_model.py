"""A finished run loaded for inference:

    model = astra_ds.load("runs/synthetic")
    predictions = model.predict(["a text to tag"], k=5)   # .ids, .scores (probabilities), .names
    embeddings = model.encode(["a text"])                  # (N, d) unit vectors

Everything comes from the run directory (model.json, config.yaml, encoder.pt, table/, label_embeddings/,
neighbours/, label_names.txt, ann/); the dataset is not read. The top-k comes from the serving index when the run
has one, else (or with exact=True) from the blockwise exact search over the rows, which are then read into memory;
with kNN votes (scoring/neighbour_votes.py), the training queries' votes re-rank its top candidates.
"""

from __future__ import annotations

import dataclasses
import json
from importlib.metadata import version
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from astra_ds.config import RunConfig
from astra_ds.data.prepare import PreparedData, prepare_data
from astra_ds.data.queries import Texts
from astra_ds.data.tokens import TokenizedTexts, tokenize
from astra_ds.encoder.encoder import QueryEncoder, build_tokenizer
from astra_ds.errors import ConfigError, UserError
from astra_ds.inference.evaluation import Evaluation, Search, evaluate_model
from astra_ds.labels import change as labels
from astra_ds.labels.label_file import NewLabels
from astra_ds.libraries import quiet_libraries
from astra_ds.rundir.card import ModelCard
from astra_ds.rundir.run_dir import RunDir
from astra_ds.rundir.serving_index import load_neighbour_index, load_serving_index
from astra_ds.scoring.neighbour_votes import NeighbourVotes
from astra_ds.scoring.rows import ScoringRows, VectorsInMemory, encode_queries, exact_topk
from astra_ds.table.store import StoredRows


@dataclass
class Predictions:
    ids: np.ndarray  # (N, k) label ids, best first
    scores: np.ndarray  # (N, k) probabilities, or logits (predict(..., logits=True))
    names: list[list[str]]  # the labels' names (their texts), or their ids when the dataset had no label texts


class XCModel:
    def __init__(self, run: RunDir, cfg: RunConfig, card: ModelCard, tokenizer, encoder: QueryEncoder,
                 device: torch.device, label_names: list[str] | None, progress: bool = False,
                 with_index: bool = True, overrides: list[str] = ()):
        """`overrides`: the config keys `cfg` changed from the run's (a reload applies them again)."""
        self.run, self.cfg, self.card, self.tokenizer, self.encoder = run, cfg, card, tokenizer, encoder
        self.device, self.label_names, self.progress = device, label_names, progress
        self.overrides = list(overrides)
        self.label_text_weight = cfg.eval.label_text_weight  # the card's, unless overridden
        self.retired = run.read_retired()  # sorted ids never predicted
        self.index = load_serving_index(run, cfg.index, card, self.label_text_weight) if with_index else None
        self.neighbour_index = load_neighbour_index(run, cfg.index) if with_index else None
        self._scoring_rows: VectorsInMemory | None = None
        self._neighbour_votes: NeighbourVotes | None = None

    @classmethod
    def load(cls, run_dir: str | Path, overrides: list[str] = (), device: str | None = None,
             progress: bool = False, transformers_backbone: bool = False, changing: bool = False) -> "XCModel":
        """`overrides`: config keys to change, e.g. ["index.nprobe=64", "eval.batch_size=64"].
        `transformers_backbone`: the encoder's transformer as a transformers model (the export saves it), not
        model/bert.py's plain-torch BERT, which loads faster. `changing`: a run that a `labels` change has
        withdrawn (verified before it began), loaded without its serving index."""
        run = RunDir(run_dir)
        card = run.read_card(verify=not changing)  # verified: a finished run, its files as training wrote them
        cfg = run.read_config(overrides)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        encoder = QueryEncoder(cfg.encoder, card.num_labels, for_weights=not transformers_backbone)
        encoder.load_trained(run.encoder_weights, cfg.encoder)
        if not transformers_backbone:  # the export saves the transformer's weights in float32
            encoder.cast_for_inference()
        return cls(run, cfg, card, build_tokenizer(cfg.encoder), encoder.to(device).eval(), device,
                   run.read_label_names(card.num_labels), progress, with_index=not changing, overrides=overrides)

    @property
    def num_labels(self) -> int:
        return self.card.num_labels

    def description(self) -> dict:
        """What is served: the model card, where it came from, its version (its manifest's digest, which moves
        with any change of the model) and how the top-k is searched."""
        index = json.loads(self.run.serving_index_info.read_text())["kind"] if self.index else "exact"
        return dataclasses.asdict(self.card) | {
            "run_dir": str(self.run.path.resolve()), "version": self.run.version(),
            "index": index, "served_label_text_weight": self.label_text_weight,
            "served_neighbour_weight": self.cfg.eval.neighbour_weight, "astra_ds": version("astra_ds")}

    def scoring_rows(self) -> VectorsInMemory:
        """The vectors exact search scores against, read and computed at the first use (the rows and label-text
        embeddings they are made of are not kept)."""
        if self._scoring_rows is None:
            embeddings = None
            if self.label_text_weight:
                if not self.run.label_embeddings.is_dir():
                    raise UserError(f"eval.label_text_weight > 0 needs label-text embeddings, and {self.run} "
                                    "has none: it was trained without dual scoring")
                embeddings = StoredRows(self.run.label_embeddings, self.num_labels).load()
            rows = StoredRows(self.run.table, self.num_labels).load()
            rows.device = self.device
            self._scoring_rows = ScoringRows(rows, self.card.normalize_rows, embeddings, self.label_text_weight,
                                             self.card.row_scales).in_memory(self.cfg.eval.label_block)
        return self._scoring_rows

    def neighbour_votes(self) -> NeighbourVotes | None:
        """The kNN votes of the run's training queries (read at the first use), or None with no neighbour_weight."""
        if not self.cfg.eval.neighbour_weight:
            return None
        if self._neighbour_votes is None:
            if not self.run.neighbours.is_dir():
                raise UserError(f"eval.neighbour_weight > 0 needs the training queries' embeddings, and {self.run} "
                                "has none: it was trained without kNN votes")
            self._neighbour_votes = NeighbourVotes.load(self.run.neighbours, self.cfg.eval, self.num_labels)
        return self._neighbour_votes

    def load_data(self) -> PreparedData:
        """The data the model is evaluated on: its run's dataset (and validation split), or another one of the same
        labels (the override data.path=...)."""
        data = prepare_data(self.cfg, self.tokenizer)
        if data.num_labels != self.num_labels:
            raise ConfigError(f"the data at {self.cfg.data.path} has {data.num_labels} labels, the model "
                              f"{self.num_labels}")
        return data

    def tokenize(self, texts: list[str]) -> TokenizedTexts:
        if isinstance(texts, str):
            raise UserError("texts must be a list of strings, not one string")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise UserError(f"the text at position {i} is a {type(text).__name__}, not a string")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:  # bytes that were not UTF-8, decoded with surrogateescape
                raise UserError(f"the text at position {i} holds a lone surrogate ({text[err.start]!r}), which is "
                                "not a character: is its source UTF-8?") from None
        empty = [i for i, text in enumerate(texts) if not text.strip()]
        if empty:
            raise UserError(f"empty text at position {empty[0]} ({len(empty)} empty in all)")
        return tokenize(list(texts), self.tokenizer, self.card.max_len)

    def encode_tokens(self, tokens: Texts) -> tuple[torch.Tensor, torch.Tensor]:
        """Query embeddings (N, d, host) and the calibration (log scale, bias)."""
        return encode_queries(self.encoder, tokens, self.cfg.eval.batch_size, self.device, self.progress)

    def encode_queries(self, texts: list[str]) -> torch.Tensor:
        """(N, d) unit-norm embeddings of `texts` as the model's queries, on the host."""
        return self.encode_tokens(self.tokenize(texts))[0]

    def encode(self, texts: list[str]) -> np.ndarray:
        """encode_queries as a float32 array."""
        return self.encode_queries(texts).numpy()

    def topk(self, queries: torch.Tensor, k: int, exact: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores <q, v>, label ids), (N, k) each: from the serving index unless `exact` or there is none; with kNN
        votes, the top neighbour_candidates so found re-ranked by <q, v> + neighbour_weight x votes (their voters
        found by the neighbour index unless `exact` or there is none)."""
        self.check_k(k)
        excluded = self.retired if len(self.retired) else None
        votes = self.neighbour_votes()
        candidates = votes.candidates(k, self.predictable_labels) if votes else k

        def search_exactly(queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return exact_topk(queries, self.scoring_rows(), candidates, normalize_rows=False,
                              label_block=self.cfg.eval.label_block, progress=self.progress, excluded=excluded)

        if exact or self.index is None:
            scores, ids = search_exactly(queries)
        else:
            scores, ids = map(torch.from_numpy, self.index.search(queries, candidates, excluded))
            short = (ids < 0).any(1)  # the index found fewer labels than asked (most of them retired, say)
            if short.any():
                scores[short], ids[short] = search_exactly(queries[short])
        if votes is None:
            return scores, ids
        return votes.rerank(scores, ids, queries, self.cfg.eval.neighbour_weight, k,
                            None if exact else self.neighbour_index)

    @property
    def predictable_labels(self) -> int:
        """The labels a prediction can name: all but the retired ones."""
        return self.num_labels - len(self.retired)

    def check_k(self, k: int) -> None:
        if not 1 <= k <= self.predictable_labels:
            retired = f" ({len(self.retired)} more retired)" if len(self.retired) else ""
            raise UserError(f"k must be between 1 and the {self.predictable_labels} labels{retired}, not {k}")

    def predict(self, texts: list[str], k: int = 5, exact: bool = False, logits: bool = False) -> Predictions:
        """The k best labels of each text, best first, with their probabilities (or logits)."""
        if len(texts) == 0 and not isinstance(texts, str):
            self.check_k(k)
            return Predictions(np.zeros((0, k), np.int64), np.zeros((0, k), np.float32), [])
        queries, calibration = self.encode_tokens(self.tokenize(texts))
        return self.rank(queries, calibration, k, exact, logits)

    def rank(self, queries: torch.Tensor, calibration: tuple[torch.Tensor, torch.Tensor], k: int,
             exact: bool = False, logits: bool = False) -> Predictions:
        """predict() for queries already encoded (encode_tokens' two results)."""
        scores, ids = self.topk(queries, k, exact)
        log_scale, bias = calibration
        values = log_scale.exp() * scores + bias
        values = values if logits else torch.sigmoid(values)
        ids = ids.numpy()
        names = [[self.name(i) for i in row] for row in ids]
        return Predictions(ids, values.numpy().astype(np.float32), names)

    def evaluate(self, split: str = "test", search: str = "served", out_dir: str | Path | None = None) -> Evaluation:
        """Metrics on the split ("test" or "validation") of the run's dataset, or of another one of the same
        labels (the override data.path=...). `search`: "served" (the serving index when the run has one, else
        exact), "exact", or "both" (with the ANN top-k's recall against exact). metrics.json and predictions.npz
        go into `out_dir`, by default the next evals/<n> of the run."""
        try:
            search = Search(search)
        except ValueError:
            raise ConfigError(f"search must be one of {', '.join(s.value for s in Search)}, not {search!r}") from None
        return evaluate_model(self, split, search, Path(out_dir) if out_dir else None)

    def embed_label_texts(self, texts: list[str]) -> torch.Tensor:
        """(n, d) unit embeddings of label texts, tokenized as training tokenized them."""
        return self.encode_tokens(tokenize(list(texts), self.tokenizer, self.cfg.siamese.label_max_len))[0]

    def add_labels(self, texts: list[str], names: list[str] | None = None, row_scale: float | None = None) -> range:
        """Appends labels to the run (labels/change.py: rows from their texts) and reloads it; their ids.
        `row_scale`: their rows' scale, instead of the one chosen on the run's training queries."""
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise UserError(f"label text {i} is empty or not a string")
        if names is not None and len(names) != len(texts):
            raise UserError(f"{len(names)} names for {len(texts)} label texts")
        new = NewLabels([text.strip() for text in texts], list(names or texts))
        ids = labels.add_labels(self.run, new, self.embed_label_texts, self.encode_queries, row_scale)
        self._reload()
        return ids

    def retire_labels(self, ids: list[int] = (), names: list[str] = ()) -> None:
        """Removes labels from every prediction (ids kept), in the run and here."""
        labels.retire_labels(self.run, ids, names, self.embed_label_texts)
        self._reload()

    def restore_labels(self, ids: list[int] = (), names: list[str] = ()) -> None:
        labels.restore_labels(self.run, ids, names, self.embed_label_texts)
        self._reload()

    def _reload(self) -> None:
        self.__dict__.update(XCModel.load(self.run.path, self.overrides, str(self.device), self.progress).__dict__)

    def name(self, label_id: int) -> str:
        return self.label_names[label_id] if self.label_names is not None and label_id >= 0 else str(label_id)


def load(run_dir: str | Path, overrides: list[str] = (), device: str | None = None) -> XCModel:
    """A finished run, ready to predict: see XCModel."""
    quiet_libraries()
    return XCModel.load(run_dir, overrides, device)
