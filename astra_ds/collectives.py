"""The collectives a step and an evaluation need across ranks; each is the identity with one rank (or without a
process group: a single process, a served model). They ask the process group for their own rank; everything
else asks the DistInfo of astra_ds/dist.py, or the component that was built with it.

Under W ranks each rank encodes 1/W of the global batch, while the table is split by rows: the query embeddings
are all-gathered so that every rank scores all queries against the labels it owns. The batch loss is the *sum*
of the ranks' partial losses, but DeepSpeed averages encoder gradients over ranks (divides by W), so the
gradients that flow back into the encoder are multiplied by W on the way (`gather_rows`, `scale_grad`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist


def merge_topk(scores: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k along dim 1 of candidate (scores, ids)."""
    top = scores.topk(min(k, scores.shape[1]), dim=1)
    return top.values, ids.gather(1, top.indices)


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def padded_part(count: int) -> np.ndarray:
    """The positions of `count` items that this rank works on: a contiguous 1/W of them, padded with the last item
    so that every rank has as many (a gather needs equal shapes; ZeRO-3 needs every rank in every forward)."""
    per_rank = -(-count // _world_size())
    return np.minimum(np.arange(_rank() * per_rank, (_rank() + 1) * per_rank), count - 1)


def all_gather_objects(value) -> list:
    """Every rank's picklable `value`, in rank order."""
    if _world_size() == 1:
        return [value]
    everyone = [None] * _world_size()
    dist.all_gather_object(everyone, value)
    return everyone


def barrier() -> None:
    if _world_size() > 1:
        dist.barrier()


def computed_on_main(compute, length: int) -> np.ndarray:
    """`compute()` (an int64 array of `length` values) run on rank 0 only, its result on every rank."""
    if _world_size() == 1:
        return compute()
    tensor = torch.from_numpy(compute()) if _rank() == 0 else torch.empty(length, dtype=torch.int64)
    dist.broadcast(tensor, src=0)
    return tensor.numpy()


def all_gather_cat(local: torch.Tensor) -> torch.Tensor:
    """Every rank's `local` (same shape on all ranks) concatenated along dim 0, in rank order."""
    if _world_size() == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(_world_size())]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local: torch.Tensor, grad_scale: float) -> torch.Tensor:
        ctx.grad_scale, ctx.rows = grad_scale, local.shape[0]
        return all_gather_cat(local)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # every rank's loss depends on every query
        start = _rank() * ctx.rows
        return grad[start:start + ctx.rows] * ctx.grad_scale, None


def gather_rows(local: torch.Tensor, grad_scale: float) -> torch.Tensor:
    """All ranks' rows (W * n, ...) from this rank's (n, ...), differentiable: the backward sums all ranks'
    gradients for this rank's rows and multiplies them by `grad_scale`."""
    return local if _world_size() == 1 else _GatherRows.apply(local, grad_scale)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """The identity, with its gradient multiplied by `factor`."""
    return x if factor == 1 else _ScaleGrad.apply(x, factor)


class _LogSumExpAcrossRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local: torch.Tensor) -> torch.Tensor:
        total = torch.logsumexp(all_gather_cat(local[None]), dim=0)  # (W, ...) -> (...)
        ctx.save_for_backward(local, total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        local, total = ctx.saved_tensors
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # every rank's loss depends on the total
        share = torch.where(torch.isfinite(local), (local - total).exp(), torch.zeros_like(local))
        return grad * share


def logsumexp_across_ranks(local: torch.Tensor) -> torch.Tensor:
    """log sum over ranks of e^local, elementwise, differentiable: the backward gives each rank's `local` the
    gradient of the sum of all ranks' losses (each rank's loss a function of the total)."""
    return local if _world_size() == 1 else _LogSumExpAcrossRanks.apply(local)


def sum_across_ranks(values: list[float]) -> list[float]:
    if _world_size() == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.tolist()


def sum_tensor_across_ranks(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The elementwise sum over ranks of `tensor` (reduced on `device`, the process group's), on the CPU."""
    if _world_size() == 1:
        return tensor
    reduced = tensor.to(device)
    dist.all_reduce(reduced)
    return reduced.cpu()


def min_across_ranks(value: float) -> float:
    if _world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return float(tensor)


def global_topk(scores: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k over all ranks of each rank's top-k (scores, global ids), (N, k) each; padding ids (-1) should
    carry -inf (or very low) scores."""
    if _world_size() == 1:
        return scores, ids
    missing = k - scores.shape[1]  # a rank with fewer than k rows
    if missing > 0:
        scores = torch.cat([scores, torch.full((len(scores), missing), float("-inf"), dtype=scores.dtype)], 1)
        ids = torch.cat([ids, torch.full((len(ids), missing), -1, dtype=ids.dtype)], 1)
    all_scores = all_gather_cat(scores.unsqueeze(0))  # (W, N, k)
    all_ids = all_gather_cat(ids.unsqueeze(0))
    return merge_topk(torch.cat(list(all_scores), 1), torch.cat(list(all_ids), 1), k)


def global_topk_numpy(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    merged_scores, merged_ids = global_topk(torch.from_numpy(scores), torch.from_numpy(ids), k)
    return merged_scores.numpy(), merged_ids.numpy()
