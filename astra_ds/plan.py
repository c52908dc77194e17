"""The memory plan of a run: the bytes each component holds on one rank, in host memory and on the GPU.

    process     measured: the interpreter, libraries, the dataset and its token ids (read before planning)
    table       rows (L_rank x d x 2 or 4 bytes) and the row-sparse optimizer state
    encoder     weights, gradients and Adam state under the ZeRO stage (sharded over ranks from stage 1 up),
                and the activations of one micro-batch
    index       the faiss index over the rank's rows (ASTRA), precomputed shortlists, NGAME's embeddings

Some memory is held only during one phase (a step's staging buffers, an index (re)build's training sample
and recall check, an evaluation's score blocks); the phases never
overlap, so the plan adds the largest of them to what is resident. (A checkpoint streams the table and the
index to files and needs no memory of its own.) `check_fits` stops a run whose ranks would
need more than their hosts have, naming what to change.
"""

from __future__ import annotations

import math
import socket
from dataclasses import dataclass

import psutil
import torch

from astra_ds.config import ConfigError, RunConfig
from astra_ds.data.prepare import PreparedData
from astra_ds.negatives.index import choose_kind, nlist_for, pq_m_for
from astra_ds.table import store
from astra_ds.table.optim import OPTIMIZERS
from astra_ds.table.table import DTYPES

GiB = 2**30
PROCESS = "process (measured)"  # the plan line of what the process held when planned
ACTIVATION_BYTES_PER_TOKEN_CHANNEL = 66  # fp32 tensors a BERT layer keeps for backward, per token and hidden unit
RUNTIME_BYTES = 150 * 2**20  # what deepspeed.initialize and the process group add beyond the encoder's state
IVF_LIST_SLACK = 1.25  # faiss inverted lists grow by doubling: capacity over size, on average


@dataclass
class PlanLine:
    component: str
    host: int  # bytes
    device: int = 0
    detail: str = ""


@dataclass
class MemoryPlan:
    resident: list[PlanLine]  # held through the run
    phases: list[PlanLine]  # held during one phase; phases do not overlap
    world_size: int
    rank: int

    def total(self, where: str = "host") -> int:
        return sum(getattr(line, where) for line in self.resident) + max((getattr(p, where) for p in self.phases), default=0)

    def to_allocate(self) -> int:
        """Host bytes the run still has to allocate: the total less what the process held when planned."""
        return self.total("host") - self.line(PROCESS).host

    def line(self, component: str) -> PlanLine:
        return next(line for line in self.resident + self.phases if line.component == component)

    def format(self) -> str:
        on_device = any(line.device for line in self.resident + self.phases)
        head = f"{f'rank {self.rank} of {self.world_size}':<34}{'host':>10}" + (f"{'GPU':>10}" if on_device else "")
        rows = [head, "-" * len(head)]

        def add(line: PlanLine, prefix: str = "") -> None:
            row = f"{prefix + line.component:<34}{line.host / GiB:9.2f}G" + (f"{line.device / GiB:9.2f}G" if on_device else "")
            rows.append(row + (f"  {line.detail}" if line.detail else ""))

        for line in self.resident:
            add(line)
        rows.append("largest of the phases below (they do not overlap):")
        for line in self.phases:
            add(line, "  ")
        rows.append("-" * len(head))
        rows.append(f"{'total':<34}{self.total('host') / GiB:9.2f}G" +
                    (f"{self.total('device') / GiB:9.2f}G" if on_device else ""))
        return "\n".join(rows)


def encoder_state_bytes(num_params: int, zero_stage: int, world_size: int, mixed_precision: bool) -> dict[str, int]:
    """Weights, gradients, fp32 master copy and Adam moments of the encoder on one rank under ZeRO.

    Stage >= 1 shards the master copy and the moments, stage 3 also the weights and gradients. Stages 1 and 2
    hold the full gradients during backward and, beside them, the reduced gradients of their partition."""
    shard = lambda n: math.ceil(n / world_size) if zero_stage >= 1 else n  # noqa: E731
    width = 2 if mixed_precision else 4
    weights = grads = num_params * width
    if zero_stage == 3:
        weights = grads = math.ceil(weights / world_size)
    elif zero_stage >= 1:
        grads += shard(num_params * 4)
    return {"weights": weights, "grads": grads, "master": shard(num_params * 4), "adam": shard(num_params * 8)}


def activation_bytes(encoder: torch.nn.Module, micro_batch: int, max_len: int) -> int:
    """What a transformer keeps for backward on one micro-batch (Korthikanti et al. 2022, fp32 tensors):
    per layer ~66 bytes per token and hidden unit, plus 9 per attention score."""
    config = encoder.backbone.config
    tokens = micro_batch * max_len
    per_layer = (tokens * config.hidden_size * ACTIVATION_BYTES_PER_TOKEN_CHANNEL
                 + 9 * micro_batch * config.num_attention_heads * max_len ** 2)
    return config.num_hidden_layers * per_layer


def index_bytes(cfg: RunConfig, rows: int, dim: int) -> tuple[int, str]:
    """Bytes of the faiss index over `rows` rows, and its kind."""
    index = cfg.index
    kind = choose_kind(index, rows)
    if kind == "flat":
        return rows * dim * 4, kind
    if kind == "hnsw":  # vectors, 2M level-0 links, upper levels (1/M of the rows, M links: ~4 B), bookkeeping
        return rows * (dim * 4 + 2 * index.hnsw_m * 4 + 4 + 16), kind
    nlist = nlist_for(index, rows)
    code = dim * 4 if kind == "ivf_flat" else pq_m_for(index, dim)
    return int(rows * (code + 8) * IVF_LIST_SLACK) + nlist * dim * 4 + 256 * dim * 4, f"{kind}, {nlist} lists"


def plan_run(cfg: RunConfig, data: PreparedData, encoder: torch.nn.Module, world_size: int, rank: int,
             on_gpu: bool, held_bytes: int) -> MemoryPlan:
    """The memory plan of rank `rank`; `held_bytes` is what the process already holds (measured)."""
    from astra_ds.train.ds_config import resolve_ds_config

    labels = data.dataset.train.labels
    num_labels, num_train, num_test = data.dataset.num_labels, labels.shape[0], len(data.test_tokens)
    positives_per_query = labels.nnz / max(1, num_train)
    ds_config, ds_path = resolve_ds_config(cfg.train, world_size, on_gpu)
    zero = ds_config.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    mixed = on_gpu and ds_config.get("bf16", {}).get("enabled", False)
    offload = zero.get("offload_optimizer", {}).get("device", "none") == "cpu"
    dim, dtype = encoder.dim, DTYPES[cfg.table.dtype]
    chunk_rows = min(store.chunk_rows_for(dim, dtype.itemsize, cfg.table.chunk_mb), num_labels)
    start, end = store.shard_range(num_labels, chunk_rows, rank, world_size)
    rows = end - start
    state_layout = OPTIMIZERS[cfg.table.optimizer].state_layout(dim)
    state_per_row = sum(math.prod(shape) * dt.itemsize for shape, dt in state_layout.values())

    def place(nbytes: int, on_host: bool = False) -> dict:
        return {"host": nbytes} if on_host or not on_gpu else {"host": 0, "device": nbytes}

    num_params = sum(p.numel() for p in encoder.parameters())
    encoder_state = encoder_state_bytes(num_params, stage, world_size, mixed)
    micro_batch = cfg.train.batch_size // (world_size * cfg.train.grad_accum)
    resident = [
        PlanLine(PROCESS, held_bytes, detail="interpreter, libraries, dataset, token ids"),
        PlanLine("DeepSpeed engine, process group", RUNTIME_BYTES, detail="measured on CPU, any encoder"),
        PlanLine("table rows", rows * dim * dtype.itemsize,
                 detail=f"{rows:,} of {num_labels:,} rows x {dim} x {cfg.table.dtype}"),
        PlanLine("table optimizer state", rows * state_per_row, detail=f"{cfg.table.optimizer}, {state_per_row} B/row"),
        PlanLine("encoder weights + grads", **place(encoder_state["weights"] + encoder_state["grads"]),
                 detail=f"{num_params / 1e6:.1f}M params, ZeRO-{stage} ({ds_path.name})"),
        PlanLine("encoder master + Adam", **place(encoder_state["master"] + encoder_state["adam"], on_host=offload),
                 detail="offloaded to the CPU" if offload else ""),
        PlanLine("encoder activations", **place(activation_bytes(encoder, micro_batch, cfg.data.max_len)),
                 detail=f"micro-batch {micro_batch} x {cfg.data.max_len} tokens"),
    ]
    neg = cfg.negatives
    if neg.strategy == "astra":
        index_size, kind = index_bytes(cfg, rows, dim)
        resident.append(PlanLine("index", index_size, detail=kind))
        if neg.shortlist_mode == "precomputed":
            resident.append(PlanLine("shortlists", num_train * neg.shortlist_size * 12,
                                     detail=f"{neg.shortlist_size} per training query"))
    if cfg.batching.mode == "clustered":
        resident.append(PlanLine("NGAME query embeddings", num_train * (dim * 2 + 1)))

    step_rows = min(rows, math.ceil(cfg.train.batch_size * (neg.num_negatives + positives_per_query)))
    if neg.in_batch:
        step_rows = min(rows, step_rows + math.ceil(cfg.train.batch_size * positives_per_query))
    # fetched rows, their gradient, the optimizer's gathered state and new weights, the host copy back
    staging = step_rows * (dim * 4 * 5 + state_per_row * 3)

    def scoring(queries: int) -> int:  # exact top-k (predict.exact_topk): a score block, its top-k, a row block
        label_block = min(cfg.eval.label_block, rows)
        return queries * label_block * 4 * 2 + label_block * dim * 8

    phases = [
        PlanLine("step staging", **place(staging), detail=f"~{step_rows:,} rows a step"),
        PlanLine("evaluation", num_labels * 8 * 3 + num_test * dim * 4 + scoring(min(num_test, 4096)),
                 detail="test embeddings, exact top-k blocks, label counts and propensities (L each)"),
    ]
    if neg.strategy == "astra":
        build = (min(rows, cfg.index.train_rows) * dim * 4 + cfg.index.add_block * dim * 8
                 + scoring(cfg.index.recall_queries))
        phases.append(PlanLine("index rebuild", build, detail="training sample, added blocks, recall check"))
    return MemoryPlan(resident, phases, world_size, rank)


def available_host_bytes() -> int:
    return psutil.virtual_memory().available


def process_bytes() -> int:
    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """The largest resident size this process has had (Linux reports kilobytes)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def check_fits(plan: MemoryPlan, on_gpu: bool) -> None:
    """Raise ConfigError when the ranks of this host need more memory than it has available. Collective:
    every rank calls it (ranks that share a host add up)."""
    import torch.distributed as dist

    # the process part is already held (and not counted as available)
    mine = (socket.gethostname(), plan.to_allocate(), available_host_bytes(),
            plan.total("device"), torch.cuda.mem_get_info()[0] if on_gpu else 0)
    everyone = [None] * dist.get_world_size() if dist.is_initialized() else [mine]
    if dist.is_initialized():
        dist.all_gather_object(everyone, mine)
    host_ranks = [r for r in everyone if r[0] == mine[0]]
    host_need, available = sum(r[1] for r in host_ranks), mine[2]
    if host_need > available:
        raise ConfigError(f"this run needs {host_need / GiB:.1f} GiB more host memory on {mine[0]} "
                          f"({len(host_ranks)} rank(s)) but {available / GiB:.1f} GiB is available. "
                          f"{advice(plan)} See the plan with `astra-ds plan --config ...`; "
                          "train.memory_check=false skips this check")
    if on_gpu and mine[3] > mine[4]:
        raise ConfigError(f"this run needs {mine[3] / GiB:.1f} GiB of GPU memory per rank, {mine[4] / GiB:.1f} GiB "
                          "is free: lower train.batch_size or data.max_len, use ZeRO-3 "
                          "(train.ds_config=zero3) or CPU offload (zero3_offload)")


def advice(plan: MemoryPlan) -> str:
    """What to change, for the largest parts of the plan."""
    rows, index = plan.line("table rows"), next((l for l in plan.resident if l.component == "index"), None)
    options = []
    if "float32" in rows.detail:
        options.append(f"table.dtype=bfloat16 (saves {rows.host / 2 / GiB:.1f} GiB)")
    if index is not None and not index.detail.startswith("ivf_pq"):
        options.append("index.kind=ivf_pq (a few bytes a row)")
    options.append("a smaller encoder.dim (the table's width)")
    options.append("more ranks on more hosts (each holds 1/W of the table)")
    return "To fit: " + ", ".join(options) + "."
