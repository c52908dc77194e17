"""model/bert.py's plain-torch BERT against transformers' BertModel (the dense reference): the same state dict, the
same hidden states on every real token of a padded batch (tests/test_serve.py checks that inference imports no
transformers modeling code); and encoder.compute_dtype=bfloat16 against float32, the encoder's reference."""

import copy
import logging
import os

import pytest
import torch
from transformers import BertConfig, BertModel

from astra_ds.config import EncoderConfig
from astra_ds.encoder.bert import BertBackbone, supports
from astra_ds.encoder.encoder import MINILM, QueryEncoder


@pytest.mark.parametrize("activation", ["gelu", "relu", "gelu_new"])
def test_the_plain_bert_computes_what_bert_model_does(activation):
    torch.manual_seed(0)
    config = {"model_type": "bert", "vocab_size": 100, "hidden_size": 24, "num_hidden_layers": 3,
              "num_attention_heads": 4, "intermediate_size": 40, "max_position_embeddings": 16, "type_vocab_size": 2,
              "hidden_act": activation, "layer_norm_eps": 1e-7}
    reference = BertModel(BertConfig(**config)).eval()
    with torch.no_grad():
        for parameter in reference.parameters():  # away from the init's zeros and ones
            parameter.add_(torch.randn_like(parameter) * 0.1)
    plain = BertBackbone(config)
    plain.load_state_dict(reference.state_dict(), strict=False)
    assert set(reference.state_dict()) - set(plain.state_dict()) <= {"embeddings.position_ids"}
    input_ids = torch.randint(1, 100, (3, 9))
    attention_mask = torch.ones(3, 9, dtype=torch.long)
    attention_mask[1, 5:] = 0
    attention_mask[2, 2:] = 0
    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        got = plain(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    real = attention_mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=2e-5, rtol=1e-5)


def test_minilm_loads_into_the_plain_bert_and_embeds_as_trained():
    cfg = EncoderConfig(model=MINILM, lexical_dim=64)
    trained = QueryEncoder(cfg, num_labels=10).eval()
    served = QueryEncoder(cfg, num_labels=10, for_weights=True).eval()
    assert type(served.backbone).__name__ == "BertBackbone"
    served.load_state_dict(trained.state_dict())
    input_ids = torch.tensor([[101, 7592, 2088, 102, 0, 0], [101, 2023, 2003, 1037, 3231, 102]])
    attention_mask = (input_ids != 0).long()
    with torch.no_grad():
        torch.testing.assert_close(served(input_ids, attention_mask)[0], trained(input_ids, attention_mask)[0],
                                   atol=1e-5, rtol=1e-5)


def test_other_configs_are_left_to_transformers():
    assert not supports({"model_type": "distilbert"})
    assert not supports({"model_type": "bert", "position_embedding_type": "relative_key"})
    assert not supports({"model_type": "bert", "hidden_act": "silu"})


def test_bf16_autocast_embeds_and_learns_as_float32_does_within_bfloat16_precision():
    """encoder.compute_dtype=bfloat16: the transformer's matmuls in bfloat16 (plain-matmul attention on a CPU), its
    weights, gradients and the embeddings it returns in float32, close to the float32 encoder's; the served encoder
    (the plain BERT) under the same setting embeds as the trained one does."""
    torch.manual_seed(0)
    reference = QueryEncoder(EncoderConfig(model=MINILM), num_labels=10)
    mixed = QueryEncoder(EncoderConfig(model=MINILM, compute_dtype="bfloat16"), num_labels=10)
    mixed.load_state_dict(reference.state_dict())
    assert mixed.backbone.config._attn_implementation == ("sdpa" if torch.cuda.is_available() else "eager")
    input_ids = torch.tensor([[101, 7592, 2088, 102, 0, 0], [101, 2023, 2003, 1037, 3231, 102]])
    attention_mask = (input_ids != 0).long()
    target = torch.randn(2, reference.dim)
    expected, got = reference(input_ids, attention_mask)[0], mixed(input_ids, attention_mask)[0]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(got, expected, atol=3e-3, rtol=0)
    assert (got - expected).abs().max() > 0  # bfloat16 did compute it
    (expected * target).sum().backward()
    (got * target).sum().backward()
    for (name, p_ref), p_mixed in zip(reference.named_parameters(), mixed.parameters()):
        if p_ref.grad is None or p_ref.grad.norm() < 1e-6:
            continue
        assert p_mixed.dtype == p_mixed.grad.dtype == torch.float32
        cosine = torch.nn.functional.cosine_similarity(p_mixed.grad.flatten(), p_ref.grad.flatten(), dim=0)
        assert cosine > 0.98, name
    served = QueryEncoder(EncoderConfig(model=MINILM, compute_dtype="bfloat16"), num_labels=10, for_weights=True).eval()
    served.load_state_dict(mixed.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(served(input_ids, attention_mask)[0], got.detach(), atol=3e-3, rtol=0)


def test_an_encoder_cast_for_inference_holds_bfloat16_linears_and_embeds_to_the_bit_as_autocast_does():
    """cast_for_inference under compute_dtype=bfloat16: the Linear weights and biases rounded to bfloat16 once,
    as autocast rounds them at every call, so the same embeddings to the bit; LayerNorms and the word embeddings
    stay float32; a float32 encoder is left as it is."""
    torch.manual_seed(0)
    config = EncoderConfig(model=MINILM, compute_dtype="bfloat16", lexical_dim=64)
    trained = QueryEncoder(config, num_labels=10, for_weights=True).eval()
    cast = copy.deepcopy(trained).cast_for_inference()
    linears = [m for m in cast.backbone.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(p.dtype == torch.bfloat16 for m in linears for p in m.parameters())
    assert {p.dtype for n, p in cast.named_parameters() if "LayerNorm" in n or "embeddings" in n} == {torch.float32}
    input_ids = torch.tensor([[101, 7592, 2088, 102, 0, 0], [101, 2023, 2003, 1037, 3231, 102]])
    attention_mask = (input_ids != 0).long()
    with torch.no_grad():
        expected, got = trained(input_ids, attention_mask)[0], cast(input_ids, attention_mask)[0]
    assert got.dtype == torch.float32
    assert torch.equal(got, expected)
    plain = QueryEncoder(EncoderConfig(model="tiny-random"), num_labels=10, for_weights=True).cast_for_inference()
    assert {p.dtype for p in plain.parameters()} == {torch.float32}


def test_bf16_autocast_on_a_cpu_without_bfloat16_instructions_warns(monkeypatch, caplog):
    from astra_ds.encoder import encoder

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(encoder, "cpu_has_bf16", lambda: False)
    with caplog.at_level(logging.WARNING, logger="astra_ds"):
        QueryEncoder(EncoderConfig(model="tiny-random"), num_labels=10)
        assert "bfloat16" not in caplog.text
        QueryEncoder(EncoderConfig(model="tiny-random", compute_dtype="bfloat16"), num_labels=10)
    assert "slower than float32 here" in caplog.text


def test_bf16_autocast_on_a_cpu_bounds_the_kernel_caches_for_training_unless_the_user_set_them(monkeypatch):
    from astra_ds.libraries import KERNEL_CACHE_CAPACITY, KERNEL_CACHES

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for variable in KERNEL_CACHES:
        monkeypatch.delenv(variable, raising=False)
    QueryEncoder(EncoderConfig(model="tiny-random"), num_labels=10)
    QueryEncoder(EncoderConfig(model="tiny-random", compute_dtype="bfloat16"), num_labels=10, for_weights=True)
    assert not set(KERNEL_CACHES) & set(os.environ)  # float32, and a served model, leave the libraries as they are
    QueryEncoder(EncoderConfig(model="tiny-random", compute_dtype="bfloat16"), num_labels=10)
    assert [os.environ[variable] for variable in KERNEL_CACHES] == [str(KERNEL_CACHE_CAPACITY)] * 2
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "512")
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY")
    QueryEncoder(EncoderConfig(model="tiny-random", compute_dtype="bfloat16"), num_labels=10)
    assert os.environ["LRU_CACHE_CAPACITY"] == "512"
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(KERNEL_CACHE_CAPACITY)
