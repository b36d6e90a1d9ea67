"""Stop training on a non-finite loss or gradient before it reaches an optimiser step or a checkpoint: on
CPU each step is checked before the optimiser step; on CUDA the checks are queued and read every
``check_every`` steps and before every checkpoint."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss or gradient; the message names the phase, step and batch."""


class FiniteGuard:
    def __init__(self, phase: str, check_every: int = 20):
        self.phase = phase
        self.check_every = check_every
        self._pending: List[Tuple[torch.Tensor, int, int, torch.Tensor]] = []
        self._optimizer, self._parameters = None, []  # the parameters of the optimizer last stepped

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, scheduler, step: int, epoch: int,
             rows: torch.Tensor) -> None:
        """zero_grad, backward, the check, then the optimiser and schedule steps."""
        if optimizer is not self._optimizer:  # listed once, not on every step
            self._optimizer = optimizer
            self._parameters = [p for group in optimizer.param_groups for p in group["params"]]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.observe(loss, self._parameters, step, epoch, rows)
        optimizer.step()
        scheduler.step()

    def observe(self, loss: torch.Tensor, parameters: Sequence[torch.nn.Parameter], step: int, epoch: int,
                rows: torch.Tensor) -> None:
        """Record the health of a step whose gradients are in ``parameters``."""
        grads = [p.grad for p in parameters if p.grad is not None]
        bad = ~torch.isfinite(loss.detach().float())
        if grads:  # a NaN or infinite entry (or a norm overflowing float32) makes the total non-finite
            bad = bad | ~torch.isfinite(torch.nn.utils.get_total_norm(grads).to(bad.device))
        if bad.device.type == "cpu":
            if bool(bad):
                self._raise(loss, step, epoch, rows)
            return
        self._pending.append((bad, step, epoch, rows.detach().cpu()))
        if len(self._pending) >= self.check_every:
            self.check()

    def check(self) -> None:
        """Read the queued checks (before a checkpoint); raises on the first bad step."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        flags = torch.stack([bad for bad, *_ in pending]).cpu()
        for flag, (_, step, epoch, rows) in zip(flags.tolist(), pending):
            if flag:
                self._raise(None, step, epoch, rows)

    def _raise(self, loss, step: int, epoch: int, rows: torch.Tensor) -> None:
        shown = rows[:8].tolist()
        more = "..." if len(rows) > 8 else ""
        what = f"loss {float(loss.detach())}" if loss is not None and not torch.isfinite(loss.detach()).all() else "loss or gradient"
        raise NonFiniteLossError(
            f"{self.phase}: non-finite {what} at step {step} (epoch {epoch}), batch rows {shown}{more}; "
            f"nothing from this step on was saved, so the last checkpoint is good. "
            f"Lower the learning rate, or set model.precision=fp32, and resume"
        )
