"""Lexical features (astra_ds/encoder/lexical.py): the sketch against a dense TF-IDF reference computed feature by
feature, inner products kept, and a run that appends them: predict answers as the training evaluated, with the
idf the training fitted."""

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import astra_ds
from astra_ds.config import EncoderConfig
from astra_ds.data.readers import read_dataset
from astra_ds.data.tokens import TokenizedTexts
from astra_ds.errors import UserError
from astra_ds.encoder import lexical
from astra_ds.encoder.encoder import QueryEncoder
from astra_ds.inference.export import export
from conftest import TINY_RUN, run_main

VOCAB = 1000


def _tokens(texts: list[list[int]]) -> TokenizedTexts:
    """Token ids as a tokenizer makes them: 1 (a special first token), the text, 2 (a special last one), padding."""
    width = max(len(t) for t in texts) + 2
    ids = np.zeros((len(texts), width), np.int32)
    for row, text in enumerate(texts):
        ids[row, :len(text) + 2] = [1, *text, 2]
    return TokenizedTexts(ids, np.array([len(t) + 2 for t in texts], np.int32))


def _dense_tfidf(texts: list[list[int]], fitted_on: list[list[int]]) -> list[dict[int, float]]:
    """Feature id -> tf x idf of each text, counted in Python."""
    def features(text):
        pairs = [(a * lexical._BIGRAM + b) % (lexical.BUCKETS - VOCAB) + VOCAB for a, b in zip(text, text[1:])]
        return list(text) + pairs

    df = {}
    for text in fitted_on:
        for feature in set(features(text)):
            df[feature] = df.get(feature, 0) + 1
    idf = lambda f: math.log(1 + len(fitted_on)) - math.log(1 + df.get(f, 0)) + 1  # noqa: E731
    vectors = []
    for text in texts:
        vector = {}
        for feature in features(text):
            vector[feature] = vector.get(feature, 0.0) + idf(feature)
        vectors.append(vector)
    return vectors


def _dense_sketch(vector: dict[int, float], dim: int) -> np.ndarray:
    """The signed projection of a TF-IDF vector, one feature and one hash at a time, normalised."""
    sketch = np.zeros(dim)
    for feature, weight in vector.items():
        for (a, b), (c, d) in zip(lexical._COORDS, lexical._SIGNS):
            sign = 1 - 2 * ((feature * c + d) % lexical._PRIME % 2)
            sketch[(feature * a + b) % lexical._PRIME % dim] += sign * weight / math.sqrt(lexical.HASHES)
    return sketch / max(np.linalg.norm(sketch), 1e-12)


def test_the_sketch_is_the_projection_of_the_dense_tfidf_vector():
    train = [[5, 6, 7], [5, 8], [9, 5, 6, 6], [10]]
    queries = [[5, 6, 7], [6, 6, 11], [999, 998], [12], []]  # 11, 12 and the pairs of 999 never seen in training
    sketch = lexical.LexicalSketch(64, VOCAB)
    sketch.fit_idf(_tokens(train))
    got = sketch(*_tokens(queries).batch(np.arange(len(queries)))).numpy()
    expected = np.stack([_dense_sketch(v, 64) for v in _dense_tfidf(queries, train)])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert np.allclose(np.linalg.norm(got[:4], axis=1), 1) and not got[4].any()  # no inner tokens: zero
    assert sketch.idf[5] == pytest.approx(math.log(5 / 4) + 1) and sketch.idf[11] == pytest.approx(math.log(5) + 1)


def test_sketches_keep_the_inner_products_of_tfidf_vectors():
    rng = np.random.default_rng(0)
    texts = [list(rng.integers(3, 40, size=rng.integers(3, 12))) for _ in range(40)]
    sketch = lexical.LexicalSketch(4096, VOCAB)
    sketch.fit_idf(_tokens(texts))
    got = sketch(*_tokens(texts).batch(np.arange(len(texts)))).numpy()
    vectors = _dense_tfidf(texts, texts)
    cosines = np.array([[sum(w * b.get(f, 0) for f, w in a.items()) for b in vectors] for a in vectors])
    norms = np.sqrt(np.diag(cosines))
    cosines /= norms[:, None] * norms[None, :]
    assert np.abs(got @ got.T - cosines).max() < 0.1
    assert cosines[~np.eye(len(texts), dtype=bool)].max() > 0.2  # some texts do share words


def test_the_encoder_appends_the_weighted_sketch_and_stays_unit_norm():
    dense = QueryEncoder(EncoderConfig(model="tiny-random"), 10)
    torch.manual_seed(0)
    with_lexical = QueryEncoder(EncoderConfig(model="tiny-random", lexical_dim=16, lexical_weight=0.5), 10)
    with_lexical.backbone.load_state_dict(dense.backbone.state_dict())
    input_ids, attention_mask = _tokens([[5, 6, 7], [8, 9]]).batch(np.arange(2))
    embeddings, _ = with_lexical(input_ids, attention_mask)
    assert with_lexical.dim == 32 + 16 and embeddings.shape == (2, 48)
    scale = math.sqrt(1 + 0.5 ** 2)
    torch.testing.assert_close(embeddings[:, :32] * scale, dense(input_ids, attention_mask)[0])
    torch.testing.assert_close(embeddings[:, 32:] * scale / 0.5, with_lexical.lexical(input_ids, attention_mask))
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(2))


def test_a_run_with_lexical_features_predicts_as_it_evaluated(synth_dir, data_cache, tmp_path):
    """The idf fitted on the training queries travels in encoder.pt: predict scores as the training evaluated;
    the export to sentence-transformers, which cannot compute the features, is refused in one line."""
    run = astra_ds.train(None, [*TINY_RUN, "train.epochs=1", "encoder.lexical_dim=24", f"data.path={synth_dir}",
                                f"data.cache_dir={data_cache}", f"out_dir={tmp_path / 'run'}"])
    model = run.load()
    assert model.card.dim == 32 + 24 and model.encoder.lexical.idf.min() >= 1 and model.encoder.lexical.idf.std() > 0
    texts = read_dataset(synth_dir).test.texts
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    run_main("predict", "--run-dir", str(run.run_dir), "--input", str(tmp_path / "texts.txt"), "--top-k", "5",
             "--exact", "--out", str(tmp_path / "predicted.npz"))
    evaluated, predicted = sp.load_npz(run.run_dir / "predictions.npz"), sp.load_npz(tmp_path / "predicted.npz")
    np.testing.assert_array_equal(predicted.indices, evaluated.indices)
    np.testing.assert_allclose(predicted.data, evaluated.data, rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="lexical features"):
        export(run.run_dir, tmp_path / "export")
