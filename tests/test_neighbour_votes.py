"""kNN votes of the training queries (scoring/neighbour_votes.py): the re-ranked top-k against a dense reference, the
votes kept in the run directory, the weight chosen on the validation split, and the same ranking through `eval`,
predict and the serving index as in training's own evaluation."""

import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F
import yaml

import astra_ds
from astra_ds.config import EvalConfig, IndexConfig, load_config
from astra_ds.errors import ConfigError, UserError
from astra_ds.scoring.neighbour_votes import NeighbourVotes
from astra_ds.index.label_index import LabelIndex
from astra_ds.scoring.rows import exact_topk
from astra_ds.table.store import StoredRows
from conftest import TINY_RUN, run_main


def _case(seed=0, n=9, num_train=60, num_labels=40, dim=12):
    g = torch.Generator().manual_seed(seed)
    queries = F.normalize(torch.randn(n, dim, generator=g), dim=1)
    train = F.normalize(torch.randn(num_train, dim, generator=g), dim=1)
    rows = torch.randn(num_labels, dim, generator=g)
    labels = sp.random(num_train, num_labels, density=0.08, random_state=seed, format="csr")
    labels.data[:] = 1
    return queries, train, rows, labels


def _dense_reference(queries, train, rows, labels, cfg, candidates, k):
    """Every label scored: the top `candidates` of <q, v> ranked by <q, v> + weight x votes, the votes from the
    K nearest training queries' softmax(sim / temperature) weights times their dense label vectors."""
    scores = queries @ rows.T
    similarities = queries @ train.T
    nearest = similarities.topk(cfg.neighbours, dim=1)
    weights = torch.zeros_like(similarities).scatter(1, nearest.indices,
                                                     torch.softmax(nearest.values / cfg.neighbour_temperature, 1))
    votes = weights @ torch.from_numpy(labels.toarray()).float()
    fused = torch.full_like(scores, float("-inf"))
    top = scores.topk(candidates, dim=1).indices
    fused.scatter_(1, top, (scores + cfg.neighbour_weight * votes).gather(1, top))
    return fused.topk(k, dim=1)


@pytest.mark.parametrize("neighbours,temperature,weight,candidates", [(5, 0.05, 0.7, 20), (1, 1.0, 3.0, 8),
                                                                     (60, 0.02, 0.2, 40)])
def test_the_votes_rerank_the_candidates_as_a_dense_reference(neighbours, temperature, weight, candidates):
    queries, train, rows, labels = _case()
    cfg = EvalConfig(neighbours=neighbours, neighbour_temperature=temperature, neighbour_weight=weight,
                     neighbour_candidates=candidates)
    votes = NeighbourVotes(train, labels, cfg)
    k = 5
    assert votes.candidates(k, 40) == candidates and votes.candidates(50, 40) == 40
    top = (queries @ rows.T).topk(candidates, dim=1)
    scores, ids = votes.rerank(top.values, top.indices, queries, weight, k)
    expected = _dense_reference(queries, train, rows, labels, cfg, candidates, k)
    np.testing.assert_array_equal(ids.numpy(), expected.indices.numpy())
    np.testing.assert_allclose(scores.numpy(), expected.values.numpy(), rtol=1e-5, atol=1e-5)
    reranked = (ids.numpy() != top.indices[:, :k].numpy()).any()
    assert reranked  # the case is one the votes change
    index = LabelIndex(IndexConfig(kind="flat"), normalize_rows=False)  # the serving path's neighbours, exact here
    index.build(votes, np.random.default_rng(0))
    through_index = votes.rerank(top.values, top.indices, queries, weight, k, index)
    np.testing.assert_array_equal(through_index[1].numpy(), ids.numpy())
    np.testing.assert_allclose(through_index[0].numpy(), scores.numpy(), rtol=1e-5, atol=1e-5)


def test_padding_and_labels_added_after_training_get_no_votes():
    queries, train, _, labels = _case()
    votes = NeighbourVotes(train, labels, EvalConfig(neighbours=60, neighbour_temperature=10.0))
    ids = np.array([[-1, 0, 45]] * len(queries))  # 45: a label the training queries do not know
    values = votes.votes(queries, ids)
    assert (values[:, 0] == 0).all() and (values[:, 2] == 0).all()
    shares = labels[:, 0].toarray().ravel()  # at a high temperature, about the share of neighbours with label 0
    assert values[:, 1] == pytest.approx(np.full(len(queries), shares.mean()), abs=0.1)


def test_the_votes_are_kept_and_read_back(tmp_path):
    queries, train, _, labels = _case()
    cfg = EvalConfig(neighbour_weight=0.5)
    NeighbourVotes(train, labels, cfg).save(tmp_path / "neighbours")
    loaded = NeighbourVotes.load(tmp_path / "neighbours", cfg, num_labels=45)
    assert torch.equal(loaded.embeddings, train) and loaded.labels.shape == (60, 45)
    assert (loaded.labels[:, :40] != labels).nnz == 0 and loaded.labels[:, 40:].nnz == 0
    ids = np.tile(np.arange(45), (len(queries), 1))
    np.testing.assert_array_equal(loaded.votes(queries, ids)[:, :40],
                                  NeighbourVotes(train, labels, cfg).votes(queries, ids[:, :40]))


@pytest.mark.slow
def test_the_weight_is_chosen_on_validation_and_every_path_ranks_with_the_votes(synth_dir, data_cache, tmp_path):
    out = tmp_path / "run"
    sets = [*TINY_RUN, f"data.path={synth_dir}", f"data.cache_dir={data_cache}", f"out_dir={out}",
            "data.validation_fraction=0.25", "eval.neighbour_weights=[0, 0.5, 4]", "eval.neighbour_candidates=20"]
    run_main("train", *[a for s in sets for a in ("--set", s)])
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    (choice,) = [r for r in records if "neighbour_weight" in r]
    p1 = dict(choice["validation_P@1_by_neighbour_weight"])
    assert list(p1) == [0.0, 0.5, 4.0] and len(set(p1.values())) > 1  # the weights rank differently
    chosen = choice["neighbour_weight"]
    assert chosen == max(p1, key=lambda weight: (p1[weight], -list(p1).index(weight))) and chosen > 0
    assert yaml.safe_load((out / "config.yaml").read_text())["eval"]["neighbour_weight"] == chosen
    assert json.loads((out / "model.json").read_text())["neighbour_weight"] == chosen
    assert "neighbours/labels.npz" in json.loads((out / "manifest.json").read_text())

    model = astra_ds.load(out)
    data = model.load_data()
    votes = model.neighbour_votes()  # the training queries as the final encoder embeds them, with their labels
    train_queries, _ = model.encode_tokens(data.train)
    torch.testing.assert_close(votes.embeddings, train_queries, rtol=0, atol=1e-5)
    assert (votes.labels != data.train.labels(np.arange(len(data.train)))).nnz == 0
    run_main("eval", "--run-dir", str(out), "--split", "validation", "--exact", "--out-dir", str(tmp_path / "v"))
    again = json.loads((tmp_path / "v" / "metrics.json").read_text())["astra_ds"]["P@1"]
    assert again == pytest.approx(p1[chosen], abs=1e-9)  # `eval` ranks as the run's own evaluation did

    texts = ["a text to tag", "another one"]
    queries = model.encode_queries(texts)
    unvoted = astra_ds.load(out, ["eval.neighbour_weight=0"]).topk(queries, 20, exact=True)
    scores, ids = votes.rerank(*unvoted, queries, chosen, 5)
    predicted = model.predict(texts, k=5, exact=True, logits=True)
    np.testing.assert_array_equal(predicted.ids, ids.numpy())
    np.testing.assert_allclose(predicted.scores, model.card.bias + np.exp(model.card.log_scale) * scores.numpy(),
                               rtol=1e-5)
    assert model.index is not None and model.neighbour_index.index.ntotal == votes.end
    served = astra_ds.load(out)
    np.testing.assert_array_equal(served.predict(texts, k=5).ids, predicted.ids)  # the serving indexes: same top
    assert isinstance(served.neighbour_votes()._embeddings, StoredRows)  # not read: the neighbour index served
    _, exact_neighbours = exact_topk(queries, votes, 10, normalize_rows=False, progress=False)
    np.testing.assert_array_equal(model.neighbour_index.search(queries, 10)[1], exact_neighbours.numpy())

    index_file = out / "ann" / "neighbours.faiss"
    saved = index_file.read_bytes()
    index_file.write_bytes(saved[:-8])
    with pytest.raises(UserError, match="neighbours.faiss is missing or damaged"):
        astra_ds.load(out)
    index_file.write_bytes(saved)

    damaged = out / "neighbours" / "labels.npz"
    content = bytearray(damaged.read_bytes())
    content[len(content) // 2] ^= 0xFF
    damaged.write_bytes(bytes(content))
    with pytest.raises(UserError, match="damaged"):
        astra_ds.load(out)
    with pytest.raises(ConfigError, match="eval.neighbour_weights are chosen among on the validation split"):
        load_config(None, ["eval.neighbour_weights=[0, 0.5]"])


def test_votes_asked_of_a_run_trained_without_them_end_in_one_line(finished_run):
    model = astra_ds.load(finished_run, ["eval.neighbour_weight=0.5"])
    with pytest.raises(UserError, match="has none: it was trained without kNN votes"):
        model.predict(["a text"], k=3)
