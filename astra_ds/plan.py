"""The memory plan of a run: the bytes each component holds on one rank, in host memory and on the GPU.

    process     measured: the interpreter and libraries (the data is memory-mapped: page cache, reported apart)
    table       rows (L_rank x d x 2 or 4 bytes) and the row-sparse optimizer state
    encoder     weights, gradients and Adam state under the ZeRO stage (sharded over ranks from stage 1 up)
    index       the faiss index over the rank's rows (ASTRA), precomputed shortlists, NGAME's embeddings

Some memory is held only during one phase: a step of one stage (the Siamese and joint stages' activations and
optimizer step, the rows a step fetches), an index (re)build's training sample and recall check, an evaluation's
score blocks. Stages run one after the other and the other phases fall between steps, so no two phases overlap
and the plan adds the largest of them to what is resident. (A checkpoint streams the table and the
index to files and needs no memory of its own.) `check_fits` stops a run whose ranks would
need more than their hosts have, naming what to change.
"""

from __future__ import annotations

import json
import logging
import math
import socket
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

from astra_ds.choices import BATCHING, OPTIMIZERS, SAMPLERS
from astra_ds.collectives import all_gather_objects
from astra_ds.config import RunConfig
from astra_ds.data.prepare import PreparedData
from astra_ds.ds_config import resolve_ds_config
from astra_ds.errors import ConfigError
from astra_ds.scoring.rows import exact_topk_bytes
from astra_ds.table import store
from astra_ds.table.table import DTYPES

log = logging.getLogger("astra_ds")

GiB = 2**30
PROCESS = "process (measured)"  # the plan line of what the process held when planned
ACTIVATION_BYTES_PER_TOKEN_CHANNEL = 66  # fp32 tensors a BERT layer keeps for backward, per token and hidden unit
RUNTIME_BYTES = 150 * 2**20  # what deepspeed.initialize and the process group add beyond the encoder's state


@dataclass
class PlanLine:
    """What one component holds (components that are chosen by name, such as samplers, make their own lines)."""

    component: str
    host: int  # bytes
    device: int = 0
    detail: str = ""
    advice: str | None = None  # what to change when the run does not fit
    per_query: bool = False  # it holds a value per training query (data.max_held_queries)


@dataclass
class MemoryPlan:
    resident: list[PlanLine]  # held through the run
    phases: list[PlanLine]  # held during one phase; phases do not overlap
    world_size: int
    rank: int
    shared: list[PlanLine] = field(default_factory=list)  # page cache the host's ranks share: reported apart

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
        if self.shared:
            rows.append("page cache, shared by the ranks of a host (reclaimable, not in the total):")
            for line in self.shared:
                add(line, "  ")
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


def optimizer_step_bytes(num_params: int, zero_stage: int, world_size: int) -> int:
    """What the encoder's optimizer step allocates for its duration: DeepSpeed flattens the rank's fp32 gradient
    partition into one new tensor, and torch's AdamW makes two more of its size."""
    partition = math.ceil(num_params * 4 / world_size) if zero_stage >= 1 else num_params * 4
    return 3 * partition


def training_step_phases(cfg: RunConfig, encoder: torch.nn.Module, micro_batch: int, shape: DataShape,
                         world_size: int, optimizer_step: int, staging: int, place) -> list[PlanLine]:
    """A phase for each stage that trains the encoder: the activations its micro-batch keeps for backward, then the
    optimizer step (glibc keeps the freed activations' pages until the trim after the step, so the two add up).
    The joint stage's micro-batch of queries also fetches rows (`staging`); the Siamese stage's also runs the texts
    of the micro-batch's labels through the encoder (their number grows with the labels a query has: about 19 a
    query on Delicious). A batch is padded to its longest text."""
    query_tokens = min(cfg.data.max_len, shape.query_tokens or cfg.data.max_len)
    queries = activation_bytes(encoder, micro_batch, query_tokens)
    lines = []
    if cfg.siamese.epochs:
        global_micro = micro_batch * world_size
        label_texts = math.ceil(min(shape.num_labels, math.ceil(global_micro * shape.positives_per_query)) / world_size)
        label_tokens = min(cfg.siamese.label_max_len, shape.label_tokens or cfg.siamese.label_max_len)
        siamese = queries + activation_bytes(encoder, label_texts, label_tokens)
        lines.append(PlanLine("Siamese step", **place(siamese + optimizer_step),
                              detail=f"activations of {micro_batch} queries x {query_tokens} tokens and ~{label_texts} "
                                     f"label texts x {label_tokens}, optimizer step"))
    if cfg.train.epochs:
        lines.append(PlanLine("joint step", **place(queries + optimizer_step + staging),
                              detail=f"activations of {micro_batch} queries x {query_tokens} tokens, optimizer step, "
                                     "fetched rows"))
    return lines


def uses_label_embeddings(cfg: RunConfig) -> bool:
    """The run keeps its rows' label-text embeddings: dual scoring adds them to the rows."""
    return any(weight > 0 for weight in [cfg.eval.label_text_weight, *cfg.eval.label_text_weights])


def uses_neighbour_votes(cfg: RunConfig) -> bool:
    """The run keeps its training queries' embeddings for kNN votes."""
    return any(weight > 0 for weight in [cfg.eval.neighbour_weight, *cfg.eval.neighbour_weights])


@dataclass(frozen=True)
class DataShape:
    """What the plan needs of the data: read from the prepared data's manifest, or given (`astra-ds plan
    --num-labels ...`, planning a run whose data is not on this machine)."""

    num_labels: int
    num_train: int
    num_test: int
    positives_per_query: float
    query_tokens: int | None = None  # the longest query, in tokens (a batch is padded to its longest); None: max_len
    label_tokens: int | None = None  # the longest label text; None: siamese.label_max_len
    mapped_bytes: int = 0  # the training data memory-mapped from a prepared directory

    @classmethod
    def of(cls, data: PreparedData) -> "DataShape":
        train = data.train.stats()
        label_tokens = data.label_tokens.longest() if data.label_tokens is not None else None
        return cls(data.num_labels, train.rows, len(data.test.tokens), train.positives_per_query, train.longest,
                   label_tokens, data.mapped_bytes)


def plan_run(cfg: RunConfig, shape: DataShape, encoder: torch.nn.Module, world_size: int, rank: int,
             on_gpu: bool, held_bytes: int) -> MemoryPlan:
    """The memory plan of rank `rank`; `held_bytes` is what the process already holds (measured); `on_gpu`: as the
    run will be, also when planned from a machine without a GPU."""
    num_labels, num_train, num_test = shape.num_labels, shape.num_train, shape.num_test
    positives_per_query = shape.positives_per_query
    ds_config, ds_path = resolve_ds_config(cfg.train, world_size, on_gpu)
    zero = ds_config.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    mixed = on_gpu and ds_config.get("bf16", {}).get("enabled", False)
    offload = zero.get("offload_optimizer", {}).get("device", "none") == "cpu"
    dim, dtype = encoder.dim, DTYPES[cfg.table.dtype]
    start, end = store.ShardGeometry.of(num_labels, dim, dtype.itemsize, cfg.table.chunk_mb, world_size).range(rank)
    rows = end - start
    state_layout = OPTIMIZERS.get(cfg.table.optimizer).state_layout(dim)
    state_per_row = sum(math.prod(shape) * dt.itemsize for shape, dt in state_layout.values())

    def place(nbytes: int, on_host: bool = False) -> dict:
        return {"host": nbytes} if on_host or not on_gpu else {"host": 0, "device": nbytes}

    num_params = sum(p.numel() for p in encoder.parameters())
    encoder_state = encoder_state_bytes(num_params, stage, world_size, mixed)
    micro_batch = cfg.train.batch_size // (world_size * cfg.train.grad_accum)
    row_bytes = rows * dim * dtype.itemsize
    resident = [
        PlanLine(PROCESS, held_bytes, detail="interpreter, libraries, the data's manifest"),
        PlanLine("DeepSpeed engine, process group", RUNTIME_BYTES, detail="measured on CPU, any encoder"),
        PlanLine("table rows", row_bytes, detail=f"{rows:,} of {num_labels:,} rows x {dim} x {cfg.table.dtype}",
                 advice=f"table.dtype=bfloat16 (saves {row_bytes / 2 / GiB:.1f} GiB)" if dtype.itemsize == 4 else None),
        PlanLine("table optimizer state", rows * state_per_row, detail=f"{cfg.table.optimizer}, {state_per_row} B/row"),
        *([PlanLine("best rows' copy", row_bytes + rows * state_per_row, detail="eval.keep_best: rows and state")]
          if cfg.eval.keep_best else []),
        PlanLine("encoder weights + grads", **place(encoder_state["weights"] + encoder_state["grads"]),
                 detail=f"{num_params / 1e6:.1f}M params, ZeRO-{stage} ({ds_path.name})"),
        PlanLine("encoder master + Adam", **place(encoder_state["master"] + encoder_state["adam"], on_host=offload),
                 detail="offloaded to the CPU" if offload else ""),
    ]
    if cfg.classifier.epochs or cfg.classifier.refit_epochs:
        resident.append(PlanLine("frozen query embeddings", num_train * dim * 4,
                                 detail=f"classifier and refit stages: {num_train:,} training queries x {dim}",
                                 advice="classifier.epochs=0 and classifier.refit_epochs=0", per_query=True))
    if uses_label_embeddings(cfg):
        resident.append(PlanLine("label-text embeddings", rows * dim * 4, detail="dual scoring"))
    sampler_resident, sampler_phases = SAMPLERS.get(cfg.negatives.strategy).memory(cfg, rows, dim, num_train)
    resident += sampler_resident + BATCHING.get(cfg.batching.mode).memory(num_train, dim)

    neg = cfg.negatives
    step_rows = min(rows, math.ceil(cfg.train.batch_size * (neg.num_negatives + positives_per_query)))
    if neg.in_batch:
        step_rows = min(rows, step_rows + math.ceil(cfg.train.batch_size * positives_per_query))
    # fetched rows, their gradient, the optimizer's gathered state and new weights, the host copy back
    staging = step_rows * (dim * 4 * 5 + state_per_row * 3)
    optimizer_step = optimizer_step_bytes(num_params, stage, world_size)
    evaluation = exact_topk_bytes(min(num_test, 4096), rows, dim, cfg.eval.label_block)
    votes = (num_train * dim * 4 + exact_topk_bytes(min(num_test, 4096), num_train, dim, cfg.eval.label_block)
             if uses_neighbour_votes(cfg) else 0)
    phases = [
        *training_step_phases(cfg, encoder, micro_batch, shape, world_size, optimizer_step, staging, place),
        *([PlanLine("classifier step", **place(staging), detail=f"~{step_rows:,} fetched rows (and refit)")]
          if cfg.classifier.epochs or cfg.classifier.refit_epochs else []),
        PlanLine("evaluation", num_labels * 8 * 3 + num_test * dim * 4 + evaluation + votes,
                 detail="test embeddings, exact top-k blocks, label counts and propensities (L each)"
                        + (", the training queries' embeddings and search blocks (kNN votes)" if votes else ""),
                 advice="eval.neighbour_weight=0" if votes else None, per_query=bool(votes)),
        *sampler_phases,
    ]
    shared = [PlanLine("prepared training data", shape.mapped_bytes, detail="memory-mapped token ids and labels")] \
        if shape.mapped_bytes else []
    return MemoryPlan(resident, phases, world_size, rank, shared)


def plan_and_check(cfg: RunConfig, data: PreparedData, encoder: torch.nn.Module, dist, held_bytes: int) -> MemoryPlan:
    """This rank's plan, logged; the run stops here, before allocating, when its host cannot hold it (unless
    train.memory_check is off). Collective."""
    on_gpu = dist.device.type == "cuda"
    plan = plan_run(cfg, DataShape.of(data), encoder, dist.world_size, dist.rank, on_gpu, held_bytes)
    log.info("memory plan of rank %d:\n%s", dist.rank, plan.format())
    check_held_queries(plan, len(data.train), cfg.data.max_held_queries)
    if cfg.train.memory_check:
        check_fits(plan, on_gpu)
    return plan


def check_held_queries(plan: MemoryPlan, num_train: int, limit: int) -> None:
    """Refuse a run above data.max_held_queries training queries whose plan holds a value per query."""
    held = [line for line in plan.resident + plan.phases if line.per_query]
    if num_train > limit and held:
        raise ConfigError(f"{num_train:,} training queries are over data.max_held_queries={limit:,}, and "
                          f"{', '.join(line.component for line in held)} hold a value per training query in memory: "
                          f"set {'; '.join(line.advice for line in held if line.advice)}, or raise "
                          "data.max_held_queries if the plan fits")


def report_memory(plan: MemoryPlan, path: Path, is_main: bool, rss_anon_at_start: int | None = None) -> dict:
    """Peak resident memory of this process next to the plan's total, and its private memory when training began
    (written to `path` by rank 0)."""
    report = {"plan_host_bytes": plan.total("host"), "peak_rss_bytes": peak_rss_bytes(),
              "rss_anon_at_start_bytes": rss_anon_at_start,
              "plan": [vars(line) for line in plan.resident + plan.phases],
              "shared": [vars(line) for line in plan.shared]}
    log.info("peak RSS %.2f GiB, plan %.2f GiB", report["peak_rss_bytes"] / GiB, report["plan_host_bytes"] / GiB)
    if is_main:
        path.write_text(json.dumps(report, indent=2))
    return report


def available_host_bytes() -> int:
    return psutil.virtual_memory().available


def process_bytes() -> int:
    return psutil.Process().memory_info().rss


def _status_bytes(field: str) -> int | None:
    """A memory figure of /proc/self/status (Linux reports kilobytes); None where /proc does not say."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def rss_anon_bytes() -> int | None:
    """The process's private memory now (RssAnon: the heap, not the files it maps, such as a prepared dataset's,
    whose pages the host's ranks share); None where /proc does not say."""
    return _status_bytes("RssAnon")


def peak_rss_bytes() -> int:
    """The largest resident size this process has had: VmHWM of its memory, which starts afresh at exec (ru_maxrss
    does not: a process started by fork from a large parent, a test runner or a notebook, reports the parent's
    size); ru_maxrss where /proc is missing."""
    peak = _status_bytes("VmHWM")
    if peak is not None:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def check_fits(plan: MemoryPlan, on_gpu: bool) -> None:
    """Raise ConfigError when the ranks of this host need more memory than it has available. Collective:
    every rank calls it (ranks that share a host add up)."""
    # the process part is already held (and not counted as available)
    mine = (socket.gethostname(), plan.to_allocate(), available_host_bytes(),
            plan.total("device"), torch.cuda.mem_get_info()[0] if on_gpu else 0)
    everyone = all_gather_objects(mine)
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
    """What to change: each line's own advice (the table's rows, the index, ...), then what always helps."""
    options = [line.advice for line in plan.resident + plan.phases if line.advice]
    options.append("a smaller encoder.dim (the table's width)")
    options.append("more ranks on more hosts (each holds 1/W of the table)")
    return "To fit: " + ", ".join(options) + "."


@dataclass
class HostFit:
    """A host's share of a run: the plans of its ranks side by side (this process's own part once), against the
    memory the host has available (None: planned for another machine)."""

    ranks: int
    need: int  # host bytes
    available: int | None
    device: int | None  # bytes each GPU holds, when planned for GPUs

    @classmethod
    def of(cls, plan: MemoryPlan, world_size: int, ranks_per_host: int, held: int, on_gpu: bool,
           this_host: bool) -> "HostFit":
        ranks = min(ranks_per_host, world_size)
        return cls(ranks, ranks * plan.to_allocate() + held, available_host_bytes() + held if this_host else None,
                   plan.total("device") if on_gpu else None)

    @property
    def fits(self) -> bool:
        return self.available is None or self.need <= self.available

    def format(self) -> str:
        gpu = f"; each GPU: {self.device / GiB:.2f} GiB" if self.device is not None else ""
        if self.available is None:
            return f"a host: {self.ranks} rank(s) x plan = {self.need / GiB:.2f} GiB{gpu}"
        return (f"this host: {self.ranks} rank(s) x plan = {self.need / GiB:.2f} GiB of {self.available / GiB:.2f} "
                f"GiB available: " + ("fits" if self.fits else "does NOT fit") + gpu)
