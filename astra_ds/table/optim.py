"""Row-sparse optimizers: only the rows of a step are read, updated and written back.

State lives in host tensors indexed by local row; `step` receives the rows' current weights and gradients on
the compute device and returns the new weights. Formulas follow torch.optim exactly, per row:
- rowwise_adagrad: one accumulator a row, G += mean(g^2); w -= lr * g / (sqrt(G) + eps)
  (torch.optim.Adagrad when d = 1; FBGEMM's EXACT_ROWWISE_ADAGRAD).
- lazy_adam: torch.optim.Adam applied to a row on the steps that touch it (a per-row step count drives the
  bias correction).
- lazy_sgd: torch.optim.SGD with momentum (table.momentum) applied to a row on the steps that touch it (Renée
  trains its classifier rows so).
"""

from __future__ import annotations

import torch

from astra_ds.config import TableConfig
from astra_ds.table.host_memory import host_zeros


class RowSparseOptimizer:
    def __init__(self, num_rows: int, dim: int, cfg: TableConfig, pin: bool):
        self.lr, self.eps = cfg.lr, cfg.eps
        self.state = {name: host_zeros((num_rows, *shape), dtype, pin)
                      for name, (shape, dtype) in self.state_layout(dim).items()}

    @staticmethod
    def state_layout(dim: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        raise NotImplementedError

    def _gather(self, local_rows: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        return {name: t.index_select(0, local_rows).to(device, non_blocking=True) for name, t in self.state.items()}

    def _scatter(self, local_rows: torch.Tensor, values: dict[str, torch.Tensor]) -> None:
        for name, value in values.items():
            self.state[name].index_copy_(0, local_rows, value.to("cpu"))

    def step(self, local_rows: torch.Tensor, weights: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """New weights of `local_rows` (unique) from their weights and gradients (both on the device)."""
        state = self._gather(local_rows, weights.device)
        new_weights = self._update(weights, grads, state)
        self._scatter(local_rows, state)
        return new_weights

    def _update(self, weights, grads, state) -> torch.Tensor:
        raise NotImplementedError


class RowwiseAdagrad(RowSparseOptimizer):
    @staticmethod
    def state_layout(dim):
        return {"sum": ((), torch.float32)}

    def _update(self, weights, grads, state):
        # mean(g^2) as ||g||^2 / d and one fused multiply-add: two passes over the (U, d) block, not five
        state["sum"] += torch.linalg.vector_norm(grads.float(), dim=1).square_() / grads.shape[1]
        step = (state["sum"].sqrt() + self.eps).reciprocal_().mul_(-self.lr)
        return torch.addcmul(weights, grads, step.unsqueeze(1))


class LazyAdam(RowSparseOptimizer):
    def __init__(self, num_rows: int, dim: int, cfg: TableConfig, pin: bool):
        super().__init__(num_rows, dim, cfg, pin)
        self.beta1, self.beta2 = cfg.betas

    @staticmethod
    def state_layout(dim):
        return {"exp_avg": ((dim,), torch.float32), "exp_avg_sq": ((dim,), torch.float32), "step": ((), torch.int32)}

    def _update(self, weights, grads, state):
        state["step"] += 1
        step = state["step"].double()
        state["exp_avg"].lerp_(grads, 1 - self.beta1)
        state["exp_avg_sq"].mul_(self.beta2).addcmul_(grads, grads, value=1 - self.beta2)
        bias_correction1 = (1 - self.beta1 ** step).float().unsqueeze(1)
        bias_correction2_sqrt = (1 - self.beta2 ** step).sqrt().float().unsqueeze(1)
        denom = state["exp_avg_sq"].sqrt() / bias_correction2_sqrt + self.eps
        return weights - (self.lr / bias_correction1) * state["exp_avg"] / denom


class LazySGD(RowSparseOptimizer):
    def __init__(self, num_rows: int, dim: int, cfg: TableConfig, pin: bool):
        super().__init__(num_rows, dim, cfg, pin)
        self.momentum = cfg.momentum

    @staticmethod
    def state_layout(dim):
        return {"momentum_buffer": ((dim,), torch.float32)}

    def _update(self, weights, grads, state):
        # torch.optim.SGD (no dampening): the buffer starts as the first gradient, which a zero buffer gives too
        state["momentum_buffer"].mul_(self.momentum).add_(grads)
        return weights - self.lr * state["momentum_buffer"]
