"""The XC repository's JSON format, reciprocal-pair filters, conversions between formats, propensity presets,
`data validate`, and label matrices without nonzeros."""

import gzip
import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from astra_ds.cli.main import main
from astra_ds.config import EvalConfig, load_config
from astra_ds.data.membership import CSRMembership
from astra_ds.data.readers import read_dataset
from astra_ds.eval.evaluate import MODEL, evaluate, remove_filtered, search_k
from astra_ds.data.queries import TrainCounts
from astra_ds.eval.metrics import compute_metrics, inverse_propensity
from astra_ds.negatives.mixture import sample_mixture
from astra_ds.negatives.uniform import sample_uniform

TRAIN = [("red apple pie", "", [0, 2]), ("green apple", "fresh from the tree", [0]), ("blue sky", "", [1])]
TEST = [("apple tart", "with cream", [0, 2]), ("grey sky", "", [1]), ("sky pie", "", [])]
LABELS = ["apple", "sky", "pie"]


def _write_json(directory, name, records):
    with gzip.open(directory / name, "wt", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


@pytest.fixture
def json_dir(tmp_path):
    directory = tmp_path / "lf"
    directory.mkdir()
    for name, split in (("trn.json.gz", TRAIN), ("tst.json.gz", TEST)):
        _write_json(directory, name, [{"uid": f"q{i}", "title": title, "content": content, "target_ind": targets,
                                       "target_rel": [1.0] * len(targets)}
                                      for i, (title, content, targets) in enumerate(split)])
    _write_json(directory, "lbl.json.gz", [{"uid": f"l{i}", "title": t, "content": ""} for i, t in enumerate(LABELS)])
    (directory / "filter_labels_test.txt").write_text("0 2\n")  # test point 0 and label 2 are a reciprocal pair
    return directory


def test_the_json_format_is_detected_and_read(json_dir):
    dataset = read_dataset(json_dir)
    assert dataset.train.texts == [t for t, _, _ in TRAIN] and dataset.label_texts == LABELS
    assert dataset.test.labels.toarray().tolist() == [[1, 0, 1], [0, 1, 0], [0, 0, 0]]
    assert dataset.test_filter.toarray().tolist() == [[0, 0, 1], [0, 0, 0], [0, 0, 0]]
    assert dataset.train_filter is None
    with_content = read_dataset(json_dir, text_fields="title_content")
    assert with_content.train.texts == ["red apple pie", "green apple fresh from the tree", "blue sky"]


@pytest.mark.parametrize("line, message", [
    ("{not json", "tst.json.gz:2: not a JSON object"),
    ('["a list"]', "tst.json.gz:2: expected a JSON object, got list"),
    ('{"uid": "x", "content": ""}', "tst.json.gz:2: no 'title' field"),
    ('{"title": "t", "target_ind": [7]}', "tst.json.gz:2: label id 7 out of range [0, 3)"),
    ('{"title": "t", "target_ind": "0"}', "tst.json.gz:2: target_ind must be a list of label ids"),
])
def test_a_malformed_json_line_is_one_line(json_dir, line, message, capsys):
    first = gzip.open(json_dir / "tst.json.gz", "rt").readline()
    with gzip.open(json_dir / "tst.json.gz", "wt", encoding="utf-8") as f:
        f.write(first + line + "\n")  # the bad line second
    assert main(["data", "stats", str(json_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("astra-ds: error: ") and err.count("\n") == 1 and message in err, err


def test_conversions_round_trip(json_dir, tmp_path):
    source = read_dataset(json_dir)
    assert main(["data", "convert", str(json_dir), "--to", "raw_text", "--out", str(tmp_path / "raw")]) == 0
    assert main(["data", "convert", str(tmp_path / "raw"), "--to", "xc_json", "--out", str(tmp_path / "back")]) == 0
    for directory in (tmp_path / "raw", tmp_path / "back"):
        converted = read_dataset(directory)
        assert converted.train.texts == source.train.texts and converted.test.texts == source.test.texts
        assert converted.label_texts == source.label_texts
        assert (converted.train.labels != source.train.labels).nnz == 0
        assert (converted.test.labels != source.test.labels).nnz == 0
        assert (converted.test_filter != source.test_filter).nnz == 0  # the filter file travels
    assert main(["data", "convert", str(json_dir), "--to", "bow", "--out", str(tmp_path / "bow")]) == 0
    bow = read_dataset(tmp_path / "bow")
    assert [sorted(t.split()) for t in bow.test.texts] == [sorted(set(t.split())) for t in source.test.texts]
    assert (bow.test.labels != source.test.labels).nnz == 0


def test_the_filter_leaves_predictions_and_gold_labels(json_dir, tmp_path):
    """Point 0 (gold {0, 2}, filter {2}) predicted [2, 1, 0]: label 2 leaves both sides, so P@1 = 0 (label 1
    moves up) and P@2 = 1/2 of one remaining gold label; by hand below."""
    dataset = read_dataset(json_dir)
    ids = torch.tensor([[2, 1, 0], [1, 0, 2], [2, 1, 0]])
    scores = torch.tensor([[3.0, 2.0, 1.0]] * 3)
    cfg = EvalConfig(ks=[1, 2])
    assert search_k(cfg, dataset.test_filter) == 3  # room for the one filtered pair a row
    kept_scores, kept_ids = remove_filtered(scores, ids, dataset.test_filter, 2)
    assert kept_ids.tolist() == [[1, 0], [1, 0], [2, 1]] and kept_scores[0].tolist() == [2.0, 1.0]
    results = evaluate({MODEL: (scores, ids)}, torch.tensor([0.0, 0.0]), dataset.test.labels,
                       TrainCounts.of(dataset.train.labels), cfg, 3, tmp_path, {}, dataset.test_filter)[MODEL]
    # gold after the filter: {0}, {1}, {}; top-2: [1, 0], [1, 0], [2, 1]
    assert results["P@1"] == pytest.approx((0 + 1 + 0) / 3)
    assert results["P@2"] == pytest.approx((1 / 2 + 1 / 2 + 0) / 3)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["filter"] == {"applied": True, "pairs": 1}
    unfiltered = evaluate({MODEL: (scores, ids)}, torch.tensor([0.0, 0.0]), dataset.test.labels,
                          TrainCounts.of(dataset.train.labels), cfg, 3, tmp_path, {})[MODEL]
    assert unfiltered["P@1"] == pytest.approx(2 / 3)
    assert json.loads((tmp_path / "metrics.json").read_text())["filter"]["applied"] is False


def test_propensity_presets_and_explicit_values():
    assert load_config(None, []).eval.propensity == (0.55, 1.5)
    assert load_config(None, ["eval.psp=amazon"]).eval.propensity == (0.6, 2.6)
    assert load_config(None, ["eval.psp=wikipedia"]).eval.propensity == (0.5, 0.4)
    assert load_config(None, ["eval.psp=amazon", "eval.psp_b=1.0"]).eval.propensity == (0.6, 1.0)
    with pytest.raises(ValueError, match="eval.psp must be one of default, amazon, wikipedia"):
        load_config(None, ["eval.psp=imdb"])


def test_label_matrices_without_nonzeros():
    empty = sp.csr_matrix((3, 5))
    assert not CSRMembership(empty).contains(np.array([0, 2]), np.array([1, 4])).any()
    pred = np.array([[0, 1], [2, 3], [4, 0]])
    inv_psp = inverse_propensity(TrainCounts.of(sp.csr_matrix(np.eye(5))), 0.55, 1.5)
    metrics = compute_metrics(pred, empty, inv_psp, ks=(1, 2))
    assert metrics["P@1"] == metrics["nDCG@2"] == metrics["R@2"] == 0.0  # points without labels score 0
    rng = np.random.default_rng(0)
    uniform = sample_uniform(empty, 4, rng)
    assert uniform.global_ids.shape == (3, 4) and np.isfinite(uniform.log_q).all()
    mixture = sample_mixture(empty, np.array([[0, 1], [2, 3], [4, -1]]), np.ones((3, 2)), 4, 0.5, 0.1, rng)
    assert mixture.global_ids.shape == (3, 4) and np.isfinite(mixture.log_q).all()
    remaining_scores, remaining_ids = remove_filtered(torch.ones(3, 2), torch.from_numpy(pred), empty, 2)
    assert remaining_ids.tolist() == pred.tolist()


def test_validate_reports_unseen_labels_and_truncation(json_dir, capsys):
    assert main(["data", "validate", str(json_dir), "--set", "encoder.model=tiny-random",
                 "--set", "data.max_len=4"]) == 0
    out = capsys.readouterr().out
    assert "test: 3 queries, 3 positives; without labels 1 (33.3%)" in out
    assert "labels without training points: 0 (0.0%)" in out
    assert "filter_labels_test.txt: 1 pairs" in out
    assert "truncated by 4 tokens: 1 (33.3%)" in out  # "green apple" + [CLS] [SEP] = 4: only "red apple pie"
    assert "warnings:" in out and "data.max_len=4 truncates 1 (33.3%) train queries" in out
