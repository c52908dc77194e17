"""NGAME: in-batch negatives (unbiased with sampled ones), clustered batches, label-text initialisation."""

import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from astra_ds.config import BatchingConfig, ConfigError
from astra_ds.encoder.encoder import build_tokenizer
from astra_ds.negatives.in_batch import batch_labels
from astra_ds.negatives.mixture import sample_mixture
from astra_ds.negatives.uniform import sample_uniform
from astra_ds.rng import Stream, numpy_rng
from astra_ds.training.batching import ClusteredBatches, RandomBatches, balanced_clusters
from astra_ds.training.loss import in_batch_scores, make_pairs, one_vs_all_bce, pair_scores
from conftest import make_trainer
from test_loss_negatives import POSITIVES, assert_unbiased, full_bce, scoring_problem


def test_batch_labels_and_targets():
    in_batch = batch_labels(POSITIVES)
    np.testing.assert_array_equal(in_batch.global_ids, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11])
    np.testing.assert_array_equal(in_batch.targets[1], [0] * 10 + [1])
    np.testing.assert_array_equal(in_batch.targets[0], [1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(in_batch.contains(np.array([[10, 11], [0, 12]])), [[False, True], [True, False]])


def _in_batch_estimate(queries, calibration, rows, positives, negatives, importance_weights=True):
    in_batch = batch_labels(positives)
    pairs = make_pairs(positives, negatives, importance_weights, in_batch)
    assert not in_batch.contains(pairs.label.numpy()).any() and not pairs.target.any()
    scores = pair_scores(queries, calibration, rows, pairs.label, pairs.query, normalize_rows=True)
    dense = in_batch_scores(queries, calibration, rows[in_batch.global_ids], normalize_rows=True)
    return one_vs_all_bce(scores, pairs, len(queries), dense, torch.from_numpy(in_batch.targets))


@pytest.mark.parametrize("proposal", ["uniform", "mixture"])
def test_in_batch_plus_sampled_loss_is_unbiased_for_the_full_bce(proposal):
    """The batch's labels summed exactly + sampled negatives outside them, weighted by 1 / (m Q)."""
    positives = sp.csr_matrix(np.eye(3, 40, dtype=np.float32) + np.eye(3, 40, k=5, dtype=np.float32))
    queries, rows, calibration = scoring_problem(3, 40)
    rng = np.random.default_rng(1)
    shortlist = np.argsort(-(queries @ rows.T).numpy(), axis=1)[:, :8]
    estimates = []
    for _ in range(2000):
        if proposal == "uniform":
            negatives = sample_uniform(positives, 4, rng)
        else:
            negatives = sample_mixture(positives, shortlist, np.ones(shortlist.shape), 4, 0.5, 1.0, rng)
        estimates.append(_in_batch_estimate(queries, calibration, rows, positives, negatives).item())
    assert_unbiased(estimates, full_bce(queries, calibration, rows, positives).item())


def test_plain_ngame_mode_weighs_every_negative_one():
    negatives = sample_uniform(POSITIVES, 6, np.random.default_rng(0))
    pairs = make_pairs(POSITIVES, negatives, importance_weights=False, in_batch=batch_labels(POSITIVES))
    assert torch.all(pairs.weight == 1) and set(pairs.label.tolist()) <= {10}


def _grouped_points(groups=6, per_group=8, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((groups, dim)) * 3
    points = np.repeat(centers, per_group, axis=0) + 0.1 * rng.standard_normal((groups * per_group, dim))
    shuffle = rng.permutation(len(points))
    return points[shuffle].astype(np.float32), np.repeat(np.arange(groups), per_group)[shuffle]


def test_balanced_clusters_recover_separated_groups():
    points, group = _grouped_points()
    order = balanced_clusters(points, cluster_size=8, rng=np.random.default_rng(0))
    assert sorted(order) == list(range(len(points)))
    clusters = group[order].reshape(-1, 8)
    assert all(len(set(c)) == 1 for c in clusters) and len({c[0] for c in clusters}) == 6


def test_clustered_batches_are_whole_clusters_and_resume_identically():
    points, group = _grouped_points(groups=8, per_group=4)
    sampler = ClusteredBatches(BatchingConfig(mode="clustered", cluster_size=4, warmup_epochs=1, recluster_every=2),
                               32, 8, seed=3, dim=points.shape[1], stream=0)
    assert [epoch for epoch in range(6) if sampler.clustering_due(epoch)] == [1, 3, 5]
    np.testing.assert_array_equal(sampler.epoch_batches(0),
                                  RandomBatches(BatchingConfig(), 32, 8, 3, points.shape[1], 0).epoch_batches(0))
    sampler.recluster(points, epoch=0)
    for epoch in range(2):
        batches = np.asarray(sampler.epoch_batches(epoch))
        assert sorted(batches.reshape(-1)) == list(range(32))
        groups = group[batches].reshape(4, 2, 4)  # each batch = two whole clusters of 4 queries
        assert (groups == groups[:, :, :1]).all()
    assert not np.array_equal(sampler.epoch_batches(0), sampler.epoch_batches(1))

    resumed = ClusteredBatches(BatchingConfig(mode="clustered", cluster_size=4), 32, 8, 0, points.shape[1], 0)
    resumed.load_state_dict(sampler.state_dict())
    np.testing.assert_array_equal(resumed.epoch_batches(5), sampler.epoch_batches(5))


def test_ranks_get_disjoint_parts_of_the_global_batch():
    batch = np.arange(10, 20)
    parts = [RandomBatches.rank_part(batch, rank, 3) for rank in range(3)]
    np.testing.assert_array_equal(np.concatenate(parts), batch)
    assert [len(p) for p in parts] == [4, 3, 3]


def test_label_text_init_writes_each_rows_label_embedding(synth_dir, data_cache, tmp_path):
    trainer = make_trainer(synth_dir, data_cache, tmp_path, "table.init=label_text", "eval.batch_size=16")
    texts = trainer.data.label_texts
    tokens = build_tokenizer(trainer.cfg.encoder)(texts[:5] + texts[-2:], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected, _ = trainer.engine.module.eval()(tokens["input_ids"], tokens["attention_mask"])
    torch.testing.assert_close(trainer.table.rows[[0, 1, 2, 3, 4, -2, -1]], expected, rtol=1e-4, atol=1e-5)


def test_label_text_init_without_label_texts_is_a_config_error(data_cache, tmp_path):
    from astra_ds.data.synth import SynthConfig, generate

    data = generate(SynthConfig(num_labels=20, num_train=64, num_test=16, vocab_size=100, label_texts=False),
                    tmp_path / "data")
    with pytest.raises(ConfigError, match="table.init=label_text and eval.label_text_weight > 0 need label texts"):
        make_trainer(data, data_cache, tmp_path / "run", "table.init=label_text")


def test_in_batch_step_matches_its_definition(synth_dir, data_cache, tmp_path):
    """One NGAME step: dense BCE over the batch's labels + weighted sampled negatives outside them."""
    trainer = make_trainer(synth_dir, data_cache, tmp_path, "negatives.in_batch=true")
    rows = trainer.stages[-1].batches.epoch_batches(0)[0]
    before = trainer.table.rows.clone()
    input_ids, attention_mask = trainer.data.train.batch(rows)
    with torch.no_grad():
        queries, calibration = trainer.engine.module(input_ids, attention_mask)
    positives = trainer.data.train.labels(rows)
    negatives = sample_uniform(positives, trainer.cfg.negatives.num_negatives, numpy_rng(0, Stream.NEGATIVES, 0))
    scores = calibration[0].exp() * queries @ F.normalize(before, dim=-1).T + calibration[1]
    in_batch = np.zeros(trainer.table.num_labels, bool)
    in_batch[positives.indices] = True
    target = torch.from_numpy(positives.toarray())
    expected = F.binary_cross_entropy_with_logits(scores[:, in_batch], target[:, in_batch], reduction="sum")
    for i in range(len(rows)):
        outside = negatives.global_ids[i][~in_batch[negatives.global_ids[i]]]
        weight = np.exp(-negatives.log_q[i, 0]) / negatives.global_ids.shape[1]
        expected = expected + F.softplus(scores[i, outside]).sum() * weight
    stats = trainer.stages[-1].step(rows, 0)
    assert stats["loss"] == pytest.approx(expected.item() / len(rows), rel=1e-4)


def test_clustering_uses_the_embeddings_of_the_training_steps(synth_dir, data_cache, tmp_path):
    trainer = make_trainer(synth_dir, data_cache, tmp_path, "batching.mode=clustered")
    rows = trainer.stages[-1].batches.epoch_batches(0)[0]
    with torch.no_grad():  # tiny-random has no dropout: training-mode embeddings are these
        expected, _ = trainer.engine.module(*trainer.data.train.batch(rows))
    trainer.stages[-1].step(rows, 0)
    torch.testing.assert_close(trainer.stages[-1].batches.bank.embeddings[rows].float(), expected, rtol=0, atol=1e-3)
    assert trainer.stages[-1].batches.bank.seen.sum() == len(rows)


def test_ngame_training_reclusters_on_schedule(synth_dir, data_cache, tmp_path):
    """Random batches in epoch 0, clusters from epoch 1 on; queries the previous epochs never trained on (the
    dropped last partial batch) are encoded at clustering time."""
    trainer = make_trainer(synth_dir, data_cache, tmp_path, "negatives.in_batch=true", "batching.mode=clustered",
                       "batching.cluster_size=4", "batching.recluster_every=1", "train.epochs=3",
                       "train.batch_size=30", "eval.every_epochs=0.5")
    trainer.fit()
    num_queries = len(trainer.data.train)
    assert trainer.step == 3 * trainer.stages[-1].steps_per_epoch == 51 and sorted(trainer.stages[-1].batches.clustered_order) == list(range(num_queries))
    records = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if "test_P@1" in r]  # the end of training is evaluated by `train`
    steps_per_epoch = trainer.stages[-1].steps_per_epoch  # 17: every 8.5 steps, rounded, and at each epoch's end
    assert [r["step"] for r in evaluations] == [0, 8, 17, 26, 34, 42]  # the curve starts before training
    assert [r["epochs_done"] for r in evaluations] == [r["step"] / steps_per_epoch for r in evaluations]
    assert all(a["train_seconds"] < b["train_seconds"] for a, b in zip(evaluations, evaluations[1:]))
    reclusters = [(r["step"], r["reclustered_unseen"]) for r in records if "recluster_s" in r]
    assert reclusters == [(trainer.stages[-1].steps_per_epoch, num_queries % 30), (2 * trainer.stages[-1].steps_per_epoch, 0)]


def test_length_pools_make_batches_of_similar_lengths_from_the_same_queries():
    """With batching.length_pools each pool of the epoch's permutation, sorted by length, is cut into batches: the
    same queries as the random batches, each batch's lengths close, the batches in a random order; without
    lengths (a stage that does not encode) the batches are the random ones."""
    lengths = np.random.default_rng(0).integers(3, 60, size=1000)
    pooled = BatchingConfig(length_pools=5)
    plain = np.asarray(RandomBatches(BatchingConfig(), 1000, 16, 7, 8, 2).epoch_batches(0))
    batches = np.asarray(RandomBatches(pooled, 1000, 16, 7, 8, 2, lengths.__getitem__).epoch_batches(0))
    assert batches.shape == plain.shape == (62, 16)
    assert sorted(batches.reshape(-1)) == sorted(plain.reshape(-1))
    for start in range(0, 62, 5):  # pool by pool (the last one has 2 batches): whole batches of its queries
        pool = plain[start:start + 5].reshape(-1)
        assert sorted(pool) == sorted(batches[np.isin(batches, pool).all(1)].reshape(-1))
    spread = lambda b: (lengths[b].max(1) - lengths[b].min(1)).mean()  # noqa: E731
    assert spread(batches) < spread(plain) / 3
    assert not (np.diff(lengths[batches].min(1)) >= 0).all()  # batches shuffled, not shortest first
    np.testing.assert_array_equal(RandomBatches(pooled, 1000, 16, 7, 8, 2).epoch_batches(0), plain)
