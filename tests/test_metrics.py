"""Metrics on hand-computed cases and against a per-point reference written from the definitions."""

import math

import numpy as np
import pytest
import scipy.sparse as sp

from astra_ds.data.queries import TrainCounts
from astra_ds.eval.metrics import compute_metrics, format_table, inverse_propensity, popularity_predictions


def _labels(rows, num_labels):
    indptr = np.cumsum([0] + [len(r) for r in rows])
    return sp.csr_matrix((np.ones(indptr[-1]), np.concatenate([r for r in rows if r] or [[]]).astype(int), indptr),
                         shape=(len(rows), num_labels))


def test_hand_computed_case():
    true = _labels([[0, 2], [4]], 5)
    pred = np.array([[2, 1, 0, 3, 4], [0, 4, 1, 2, 3]])
    w = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    m = compute_metrics(pred, true, w, ks=(1, 3, 5))
    d2, d3 = 1 / math.log2(3), 1 / math.log2(4)  # discounts of ranks 2 and 3
    assert m["P@1"] == pytest.approx(0.5)
    assert m["P@3"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert m["P@5"] == pytest.approx((2 / 5 + 1 / 5) / 2)
    assert m["nDCG@1"] == pytest.approx(0.5)
    assert m["nDCG@3"] == pytest.approx(((1 + d3) / (1 + d2) + d2 / 1) / 2)
    assert m["R@1"] == pytest.approx(0.25)
    assert m["R@3"] == pytest.approx(1.0)
    # PSP: point 0 hits label 2 (w 3) then label 0 (w 1); point 1 hits label 4 (w 5) at rank 2
    assert m["PSP@1"] == pytest.approx(((3 + 0) / 2) / ((3 + 5) / 2))
    assert m["PSP@3"] == pytest.approx(((3 + 1) / 3 + 5 / 3) / ((3 + 1) / 3 + 5 / 3))
    ps_dcg = [(3 + 1 * d3) / (1 + d2), 5 * d2]
    best_dcg = [(3 + 1 * d2) / (1 + d2), 5.0]
    assert m["PSnDCG@3"] == pytest.approx(np.mean(ps_dcg) / np.mean(best_dcg))


def test_points_without_labels_count_as_zero_and_padding_is_a_miss():
    true = _labels([[1], []], 3)
    pred = np.array([[1, -1, -1], [0, 1, 2]])
    m = compute_metrics(pred, true, np.ones(3), ks=(1, 3))
    assert m["P@1"] == pytest.approx(0.5)
    assert m["P@3"] == pytest.approx(1 / 6)
    assert m["nDCG@3"] == pytest.approx(0.5)
    assert m["R@3"] == pytest.approx(0.5)


def test_propensity_formula():
    train = _labels([[0]] * 10 + [[1]] * 90, 3)  # N = 100, N_0 = 10, N_1 = 90, N_2 = 0
    a, b = 0.55, 1.5
    c = (math.log(100) - 1) * (b + 1) ** a
    expected = [1 + c * (n + b) ** -a for n in (10, 90, 0)]
    np.testing.assert_allclose(inverse_propensity(TrainCounts.of(train), a, b), expected)


def _reference(pred, true, inv_psp, k):
    """Per point, from the definitions (xclib conventions)."""
    p, ndcg, r, ps, ps_best, psn, psn_best = [], [], [], [], [], [], []
    for i in range(len(pred)):
        labels = set(true[i].indices)
        gains = [1.0 if pred[i, j] in labels else 0.0 for j in range(k)]
        disc = [1 / math.log2(j + 2) for j in range(k)]
        idcg = sum(disc[:min(len(labels), k)]) or 1.0
        p.append(sum(gains) / k)
        ndcg.append(sum(g * x for g, x in zip(gains, disc)) / idcg)
        r.append(sum(gains) / max(len(labels), 1))
        weighted = [g * inv_psp[pred[i, j]] for j, g in enumerate(gains)]
        best = sorted((inv_psp[l] for l in labels), reverse=True)[:k]
        ps.append(sum(weighted) / k)
        ps_best.append(sum(best) / k)
        psn.append(sum(w * x for w, x in zip(weighted, disc)) / idcg)
        psn_best.append(sum(w * x for w, x in zip(best, disc)) / idcg)
    return {f"P@{k}": np.mean(p), f"nDCG@{k}": np.mean(ndcg), f"R@{k}": np.mean(r),
            f"PSP@{k}": np.mean(ps) / np.mean(ps_best), f"PSnDCG@{k}": np.mean(psn) / np.mean(psn_best)}


def test_random_predictions_match_per_point_reference():
    rng = np.random.default_rng(0)
    num_points, num_labels = 200, 30
    true = sp.random(num_points, num_labels, density=0.1, format="csr", random_state=1)
    true.data[:] = 1
    pred = np.stack([rng.permutation(num_labels)[:5] for _ in range(num_points)])
    inv_psp = inverse_propensity(TrainCounts.of(true))
    metrics = compute_metrics(pred, true, inv_psp, ks=(1, 3, 5))
    for k in (1, 3, 5):
        for name, value in _reference(pred, true, inv_psp, k).items():
            assert metrics[name] == pytest.approx(value), name


def test_popularity_baseline_and_table():
    train = _labels([[0, 1], [1], [1, 2], [2]], 4)
    pred = popularity_predictions(TrainCounts.of(train), num_points=3, k=2)
    assert pred.tolist() == [[1, 2]] * 3
    ks = (1, 3, 5, 10, 100)
    metrics = {f"{n}@{k}": k / 1000 + i / 10 for i, n in enumerate(["P", "nDCG", "PSP", "PSnDCG", "R"]) for k in ks}
    header, *lines = format_table({"model": metrics, "baseline": metrics}, ks=ks).splitlines()
    assert header.split() == ["@1", "@3", "@5", "@10", "@100"]
    assert lines[0].split() == ["model", "P", "0.10", "0.30", "0.50", "1.00", "10.00"]
    assert lines[3].split() == ["PSnDCG", "30.10", "30.30", "30.50", "31.00", "40.00"]
    assert lines[5].split()[:2] == ["baseline", "P"] and len(lines) == 10
    assert len({len(line) for line in [header, *lines]}) == 1  # columns line up


def test_too_few_predictions_is_an_error():
    with pytest.raises(ValueError, match="top-5"):
        compute_metrics(np.zeros((2, 3), int), _labels([[0], [1]], 3), np.ones(3), ks=(1, 5))
