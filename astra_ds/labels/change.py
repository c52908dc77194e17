"""Labels that change after training: added to a finished run, or retired from its predictions, without training.

An added label gets its row from its text through the run's final encoder: its label-text embedding e, mapped by
the linear map that takes the trained labels' embeddings to their rows (astra_ds/labels/text_to_row.py: a raw e
would outrank the trained rows and push good old labels out), and e itself as its label-text vector for dual
scoring; the addition's rows are scored with a scale chosen on the run's training queries so that the new labels
take no more than their share of the top-1s (labels/row_scale.py: mapped rows still do where label texts say
little), recorded in the card's row_scales. The rows are appended to the table (its optimizer state starting at
zero), the label names, the model card and the serving index (added in place: every index kind astra_ds builds
takes new vectors without retraining). A retired label keeps its id and its row and is skipped by every search,
exact and approximate; `restore` undoes it.

A change publishes a new version of the model: its manifest (and so the version `serve` and `/v1/model` report)
moves. While it is under way the run is not a finished run (no manifest), and `labels_change.json` says what
was being done: a crash at any point is finished by running `astra-ds labels finish --run-dir R`, which
re-applies the change (each step writes what it writes again, never twice).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import torch

from astra_ds.digests import DigestCache
from astra_ds.errors import UserError
from astra_ds.labels.label_file import NewLabels
from astra_ds.labels.row_scale import calibrated_row_scale, training_queries
from astra_ds.labels.text_to_row import fit_ranges, fit_text_to_row, read_stored_rows
from astra_ds.rundir.card import ModelCard
from astra_ds.rundir.run_dir import RunDir, one_line
from astra_ds.rundir.serving_index import (RowsInMemory, add_to_serving_index, load_serving_index,
                                           stamp_serving_index, stored_scoring_rows)
from astra_ds.scoring.rows import exact_topk
from astra_ds.table.store import open_table

log = logging.getLogger("astra_ds")

# texts -> their (n, d) unit embeddings through the run's final encoder: as label texts (XCModel.embed_label_texts)
# or as queries
Embed = Callable[[list[str]], torch.Tensor]


def _label_names(run: RunDir, num_labels: int) -> list[str]:
    """The run's label names, or their ids where it has none."""
    return run.read_label_names(num_labels) or [str(i) for i in range(num_labels)]


def _check_new_names(existing: list[str], new: list[str]) -> None:
    seen, known = set(), set(existing)
    for name in new:
        if one_line(name) != name:
            raise UserError(f"label name {name!r} holds a line break: a name is one line of {RunDir.label_names}")
        if name in known:
            raise UserError(f"label {name!r} exists already (id {existing.index(name)})")
        if name in seen:
            raise UserError(f"label {name!r} is twice in the new labels")
        seen.add(name)


def _publish(run: RunDir, known: DigestCache | None) -> None:
    """The new version: its manifest (the digests of the files the change left as they were `known`), then the
    serving index stamped with it; the change is then done."""
    run.publish(known)
    stamp_serving_index(run)
    run.end_change()


def _resize(group, num_labels: int) -> None:
    """Every array of a zarr table group (rows, optimizer state) to `num_labels` rows; new rows read as zeros."""
    for name, array in group.arrays():
        array.resize((num_labels, *array.shape[1:]))
    for _, subgroup in group.groups():
        _resize(subgroup, num_labels)
    group.attrs["num_labels"] = num_labels


def _write_rows(array, start: int, rows: torch.Tensor, bfloat16: bool) -> None:
    values = rows.to(torch.bfloat16).view(torch.int16) if bfloat16 else rows.float()
    array[start:start + len(rows)] = values.numpy().astype(array.dtype, copy=False)


def _rows_from_texts(run: RunDir, num_labels: int, embeddings: torch.Tensor, embed: Embed) -> torch.Tensor:
    """The new labels' rows: their text embeddings through the map fitted on the run's trained labels (their
    stored label-text embeddings, or their names embedded now)."""
    ranges = fit_ranges(num_labels)
    if run.label_embeddings.is_dir():
        texts = read_stored_rows(run.label_embeddings, ranges)
    else:
        names = run.read_label_names(num_labels)
        if names is None:
            log.warning("%s has no label texts to learn what a trained row looks like: the new labels' rows are "
                        "their text embeddings, which may outrank the trained labels", run)
            return embeddings
        texts = embed([names[i] for r in ranges for i in r])
    text_to_row = fit_text_to_row(texts, read_stored_rows(run.table, ranges))
    return (embeddings.double() @ text_to_row).float()


def _best_old_scores(run: RunDir, card: ModelCard, queries: torch.Tensor) -> torch.Tensor:
    """Each query's best score over the run's labels (retired ones skipped): from its serving index where it has
    one, as serving ranks, else exact."""
    retired = run.read_retired()
    excluded = retired if len(retired) else None
    index = load_serving_index(run, run.read_config().index, card, card.label_text_weight)
    if index is not None:
        return torch.from_numpy(index.search(queries, 1, excluded)[0][:, 0])
    scores, _ = exact_topk(queries, stored_scoring_rows(run, card), 1, normalize_rows=False, progress=False,
                           excluded=excluded)
    return scores[:, 0]


def _row_scale(run: RunDir, card: ModelCard, texts: list[str], embed: Embed, encode_queries: Embed) -> float:
    """The scale of the new labels' rows, chosen on the run's training queries (1 where they are gone)."""
    queries = training_queries(run.read_config(), card, card.num_labels)
    if queries is None:
        return 1.0
    embeddings = embed(texts)
    rows = _rows_from_texts(run, card.num_labels, embeddings, embed)
    encoded = encode_queries(queries)
    return calibrated_row_scale(encoded, _best_old_scores(run, card, encoded), rows, embeddings, card,
                                card.num_labels - len(run.read_retired()))


def _apply_add(run: RunDir, change: dict, embed: Embed) -> None:
    start, texts, names = change["num_labels"], change["texts"], change["names"]
    end = start + len(texts)
    card = run.read_card(verify=False)  # verified before the change began
    row_scales = [r for r in card.row_scales if r[0] < start] + [[start, end, change.get("row_scale", 1.0)]]  # once
    card = dataclasses.replace(card, num_labels=end, row_scales=row_scales)
    embeddings = embed(texts)
    table = open_table(run.table, mode="r+")
    bfloat16 = table.attrs.get("dtype", "float32") == "bfloat16"
    rows = _rows_from_texts(run, start, embeddings, embed)
    _resize(table, end)
    _write_rows(table["rows"], start, rows, bfloat16)
    if run.label_embeddings.is_dir():
        label_embeddings = open_table(run.label_embeddings, mode="r+")
        _resize(label_embeddings, end)
        _write_rows(label_embeddings["rows"], start, embeddings, False)
    run.write_label_names(_label_names(run, start) + names)
    card.save(run.model_card)
    if run.serving_index.is_file():
        add_to_serving_index(run, run.read_config().index, RowsInMemory(rows, start), RowsInMemory(embeddings, start),
                             card)


def _apply(run: RunDir, change: dict, embed: Embed, known: DigestCache | None = None) -> None:
    if change["change"] == "add":
        _apply_add(run, change, embed)
    else:
        run.write_retired(change["retired"])
    _publish(run, known)


def _change(run: RunDir, make_change, embed: Embed) -> dict:
    """Under the run's lock: a pending change finished first, then `make_change(card)` (a dict, checked before
    anything is written) applied and published."""
    lock = run.lock("--run-dir")
    try:
        finish_pending(run, embed, locked=True)
        card = run.read_card()  # verified
        known = run.verified_digests()
        change = make_change(card)
        run.begin_change(change)
        _apply(run, change, embed, known)
        return change
    finally:
        lock.release()


def finish_pending(run: RunDir, embed: Embed, locked: bool = False) -> bool:
    """Finishes a `labels` change a crash interrupted; whether there was one."""
    if not run.labels_change.is_file():
        return False
    if not locked:
        lock = run.lock("--run-dir")
        try:
            return finish_pending(run, embed, locked=True)
        finally:
            lock.release()
    change = run.pending_change()
    log.info("finishing the interrupted `labels %s` of %s", change["change"], run)
    _apply(run, change, embed)
    return True


def _remembering(embed: Embed) -> Embed:
    """`embed` that computes each list of texts once."""
    done: dict[tuple[str, ...], torch.Tensor] = {}

    def embed_once(texts: list[str]) -> torch.Tensor:
        key = tuple(texts)
        if key not in done:
            done[key] = embed(texts)
        return done[key]

    return embed_once


def add_labels(run: RunDir, labels: NewLabels, embed: Embed, encode_queries: Embed,
               row_scale: float | None = None) -> range:
    """Appends `labels` to the finished run `run`; returns their ids. `row_scale`: the scale of their rows'
    scores, instead of the one chosen on the run's training queries."""
    if row_scale is not None and not 0 <= row_scale < float("inf"):
        raise UserError(f"the row scale must be a number >= 0, not {row_scale}")
    embed = _remembering(embed)  # the scale and the change embed the same texts: the encoder runs once for them

    def make_change(card: ModelCard) -> dict:
        _check_new_names(_label_names(run, card.num_labels), labels.names)
        scale = row_scale if row_scale is not None else _row_scale(run, card, labels.texts, embed, encode_queries)
        return {"change": "add", "num_labels": card.num_labels, "texts": labels.texts, "names": labels.names,
                "row_scale": scale}

    change = _change(run, make_change, embed)
    ids = range(change["num_labels"], change["num_labels"] + len(labels.texts))
    log.info("%d labels added to %s: ids %d-%d, rows scaled by %.2f", len(ids), run, ids.start, ids.stop - 1,
             change["row_scale"])
    return ids


def resolve_ids(run: RunDir, num_labels: int, ids: list[int] = (), names: list[str] = ()) -> list[int]:
    """Label ids from ids and names, each checked (in range, a known and unambiguous name)."""
    bad = [i for i in ids if not 0 <= i < num_labels]
    if bad:
        raise UserError(f"label id {bad[0]} is out of range: the model has ids 0-{num_labels - 1}")
    resolved = list(ids)
    if names:
        by_name: dict[str, list[int]] = {}
        for i, name in enumerate(_label_names(run, num_labels)):
            by_name.setdefault(name, []).append(i)
        for name in names:
            found = by_name.get(name, [])
            if len(found) != 1:
                raise UserError(f"no label is named {name!r}" if not found else
                                f"{len(found)} labels are named {name!r} (ids {found[:5]}): give --ids instead")
            resolved.append(found[0])
    if not resolved:
        raise UserError("no label given: --ids or --names")
    return resolved


def retire_labels(run: RunDir, ids: list[int], names: list[str], embed: Embed) -> list[int]:
    """Removes labels from every prediction of the run (ids kept); returns all the retired ids. (`embed`: for a
    pending addition a crash interrupted.)"""
    return _set_retired(run, ids, names, embed, retire=True)


def restore_labels(run: RunDir, ids: list[int], names: list[str], embed: Embed) -> list[int]:
    """Undoes retire_labels for these labels; returns the ids still retired."""
    return _set_retired(run, ids, names, embed, retire=False)


def _set_retired(run: RunDir, ids, names, embed: Embed, retire: bool) -> list[int]:
    def make_change(card: ModelCard) -> dict:
        chosen = set(resolve_ids(run, card.num_labels, ids, names))
        before = set(run.read_retired().tolist())
        retired = sorted(before | chosen if retire else before - chosen)
        if len(retired) == card.num_labels:
            raise UserError(f"retiring these would retire all {card.num_labels} labels: nothing left to predict")
        return {"change": "retire" if retire else "restore", "retired": retired}

    retired = _change(run, make_change, embed)["retired"]
    log.info("%s: %d labels retired", run, len(retired))
    return retired
