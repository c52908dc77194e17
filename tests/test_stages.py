"""Training stages: the Siamese loss against its definition, stages in order with rows from the Siamese encoder,
the frozen encoder of the classifier stage, the refit on the final encoder, resume inside a stage, dual scoring,
the encoder's lr schedule."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from astra_ds.config import TableConfig, load_config
from astra_ds.ds_config import add_scheduler, resolve_ds_config
from astra_ds.scoring.rows import ScoringRows, exact_topk
from astra_ds.encoder.label_text import LabelEmbeddings
from astra_ds.table.table import ClassifierTable
from astra_ds.training.loss import siamese_softmax
from conftest import TINY_RUN, make_trainer, run_main

STAGED_RUN = ["siamese.epochs=1", "classifier.epochs=1", "classifier.batch_size=8", "train.epochs=1",
              "table.init=label_text", "negatives.num_negatives=2", "train.log_every=1"]


def test_siamese_softmax_matches_its_definition():
    generator = torch.Generator().manual_seed(0)
    queries = F.normalize(torch.randn(3, 8, generator=generator), dim=-1)
    labels = F.normalize(torch.randn(4, 8, generator=generator), dim=-1)
    targets = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.float32)
    s = 5.0 * queries @ labels.T
    terms = []
    for i, j in targets.nonzero().tolist():
        query_negatives = [k for k in range(4) if not targets[i, k]]
        label_negatives = [q for q in range(3) if not targets[q, j]]
        terms.append(-torch.log(s[i, j].exp() / (s[i, j].exp() + s[i, query_negatives].exp().sum())))
        terms.append(-torch.log(s[i, j].exp() / (s[i, j].exp() + s[label_negatives, j].exp().sum())))
    expected = torch.stack(terms).sum() / targets.sum()
    torch.testing.assert_close(siamese_softmax(queries, labels, targets, 5.0), expected)


def _label_embeddings(trainer) -> torch.Tensor:
    """The label texts through the trainer's encoder now, computed here rather than by the trainer."""
    module = trainer.engine.module.eval()
    with torch.no_grad():
        embeddings, _ = module(*trainer.data.label_tokens.batch(np.arange(trainer.table.num_labels)))
    module.train()
    return embeddings


def test_stages_run_in_order_and_rows_start_from_the_siamese_encoder(synth_dir, data_cache, tmp_path):
    trainer = make_trainer(synth_dir, data_cache, tmp_path, *STAGED_RUN)
    siamese, classifier, joint = trainer.stages
    assert [s.name for s in trainer.stages] == ["siamese", "classifier", "joint"]
    siamese_steps = siamese.epochs * siamese.steps_per_epoch  # 16 batches of 32 queries
    trainer.schedule.max_steps = siamese_steps + 1  # stop after the classifier stage's first step
    encoder_before = {k: v.clone() for k, v in trainer.engine.module.state_dict().items()}
    trainer.fit()

    encoder = trainer.engine.module.state_dict()
    assert any(not torch.equal(encoder[k], v) for k, v in encoder_before.items())  # the Siamese stage trained it
    label_embeddings = _label_embeddings(trainer)
    first_batch = classifier.batches.epoch_batches(0)[0]
    touched = set(trainer.data.train.labels(first_batch).indices.tolist())
    untouched = [label for label in range(trainer.table.num_labels) if label not in touched]
    assert len(untouched) > 10  # a classifier step changes only the rows of its batch's labels (and negatives)
    changed = (trainer.table.rows != label_embeddings).any(1)
    assert changed.sum() < len(touched) + 2 * len(first_batch)
    torch.testing.assert_close(trainer.table.rows[~changed], label_embeddings[~changed], rtol=1e-5, atol=1e-6)

    records = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    stages = [(r["step"], r["stage"]) for r in records if "loss" in r]
    assert stages == [(s, "siamese") for s in range(1, siamese_steps + 1)] + [(siamese_steps + 1, "classifier")]


def _embeddings_at_the_end(stage) -> dict:
    """The frozen query embeddings `stage` trained on, kept as it ends (and lets them go)."""
    kept, end = {}, stage.end

    def keep_then_end():
        kept["queries"] = stage.queries
        end()

    stage.end = keep_then_end
    return kept


def test_the_classifier_stage_leaves_the_encoder_as_it_is(synth_dir, data_cache, tmp_path):
    trainer = make_trainer(synth_dir, data_cache, tmp_path, "classifier.epochs=1", "train.epochs=0",
                           "classifier.batch_size=64")
    (classifier,) = trainer.stages
    encoder_before = {k: v.clone() for k, v in trainer.engine.module.state_dict().items()}
    rows_before = trainer.table.rows.clone()
    trained_on = _embeddings_at_the_end(classifier)
    trainer.fit()
    assert not hasattr(classifier, "queries")  # let go when the stage ended
    assert trainer.step == 8 and not torch.equal(trainer.table.rows, rows_before)
    for name, value in trainer.engine.module.state_dict().items():
        assert torch.equal(value, encoder_before[name]), name
    with torch.no_grad():  # the cached embeddings are the frozen encoder's
        expected, _ = trainer.engine.module.eval()(*trainer.data.train.batch(np.arange(5)))
    torch.testing.assert_close(trained_on["queries"][:5], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_embedding_dropout_masks_what_the_rows_train_on_by_seed_and_step(synth_dir, data_cache, tmp_path,
                                                                          monkeypatch):
    """The rows' loss sees the frozen embeddings with a dropout mask drawn from (seed, step), scaled by 1 / (1 - p);
    the negatives are sampled with the whole embeddings. Another trainer draws the same masks (as a resumed run)."""
    import astra_ds.training.stages as stages

    p, seen = 0.25, []

    def runs(out):
        seen.clear()
        trainer = make_trainer(synth_dir, data_cache, out, "classifier.epochs=1", "train.epochs=0",
                               "classifier.batch_size=64", f"classifier.embedding_dropout={p}", "train.max_steps=2")
        (classifier,) = trainer.stages
        sampled, sample = [], trainer.parts.sampler.sample
        trainer.parts.sampler.sample = lambda rows, queries, *a: (sampled.append(queries.clone()),
                                                                  sample(rows, queries, *a))[1]
        whole = _embeddings_at_the_end(classifier)
        trainer.fit()
        return whole["queries"], np.asarray(classifier.batches.epoch_batches(0))[:2], sampled, list(seen)

    real = stages.classifier_loss
    monkeypatch.setattr(stages, "classifier_loss", lambda table, queries, *a: (seen.append(queries.clone()),
                                                                               real(table, queries, *a))[1])
    whole, batches, sampled, trained_on = runs(tmp_path / "a")
    masks = []
    for rows, for_negatives, for_rows in zip(batches, sampled, trained_on):
        torch.testing.assert_close(for_negatives, whole[rows])
        kept = for_rows != 0
        assert abs((~kept).float().mean().item() - p) < 0.03
        torch.testing.assert_close(for_rows[kept] * (1 - p), whole[rows][kept])
        masks.append(kept)
    assert not torch.equal(masks[0], masks[1])  # each step its own mask
    _, _, _, again = runs(tmp_path / "b")
    assert all(torch.equal(a, b) for a, b in zip(again, trained_on))


def test_the_refit_stage_trains_the_rows_on_the_encoder_the_joint_stage_left(synth_dir, data_cache, tmp_path):
    trainer = make_trainer(synth_dir, data_cache, tmp_path, *STAGED_RUN, "classifier.refit_epochs=1")
    assert [s.name for s in trainer.stages] == ["siamese", "classifier", "joint", "refit"]
    _, classifier, joint, refit = trainer.stages
    rows_after_joint = {}
    begin = refit.begin
    refit.begin = lambda resumed: (rows_after_joint.setdefault("rows", trainer.table.rows.clone()), begin(resumed))
    trained_on = {stage.name: _embeddings_at_the_end(stage) for stage in (classifier, refit)}
    trainer.fit()

    assert not torch.equal(trainer.table.rows, rows_after_joint["rows"])
    with torch.no_grad():  # the refit's cached embeddings are the final encoder's, the classifier stage's are not
        expected, _ = trainer.engine.module.eval()(*trainer.data.train.batch(np.arange(5)))
    torch.testing.assert_close(trained_on["refit"]["queries"][:5], expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(trained_on["classifier"]["queries"][:5], expected, rtol=1e-3, atol=1e-4)
    records = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    stages = [r["stage"] for r in records if "loss" in r]
    assert stages == [s.name for s in trainer.stages for _ in range(s.epochs * s.steps_per_epoch)]


@pytest.mark.slow
def test_init_from_a_checkpoint_written_before_its_rows_existed_starts_them_from_table_init(synth_dir, data_cache,
                                                                                            tmp_path):
    """A checkpoint of a Siamese stage holds no rows yet (they start when the first stage that trains them
    begins): a run started from its weights initialises them as a fresh run does, from the encoder it loaded."""
    from astra_ds.dist import init_distributed
    from astra_ds.training.trainer import Trainer

    common = [*TINY_RUN, *STAGED_RUN, f"data.path={synth_dir}", f"data.cache_dir={data_cache}"]
    run_main("train", "--no-eval", *[a for o in [*common, f"out_dir={tmp_path / 'siamese'}", "train.max_steps=4"]
                                     for a in ("--set", o)])
    cfg = load_config(None, [*common, "siamese.epochs=0", "train.max_steps=1", f"out_dir={tmp_path / 'next'}"])
    trainer = Trainer(cfg, init_distributed(), progress=False,
                      init_from=str(tmp_path / "siamese" / "checkpoints" / "global_step4"))
    assert not trainer.table.initialized and not trainer.table.rows.any()
    assert trainer.rows_stage is trainer.stages[0]  # the classifier stage
    label_embeddings = _label_embeddings(trainer)  # the loaded Siamese encoder's
    trainer.fit()
    unchanged = (trainer.table.rows == label_embeddings).all(1)
    assert unchanged.sum() > trainer.table.num_labels // 2  # one step of 8 queries moved the others


@pytest.mark.slow
def test_a_run_resumed_inside_the_classifier_stages_equals_an_uninterrupted_one(synth_dir, data_cache, tmp_path):
    """The classifier and refit stages' embeddings are computed again from the checkpoint's encoder; batches,
    negatives and rows continue exactly, also when a finished run is extended by more stages (its first two legs
    have no joint and refit stages). Dual scoring: `eval` of the finished run gives the metrics of `train`."""
    common = [*TINY_RUN, *STAGED_RUN, f"data.path={synth_dir}", f"data.cache_dir={data_cache}",
              "train.record_batches=true", "batching.mode=clustered", "batching.warmup_epochs=0",
              "eval.label_text_weight=0.5", "classifier.refit_epochs=1"]
    sets = lambda *overrides: [a for o in [*common, *overrides] for a in ("--set", o)]  # noqa: E731
    steps = 16 + 64 + 16 + 64  # Siamese, classifier (8 queries a step), joint, refit
    run_main("train", *sets(f"out_dir={tmp_path / 'straight'}"))
    first_stages = [f"out_dir={tmp_path / 'resumed'}", "train.epochs=0", "classifier.refit_epochs=0"]
    run_main("train", "--no-eval", *sets(*first_stages, "train.max_steps=40"))
    run_main("train", "--no-eval", "--resume", "auto", *sets(*first_stages))  # finished after the classifier stage
    run_main("train", "--no-eval", "--resume", "auto", *sets(f"out_dir={tmp_path / 'resumed'}", "train.max_steps=120"))
    run_main("train", "--resume", "auto", *sets(f"out_dir={tmp_path / 'resumed'}"))

    def log(run):
        return [json.loads(line) for line in (tmp_path / run / "train_log.jsonl").read_text().splitlines()]

    for key in ("batch", "loss"):
        straight = [(r["step"], r[key]) for r in log("straight") if key in r]
        resumed = [(r["step"], r[key]) for r in log("resumed") if key in r]
        assert [s for s, _ in straight] == list(range(1, steps + 1)) == [s for s, _ in resumed]
        if key == "batch":
            assert straight == resumed
        else:
            np.testing.assert_allclose([v for _, v in resumed], [v for _, v in straight], rtol=1e-5)
    rows = [ClassifierTable(50, 32, TableConfig()) for _ in range(2)]
    for table, run in zip(rows, ("straight", "resumed")):
        table.load(tmp_path / run / "table")
    torch.testing.assert_close(rows[1].rows, rows[0].rows, rtol=1e-5, atol=1e-6)

    trained = json.loads((tmp_path / "straight" / "metrics.json").read_text())["astra_ds"]
    run_main("eval", "--run-dir", str(tmp_path / "straight"), "--out-dir", str(tmp_path / "again"))
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())["astra_ds"]
    assert again == pytest.approx(trained, abs=1e-9)
    run_main("eval", "--run-dir", str(tmp_path / "straight"), "--out-dir", str(tmp_path / "rows_only"),
             "--set", "eval.label_text_weight=0")
    assert json.loads((tmp_path / "rows_only" / "metrics.json").read_text())["astra_ds"] != again


def test_dual_scoring_adds_the_weighted_label_embeddings_to_the_unit_rows():
    table = ClassifierTable(30, 8, TableConfig())
    table.init_random(1)
    label_embeddings = LabelEmbeddings(table)
    label_embeddings.rows.copy_(F.normalize(torch.randn(30, 8, generator=torch.Generator().manual_seed(2)), dim=-1))
    queries = F.normalize(torch.randn(6, 8, generator=torch.Generator().manual_seed(3)), dim=-1)
    scores, ids = exact_topk(queries, table, 5, True, label_block=7, progress=False,
                             label_embeddings=label_embeddings, label_text_weight=0.7)
    dense = queries @ (F.normalize(table.rows, dim=-1) + 0.7 * label_embeddings.rows).T
    expected = dense.topk(5, dim=1)
    torch.testing.assert_close(scores, expected.values)
    assert torch.equal(ids, expected.indices)

    # computed once, as a served model keeps them (blocks of 7, a scaled range across two of them)
    vectors = ScoringRows(table, True, label_embeddings, 0.7, [[5, 16, 0.5]]).in_memory(label_block=7)
    scales = torch.ones(30)
    scales[5:16] = 0.5
    reference = F.normalize(table.rows, dim=-1) * scales[:, None] + 0.7 * label_embeddings.rows
    torch.testing.assert_close(vectors.block_rows(0, 30), reference)
    torch.testing.assert_close(exact_topk(queries, vectors, 5, False, progress=False)[0],
                               (queries @ reference.T).topk(5, dim=1).values)


def test_the_encoder_learning_rate_warms_up_then_decays_to_zero(synth_dir, data_cache, tmp_path):
    train = load_config(None, ["train.encoder_warmup=0.25", "train.encoder_decay=linear"]).train
    config, _ = resolve_ds_config(train, 1, False)
    add_scheduler(config, train, 16)
    assert config["scheduler"]["params"] | {} == {"warmup_min_lr": 0.0, "warmup_max_lr": 5e-5, "warmup_num_steps": 4,
                                                  "warmup_type": "linear", "total_num_steps": 16}
    trainer = make_trainer(synth_dir, data_cache, tmp_path, "train.encoder_warmup=0.25", "train.encoder_decay=linear")
    lrs = []
    for step, rows in enumerate(trainer.stages[0].batches.epoch_batches(0)):
        lrs.append(trainer.engine.get_lr()[0])
        trainer.stages[0].step(rows, step)
    peak = int(np.argmax(lrs))  # DeepSpeed's schedule starts from 0 and counts its first step late by one
    assert lrs[0] == 0 and lrs[peak] == pytest.approx(1e-3) and peak == 5
    assert all(a < b for a, b in zip(lrs[1:peak], lrs[2:peak + 1]))  # linear rise
    decay = np.diff(lrs[peak:])
    np.testing.assert_allclose(decay, -1e-3 / 12)  # linear decay towards 0 at step 16
    assert lrs[-1] > 0
