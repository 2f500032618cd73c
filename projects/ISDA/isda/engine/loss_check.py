"""A training hook that stops on a non-finite loss term, naming the term and the iteration.

Detectron2 checks only the sum of the losses, on the main process, every ``gather_metric_period``
iterations, and prints the whole dict. This hook checks every term, in every process, at every
iteration, right after the forward pass: neither the backward pass nor the optimizer step sees a
non-finite loss, so the weights (and every later checkpoint) never absorb a NaN.

It reads the loss dict where Detectron2's ``SimpleTrainer.run_step`` says to ("if you want to do
something with the losses, you can wrap the model"), with a forward hook on the trained model, so
the model and its state-dict keys stay as they are. (``HookBase.after_backward`` would be the other
place, but ``DefaultTrainer`` does not pass it on to its hooks.)
"""

from __future__ import annotations

from typing import Mapping

import torch
from detectron2.engine import HookBase

__all__ = ["FiniteLossCheck", "check_finite_losses"]


def check_finite_losses(loss_dict: Mapping[str, torch.Tensor], iteration: int) -> None:
    """Raises FloatingPointError naming each non-finite loss term and the iteration.

    Args:
        loss_dict: loss name -> scalar tensor (any device and dtype).
    """
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


class FiniteLossCheck(HookBase):
    """Runs :func:`check_finite_losses` on each training step's loss dict, right after the forward
    pass (see module docstring)."""

    def __init__(self):
        self._handle = None

    def before_train(self):
        self._handle = self.trainer.model.register_forward_hook(self._check)

    def after_train(self):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _check(self, module, inputs, output):
        # Evaluation hooks run the same model in eval mode; only training outputs are losses.
        if module.training and isinstance(output, Mapping):
            check_finite_losses(output, self.trainer.iter)
