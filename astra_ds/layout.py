"""The names of the files a run writes, in one place.

Run directory (`out_dir`):
    config.yaml, ds_config.json      the effective run and DeepSpeed configs
    init_from.json                   what the run started from (--init-from): its start again if stopped early
    train_log.jsonl, tensorboard/    metrics along training
    encoder.pt, table/               the final encoder weights and classifier table (zarr)
    label_embeddings/                the final encoder's label-text embeddings (zarr; dual scoring)
    neighbours/                      the training queries' embeddings (zarr) and labels (labels.npz): kNN votes
    model.json                       what predicting needs besides the weights: step, L, d, the score formula
    manifest.json                    digests of the model's files (encoder, table, label embeddings), checked on load
    label_names.txt                  one name a label (the dataset's label texts), for predictions
    retired_labels.json              labels retired from predictions (`astra-ds labels retire`)
    ann/                             the serving index: index.faiss over the scoring vectors, index.json
                                     (and neighbours.faiss over neighbours/ with kNN votes)
    evals/<n>/                       the results of each `astra-ds eval` (never overwritten)
    metrics.json, predictions.npz    the evaluation on the test split
    memory.json                      the memory plan and the measured peak RSS
    checkpoints/                     full-state checkpoints (below)
    .lock                            held while a run uses the directory

Checkpoint directory (`checkpoints/global_step<N>/`):
    meta.json                        step, epoch, world size, labels, components, files: read first
    state.pt                         the state every rank shares, a dict component name -> state_dict
    rank<r>.pt                       rank r's own state (RNG streams), same form
    <component>/                     the files of components too large for a state dict (encoder, table,
                                     negatives: ZeRO shards, zarr chunks, faiss indexes)
"""

CONFIG = "config.yaml"
DS_CONFIG = "ds_config.json"
INIT_FROM = "init_from.json"  # --init-from's path: `--resume auto` before the first checkpoint starts from it again
TRAIN_LOG = "train_log.jsonl"
TENSORBOARD = "tensorboard"
ENCODER_WEIGHTS = "encoder.pt"
TABLE = "table"
LABEL_EMBEDDINGS = "label_embeddings"
NEIGHBOURS = "neighbours"
MODEL_CARD = "model.json"
MANIFEST = "manifest.json"
LABEL_NAMES = "label_names.txt"
RETIRED_LABELS = "retired_labels.json"  # ids of labels removed from predictions (`astra-ds labels retire`)
LABELS_CHANGE = "labels_change.json"  # a `labels` change under way: what finishes it after a crash
ANN_DIR = "ann"
ANN_INDEX = "ann/index.faiss"
ANN_INFO = "ann/index.json"
ANN_NEIGHBOURS = "ann/neighbours.faiss"  # over the training queries' embeddings, for the kNN votes
EVALS = "evals"
METRICS = "metrics.json"
PREDICTIONS = "predictions.npz"
MEMORY = "memory.json"
CHECKPOINTS = "checkpoints"
LOCK = ".lock"  # held by the run using the directory

LATEST = "latest"
META = "meta.json"
SHARED_STATE = "state.pt"
TMP_SUFFIX = ".tmp"
CHECKPOINT_PREFIX = "global_step"


def rank_state(rank: int) -> str:
    return f"rank{rank}.pt"


def checkpoint_tag(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step}"


def step_of(tag: str) -> int:
    return int(tag.removeprefix(CHECKPOINT_PREFIX).removesuffix(TMP_SUFFIX))


def is_checkpoint_tag(name: str) -> bool:
    """global_step<N> exactly: not a save cut short (.tmp), a copy someone made beside it, or anything else."""
    return name.startswith(CHECKPOINT_PREFIX) and name[len(CHECKPOINT_PREFIX):].isdigit()
