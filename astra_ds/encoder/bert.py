"""BERT's forward in plain torch, for inference: the backbone of MiniLM and BERT encoders without transformers'
modeling code.

Importing transformers' model classes costs about 5 s on 2 cores (their modules import torch's compiler and
distributed tensors), more than torch itself; `predict` and a server start paid it before their first answer.
This module has transformers' BertModel parameter names, so a trained encoder's state dict loads into it
unchanged, and tests check that its outputs agree with BertModel's. It covers BERT configs with absolute
positions and a GELU or ReLU activation (`supports`); training, and any other architecture, use transformers.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "gelu_new": lambda x: F.gelu(x, approximate="tanh")}


def supports(config: dict) -> bool:
    return (config.get("model_type") == "bert" and config.get("hidden_act", "gelu") in ACTIVATIONS
            and config.get("position_embedding_type", "absolute") == "absolute")


def read_config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


class Embeddings(nn.Module):
    def __init__(self, c: SimpleNamespace):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class SelfAttention(nn.Module):
    def __init__(self, c: SimpleNamespace):
        super().__init__()
        self.heads = c.num_attention_heads
        self.query, self.key, self.value = (nn.Linear(c.hidden_size, c.hidden_size) for _ in range(3))

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        q, k, v = (part(x).view(b, s, self.heads, h // self.heads).transpose(1, 2)
                   for part in (self.query, self.key, self.value))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep).transpose(1, 2).reshape(b, s, h)


class DenseNorm(nn.Module):
    """dense, then LayerNorm of (it + the residual): BERT's attention output and layer output."""

    def __init__(self, c: SimpleNamespace, width: int):
        super().__init__()
        self.dense = nn.Linear(width, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class Attention(nn.Module):
    def __init__(self, c: SimpleNamespace):
        super().__init__()
        self.self = SelfAttention(c)
        self.output = DenseNorm(c, c.hidden_size)


class Intermediate(nn.Module):
    def __init__(self, c: SimpleNamespace):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)


class Layer(nn.Module):
    def __init__(self, c: SimpleNamespace):
        super().__init__()
        self.attention = Attention(c)
        self.intermediate = Intermediate(c)
        self.output = DenseNorm(c, c.intermediate_size)
        self.activation = ACTIVATIONS[c.hidden_act]

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = self.attention.output(self.attention.self(x, keep), x)
        return self.output(self.activation(self.intermediate.dense(x)), x)


class Encoder(nn.Module):
    def __init__(self, c: SimpleNamespace):
        super().__init__()
        self.layer = nn.ModuleList(Layer(c) for _ in range(c.num_hidden_layers))


class Pooler(nn.Module):  # unused by the query encoder; present so that BertModel's state dict loads as it is
    def __init__(self, c: SimpleNamespace):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)


class BertBackbone(nn.Module):
    """`BertBackbone(config)(input_ids=..., attention_mask=...).last_hidden_state`, as BertModel's. Its weights are
    random: a trained encoder's state dict fills them."""

    def __init__(self, config: dict, add_pooling_layer: bool = True):
        super().__init__()
        defaults = {"type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu",
                    "max_position_embeddings": 512}
        self.config = c = SimpleNamespace(**(defaults | config))
        # built on the CPU, initialised at random: building on the meta device instead would import torch's
        # compiler (3 s) to skip an initialisation that costs a tenth of that
        self.embeddings = Embeddings(c)
        self.encoder = Encoder(c)
        self.pooler = Pooler(c) if add_pooling_layer else None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        keep = attention_mask[:, None, None, :].bool()  # the keys each query attends to
        x = self.embeddings(input_ids)
        for layer in self.encoder.layer:
            x = layer(x, keep)
        return SimpleNamespace(last_hidden_state=x)

