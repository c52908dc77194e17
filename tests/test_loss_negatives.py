"""Uniform negatives, the importance-weighted sampled BCE (unbiased for the full BCE), the decoupled softmax
against a dense reference, and exact top-k."""

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from astra_ds.config import TableConfig
from astra_ds.eval.evaluate import save_predictions
from astra_ds.scoring.rows import exact_topk
from astra_ds.negatives.base import Negatives
from astra_ds.negatives.in_batch import batch_labels
from astra_ds.negatives.uniform import sample_uniform
from astra_ds.table.table import ClassifierTable
from astra_ds.training.loss import decoupled_softmax, in_batch_scores, make_pairs, one_vs_all_bce, pair_scores

POSITIVES = sp.csr_matrix(np.array([[1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0],
                                    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                                    [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1]], dtype=np.float32))


def test_uniform_negatives_avoid_positives_and_are_uniform():
    negatives = sample_uniform(POSITIVES, num_negatives=30000, rng=np.random.default_rng(0))
    for i in range(3):
        drawn = negatives.global_ids[i]
        assert not np.isin(drawn, POSITIVES[i].indices).any()
        allowed = np.setdiff1d(np.arange(12), POSITIVES[i].indices)
        freq = np.bincount(drawn, minlength=12)[allowed] / len(drawn)
        np.testing.assert_allclose(freq, 1 / len(allowed), atol=0.01)
        # Q_i sums to 1 over the non-positive labels
        assert np.exp(negatives.log_q[i, 0]) * len(allowed) == pytest.approx(1.0)


def test_a_query_with_every_label_positive_is_an_error():
    with pytest.raises(ValueError, match="every label"):
        sample_uniform(sp.csr_matrix(np.ones((1, 4))), 2, np.random.default_rng(0))


def full_bce(queries, calibration, rows, positives):
    scores = calibration[0].exp() * queries @ F.normalize(rows, dim=-1).T + calibration[1]
    target = torch.from_numpy(positives.toarray())
    return F.binary_cross_entropy_with_logits(scores, target, reduction="sum") / len(queries)


def scoring_problem(num_queries: int, num_labels: int, dim: int = 6):
    """Seeded random unit queries, classifier rows and a calibration (scale 4, bias -1)."""
    torch.manual_seed(0)
    return (F.normalize(torch.randn(num_queries, dim), dim=-1), torch.randn(num_labels, dim),
            torch.tensor([math.log(4.0), -1.0]))


def assert_unbiased(estimates: list[float], full: float) -> None:
    """The mean of the estimates is within 4 standard errors of `full`, and the check has power."""
    standard_error = np.std(estimates) / math.sqrt(len(estimates))
    assert abs(np.mean(estimates) - full) < 4 * standard_error
    assert standard_error < 0.02 * full


def test_importance_weighted_loss_is_unbiased_for_thefull_bce():
    queries, rows, calibration = scoring_problem(3, 12)
    rng = np.random.default_rng(1)
    estimates = []
    for _ in range(3000):
        pairs = make_pairs(POSITIVES, sample_uniform(POSITIVES, 4, rng), importance_weights=True)
        scores = pair_scores(queries, calibration, rows, pairs.label, pairs.query, normalize_rows=True)
        estimates.append(one_vs_all_bce(scores, pairs, num_queries=3).item())
    assert_unbiased(estimates, full_bce(queries, calibration, rows, POSITIVES).item())


def dense_decoupled_softmax(queries, calibration, rows, positives):
    """Each positive against all of its query's non-positive labels, every score computed: the reference."""
    scores = calibration[0].exp() * queries @ F.normalize(rows, dim=-1).T + calibration[1]
    positive = torch.from_numpy(positives.toarray()) > 0
    negatives = torch.logsumexp(scores.masked_fill(positive, float("-inf")), dim=1, keepdim=True)
    return (torch.logaddexp(scores, negatives) - scores)[positive].sum() / len(queries)


@pytest.mark.parametrize("in_batch", [False, True])
def test_softmax_over_every_negative_equals_the_dense_decoupled_softmax(in_batch):
    """Every non-positive drawn twice at Q = 1/K (weight 1/2 each): the value and the rows' gradients are those
    of the dense reference, with the batch's labels scored as pairs or as the dense in-batch block."""
    positives = sp.csr_matrix(np.eye(3, 12, dtype=np.float32) + np.eye(3, 12, k=6, dtype=np.float32))
    queries, rows, calibration = scoring_problem(3, 12)
    others = np.stack([np.setdiff1d(np.arange(12), positives[i].indices) for i in range(3)])
    negatives = Negatives(np.concatenate([others, others], axis=1), np.full((3, 20), -math.log(10)))
    labels = batch_labels(positives) if in_batch else None
    pairs = make_pairs(positives, negatives, importance_weights=True, in_batch=labels)
    rows = rows.requires_grad_()
    scores = pair_scores(queries, calibration, rows, pairs.label, pairs.query, normalize_rows=True)
    dense = (in_batch_scores(queries, calibration, rows[labels.global_ids], normalize_rows=True),
             torch.from_numpy(labels.targets)) if in_batch else ()
    loss = decoupled_softmax(scores, pairs, 3, *dense)
    (grad,) = torch.autograd.grad(loss, rows)
    reference = dense_decoupled_softmax(queries, calibration, rows, positives)
    (reference_grad,) = torch.autograd.grad(reference, rows)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    torch.testing.assert_close(grad, reference_grad)


def test_softmax_ranks_a_positive_against_negatives_only():
    """A query's other positives are not in its softmax: raising one positive's score leaves another's term."""
    positives = sp.csr_matrix(np.array([[1, 1, 0, 0]], dtype=np.float32))
    pairs = make_pairs(positives, Negatives(np.array([[2, 3]]), np.full((1, 2), -math.log(2))), True)
    low, high = (decoupled_softmax(torch.tensor([0.0, first, 0.5, -0.5]), pairs, 1) for first in (0.0, 3.0))
    assert (low - high).item() == pytest.approx(math.log(1 + math.exp(0.5) + math.exp(-0.5))
                                                - math.log(1 + math.exp(0.5 - 3) + math.exp(-0.5 - 3)))


def test_unweighted_mode_weighs_each_negative_one():
    pairs = make_pairs(POSITIVES, sample_uniform(POSITIVES, 5, np.random.default_rng(0)), importance_weights=False)
    assert torch.all(pairs.weight == 1)
    assert int(pairs.target.sum()) == POSITIVES.nnz and len(pairs.target) == POSITIVES.nnz + 15


def test_pair_scores_match_dense_scores():
    torch.manual_seed(0)
    queries, rows = F.normalize(torch.randn(3, 5), dim=-1), torch.randn(12, 5)
    calibration = torch.tensor([math.log(7.0), 0.5])
    pairs = make_pairs(POSITIVES, sample_uniform(POSITIVES, 6, np.random.default_rng(2)), True)
    dense = 7.0 * queries @ F.normalize(rows, dim=-1).T + 0.5
    scores = pair_scores(queries, calibration, rows, pairs.label, pairs.query, normalize_rows=True)
    torch.testing.assert_close(scores, dense[pairs.query, pairs.label])
    raw = pair_scores(queries, calibration, rows, pairs.label, pairs.query, normalize_rows=False)
    torch.testing.assert_close(raw, (7.0 * queries @ rows.T + 0.5)[pairs.query, pairs.label])


@pytest.mark.parametrize("normalize", [True, False])
def test_blockwise_topk_equals_dense_topk(normalize, tmp_path):
    torch.manual_seed(0)
    table = ClassifierTable(53, 8, TableConfig())
    table.init_random(0)
    queries = torch.randn(11, 8)
    scores, ids = exact_topk(queries, table, k=5, normalize_rows=normalize, label_block=7, query_block=4,
                             progress=False)
    rows = F.normalize(table.rows, dim=-1) if normalize else table.rows
    dense = (queries @ rows.T).topk(5, dim=1)
    torch.testing.assert_close(scores, dense.values)
    assert torch.equal(ids, dense.indices)

    save_predictions(tmp_path / "p.npz", scores.numpy(), ids.numpy(), 53)
    loaded = sp.load_npz(tmp_path / "p.npz")
    assert loaded.shape == (11, 53)
    np.testing.assert_allclose(loaded.toarray()[np.arange(11)[:, None], ids.numpy()], scores.numpy(), rtol=1e-6)
