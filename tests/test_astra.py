"""ASTRA negatives: the mixture proposal is a distribution, its weighted loss is unbiased, the index recalls."""

import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from astra_ds.config import IndexConfig, TableConfig, load_config
from astra_ds.negatives.astra import AstraSampler
from astra_ds.negatives.base import SamplerContext
from astra_ds.index.kinds import choose_kind
from astra_ds.index.label_index import LabelIndex
from astra_ds.negatives.mixture import mixture_log_q, sample_mixture, shortlist_distribution
from astra_ds.table.table import ClassifierTable
from astra_ds.training.loss import make_pairs, one_vs_all_bce, pair_scores
from conftest import make_trainer
from test_loss_negatives import assert_unbiased, full_bce, scoring_problem

L = 12
POSITIVES = sp.csr_matrix(np.array([[1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0],
                                    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                                    [0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]], dtype=np.float32))
# shortlists with a positive, padding (-1) and, for query 2, nothing but positives
SHORTLIST = np.array([[0, 5, 6, -1], [11, 2, 3, 4], [1, -1, -1, -1]])
STALE = np.array([[0.9, 0.5, 0.2, 0.0], [0.8, 0.7, 0.1, 0.3], [0.5, 0.0, 0.0, 0.0]])


def _q_all_labels(alpha, tau):
    p_short = shortlist_distribution(POSITIVES, SHORTLIST, STALE, tau)
    return np.exp(mixture_log_q(POSITIVES, SHORTLIST, p_short, alpha, np.tile(np.arange(L), (3, 1))))


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_proposal_is_a_distribution_over_non_positives(alpha):
    q = _q_all_labels(alpha, tau=0.2)
    for i in range(3):
        negatives = np.setdiff1d(np.arange(L), POSITIVES[i].indices)
        assert q[i, negatives].sum() == pytest.approx(1.0)
    # query 2's shortlist holds only its positive: it falls back to uniform
    np.testing.assert_allclose(q[2, [0, 2, 3]], 1 / (L - 1))


def test_draws_follow_the_proposal_and_avoid_positives():
    negatives = sample_mixture(POSITIVES, SHORTLIST, STALE, 40000, alpha=0.5, tau=0.2, rng=np.random.default_rng(0))
    q = _q_all_labels(0.5, 0.2)
    for i in range(3):
        drawn = negatives.global_ids[i]
        assert not np.isin(drawn, POSITIVES[i].indices).any()
        np.testing.assert_allclose(np.bincount(drawn, minlength=L) / len(drawn), np.where(
            np.isin(np.arange(L), POSITIVES[i].indices), 0, q[i]), atol=0.01)
        np.testing.assert_allclose(np.exp(negatives.log_q[i]), q[i, drawn])


def test_mixture_weighted_loss_is_unbiased_for_the_full_bce():
    queries, rows, calibration = scoring_problem(3, L)
    rng = np.random.default_rng(1)
    estimates = []
    for _ in range(3000):
        negatives = sample_mixture(POSITIVES, SHORTLIST, STALE, 4, alpha=0.7, tau=0.1, rng=rng)
        pairs = make_pairs(POSITIVES, negatives, importance_weights=True)
        s = pair_scores(queries, calibration, rows, pairs.label, pairs.query, normalize_rows=True)
        estimates.append(one_vs_all_bce(s, pairs, num_queries=3).item())
    assert_unbiased(estimates, full_bce(queries, calibration, rows, POSITIVES).item())


def _table(num_labels=3000, dim=16):
    table = ClassifierTable(num_labels, dim, TableConfig())
    table.init_random(0)
    return table


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf_flat", "ivf_pq"])
def test_index_search_and_recall_against_exact(kind):
    table = _table()
    queries = F.normalize(torch.randn(64, 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    index = LabelIndex(IndexConfig(kind=kind, nlist=16, nprobe=16, pq_m=4, add_block=700), normalize_rows=True)
    report = index.build(table, np.random.default_rng(0))
    assert report.kind == kind and report.rows == 3000
    assert index.recall(table, queries, 10) >= {"flat": 1.0, "hnsw": 0.9, "ivf_flat": 0.99, "ivf_pq": 0.3}[kind]
    scores, ids = index.search(queries[:4], 10)
    assert ids.shape == (4, 10) and ids.min() >= 0 and ids.max() < 3000
    if kind in ("flat", "ivf_flat"):  # exact scores: the stale scores t_il are true inner products
        rows = F.normalize(table.rows, dim=-1)
        expected = (queries[:4] @ rows.T).gather(1, torch.from_numpy(ids)).numpy()
        np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-5)


def test_recall_collapse_is_visible():
    """A stale index (rows changed after the build) shows low recall against exact search."""
    table = _table()
    queries = F.normalize(torch.randn(64, 16, generator=torch.Generator().manual_seed(2)), dim=-1)
    index = LabelIndex(IndexConfig(kind="flat"), normalize_rows=True)
    index.build(table, np.random.default_rng(0))
    assert index.recall(table, queries, 10) == 1.0
    table.rows.copy_(torch.randn(table.rows.shape, generator=torch.Generator().manual_seed(3)))
    assert index.recall(table, queries, 10) < 0.2


def test_index_kind_by_size():
    cfg = IndexConfig(hnsw_max_rows=100, ivf_pq_min_rows=1000)
    assert [choose_kind(cfg, n) for n in (100, 101, 1000)] == ["hnsw", "ivf_flat", "ivf_pq"]
    assert choose_kind(IndexConfig(kind="flat"), 10**9) == "flat"


@pytest.mark.parametrize("mode", ["per_step", "precomputed"])
def test_astra_sampler_is_uniform_until_its_index_is_built_then_draws_from_shortlists(mode):
    """Uniform for the warm-up epochs, the index built at epochs W, W + R, ..., then shortlist negatives."""
    cfg = load_config(None, ["negatives.strategy=astra", "negatives.warmup_epochs=1", "negatives.refresh_every=2",
                             "negatives.shortlist_size=8", f"negatives.shortlist_mode={mode}", "index.kind=flat",
                             "negatives.num_negatives=16"])
    table = _table(num_labels=50)
    train_queries = F.normalize(torch.randn(40, 16, generator=torch.Generator().manual_seed(4)), dim=-1)
    encoded = []

    def encode_train(rows):
        encoded.append(None if rows is None else len(rows))
        return train_queries if rows is None else train_queries[rows]

    sampler = AstraSampler(SamplerContext(cfg, table, num_train=40))
    positives = sp.csr_matrix((np.ones(8), np.arange(8), np.arange(9)), shape=(8, 50))
    query_ids = np.arange(8, 16)
    rng = np.random.default_rng(0)
    builds = [epoch for epoch in range(5) if sampler.on_epoch_start(epoch, encode_train)]
    assert builds == [1, 3] and sampler.version == 2
    # precomputed: every training query at each build; per step, with no queries observed: a recall sample
    assert encoded == ([None, None] if mode == "precomputed" else [40, 40])

    sampler.version = 0  # before the first build: uniform, whatever the index holds
    uniform = sampler.sample(query_ids, train_queries[query_ids], positives, rng)
    np.testing.assert_allclose(uniform.log_q, -np.log(49))
    sampler.version = 2
    negatives = sampler.sample(query_ids, train_queries[query_ids], positives, rng)
    shortlists = sampler.shortlist(train_queries[query_ids])[1]
    from_shortlist = (negatives.global_ids[:, :, None] == shortlists[:, None, :]).any(-1).mean()
    assert from_shortlist > 0.5  # alpha = 0.5 of the draws, plus uniform draws that fall in the 8 of 50
    assert not (negatives.global_ids == np.arange(8)[:, None]).any()  # positives are never drawn


def test_astra_index_builds_on_schedule_in_training(synth_dir, data_cache, tmp_path):
    trainer = make_trainer(synth_dir, data_cache, tmp_path, "train.epochs=4", "negatives.strategy=astra",
                           "negatives.warmup_epochs=1", "negatives.refresh_every=2", "negatives.shortlist_size=8",
                           "index.kind=flat")
    trainer.fit()
    builds = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()
              if "index_version" in line]
    assert [b["step"] for b in builds] == [1 * trainer.stages[-1].steps_per_epoch, 3 * trainer.stages[-1].steps_per_epoch]
    assert all(b["index_recall"] == 1.0 for b in builds)  # a flat index is exact
