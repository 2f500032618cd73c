"""Detectron2's SimpleTrainer / AMPTrainer, stopping on a non-finite loss with the term's name.

Detectron2 checks only the sum of the losses, on the main process, every ``gather_metric_period``
iterations, and prints the whole dict. Here every process checks every term at every iteration,
before the optimizer step, so the weights (and every later checkpoint) never absorb a NaN.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
from detectron2.engine import AMPTrainer, SimpleTrainer

__all__ = ["check_finite_losses", "ISDASimpleTrainer", "ISDAAMPTrainer"]


def check_finite_losses(loss_dict: Mapping[str, torch.Tensor], iteration: int) -> None:
    """Raises FloatingPointError naming each non-finite loss term and the iteration."""
    names = sorted(loss_dict)
    if not names:
        return
    values = torch.stack([loss_dict[n].detach().float().reshape(()) for n in names])
    finite = torch.isfinite(values).tolist()  # one device sync for all terms
    if all(finite):
        return
    bad = ", ".join(f"{n}={v}" for n, v, ok in zip(names, values.tolist(), finite) if not ok)
    raise FloatingPointError(
        f"Non-finite loss at iteration {iteration}: {bad}. Training stopped before the optimizer "
        "step, so the checkpoints in OUTPUT_DIR are intact; lower SOLVER.BASE_LR or check "
        "SOLVER.CLIP_GRADIENTS and the data, then continue with --resume."
    )


class _FiniteLossMixin:
    def _write_metrics(
        self, loss_dict, data_time: float, prefix: str = "", iter: Optional[int] = None
    ) -> None:
        check_finite_losses(loss_dict, self.iter if iter is None else iter)
        super()._write_metrics(loss_dict, data_time, prefix=prefix, iter=iter)


class ISDASimpleTrainer(_FiniteLossMixin, SimpleTrainer):
    """SimpleTrainer that stops on the first non-finite loss term (see module docstring)."""


class ISDAAMPTrainer(_FiniteLossMixin, AMPTrainer):
    """AMPTrainer that stops on the first non-finite loss term (see module docstring)."""
