"""Export a finished run for a serving stack:

    <out>/                          the query encoder as a sentence-transformers model: SentenceTransformer(<out>)
        config.json, model.safetensors, tokenizer files       (Hugging Face save_pretrained)
        modules.json, sentence_bert_config.json, 1_Pooling/, [2_Dense/], N_Normalize/
    <out>/labels/
        label_vectors.npy           (L, d) float32 scoring vectors v (memory-mappable): score = <q, v>
        index.faiss                 the serving index over them (inner product), without the retired labels
        label_names.txt             one name a label
        card.json                   the score formula (scale, bias), the normalisation, the metric, the retired
                                    labels (their rows stay in label_vectors.npy, for their ids)

SentenceTransformer(<out>).encode(texts) gives the unit-norm query embeddings q of `model.encode`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from astra_ds.errors import UserError
from astra_ds.files import TMP_SUFFIX, disk_full
from astra_ds.index.label_index import LabelIndex
from astra_ds.progress import progress as progress_of
from astra_ds.rng import Stream, numpy_rng
from astra_ds.rundir.serving_index import build_serving_index, stored_scoring_rows
from astra_ds.inference.xc_model import XCModel

ST_TRANSFORMER, ST_POOLING = "sentence_transformers.models.Transformer", "sentence_transformers.models.Pooling"
ST_DENSE, ST_NORMALIZE = "sentence_transformers.models.Dense", "sentence_transformers.models.Normalize"
LABELS = "labels"


def _sentence_transformer_modules(model: XCModel, out: Path) -> None:
    """The encoder (transformer, pooling, projection, normalisation) as sentence-transformers module files."""
    from safetensors.torch import save_file

    encoder = model.encoder
    encoder.backbone.save_pretrained(out)
    model.tokenizer.save_pretrained(out)
    hidden = encoder.backbone.config.hidden_size
    modules = [{"path": "", "type": ST_TRANSFORMER}, {"path": "1_Pooling", "type": ST_POOLING}]
    (out / "1_Pooling").mkdir()
    (out / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": hidden, "pooling_mode_cls_token": encoder.pooling == "cls",
        "pooling_mode_mean_tokens": encoder.pooling == "mean", "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False}, indent=2))
    if encoder.projection is not None:
        dense = out / "2_Dense"
        dense.mkdir()
        (dense / "config.json").write_text(json.dumps({
            "in_features": hidden, "out_features": encoder.dim, "bias": False,
            "activation_function": "torch.nn.modules.linear.Identity"}, indent=2))
        save_file({"linear.weight": encoder.projection.weight.detach().cpu().contiguous()},
                  str(dense / "model.safetensors"))
        modules.append({"path": "2_Dense", "type": ST_DENSE})
    normalize = f"{len(modules)}_Normalize"
    (out / normalize).mkdir()
    modules.append({"path": normalize, "type": ST_NORMALIZE})
    (out / "modules.json").write_text(json.dumps(
        [{"idx": i, "name": str(i), **module} for i, module in enumerate(modules)], indent=2))
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": model.card.max_len,
                                                                "do_lower_case": False}, indent=2))


def _label_files(model: XCModel, out: Path, block: int = 65536) -> None:
    rows = stored_scoring_rows(model.run, model.card)
    with open(out / "label_vectors.npy", "wb") as vectors:  # written, not memory-mapped: a full disk is an error,
        np.lib.format.write_array_header_1_0(vectors, {  # not a SIGBUS
            "descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
            "shape": (model.num_labels, model.card.dim)})
        for start in progress_of(range(0, model.num_labels, block), "label vectors", model.progress, "block"):
            end = min(start + block, model.num_labels)
            vectors.write(np.ascontiguousarray(rows.block_rows(start, end).numpy(), dtype=np.float32).tobytes())
    info = json.loads(model.run.serving_index_info.read_text())
    if len(model.retired):  # an index of the labels left, each under its id: no selector needed to skip the others
        active = np.setdiff1d(np.arange(model.num_labels), model.retired)
        index = LabelIndex(model.cfg.index, normalize_rows=False)
        info["kind"] = index.build(rows, numpy_rng(model.cfg.train.seed, Stream.SERVING_INDEX), model.progress,
                                   global_ids=active).kind
        index.save(out / "index.faiss")
    else:
        shutil.copyfile(model.run.serving_index, out / "index.faiss")
    if model.run.label_names.is_file():
        shutil.copyfile(model.run.label_names, out / "label_names.txt")
    card = model.card
    (out / "card.json").write_text(json.dumps({
        "score": "logit = scale * <q, v> + bias; probability = sigmoid(logit)",
        "scale": float(torch.tensor(card.log_scale).exp()), "bias": card.bias,
        "query": "SentenceTransformer(<export dir>).encode(text): unit-norm (the Normalize module)",
        "labels": f"label_vectors.npy row l = {'w_l / |w_l|' if card.normalize_rows else 'w_l'}"
                  + (f" + {card.label_text_weight} * e_l (label-text embedding)" if card.label_text_weight else ""),
        "metric": "inner_product", "num_labels": card.num_labels, "dim": card.dim, "step": card.step,
        "retired": model.retired.tolist(),
        "index": {"file": "index.faiss", "kind": info["kind"]}, "encoder": card.encoder}, indent=2))


def export(run_dir: str | Path, out: str | Path, progress: bool = False) -> Path:
    """Writes the export of the run at `run_dir` into `out` (which must not exist); builds the run's serving
    index first when it has none."""
    out = Path(out)
    if out.exists():
        raise UserError(f"{out} already exists: export writes a new directory")
    model = XCModel.load(run_dir, progress=progress, transformers_backbone=True)  # it saves the transformer
    if model.encoder.lexical is not None:
        raise UserError(f"{run_dir} appends lexical features to its embeddings (encoder.lexical_dim="
                        f"{model.cfg.encoder.lexical_dim}), which sentence-transformers cannot compute: serve it "
                        "with astra_ds.load or astra-ds predict")
    if model.index is None:
        build_serving_index(model.run, model.cfg.index, model.cfg.train.seed, progress)
    tmp = out.with_name(out.name + TMP_SUFFIX)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        _sentence_transformer_modules(model, tmp)
        (tmp / LABELS).mkdir()
        _label_files(model, tmp / LABELS)
        tmp.rename(out)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written left behind
        if isinstance(err, Exception) and disk_full(err, tmp.parent):  # libraries word it their own way
            raise UserError(f"the disk is full: exporting into {out} failed ({shutil.disk_usage(tmp.parent).free} "
                            "bytes free); nothing was written there") from None
        raise
    return out
