"""Optimizer of the ISDA recipe (released code: configs/isda/isda_r50_3x_coco.py, `optimizer`
and `optimizer_config`): AdamW, lr x0.1 for parameters whose name contains
SOLVER.LR_MULTIPLIER_NAMES, and gradient clipping by the norm over the *whole* model."""

from __future__ import annotations

from typing import Type

import torch
from detectron2.solver import get_default_optimizer_params
from detectron2.solver.build import maybe_add_gradient_clipping


def lr_factor_by_name(names, factor: float):
    """-> function(parameter name) -> lr factor, for ``get_default_optimizer_params``."""
    return lambda name: factor if any(key in name for key in names) else 1.0


def with_full_model_grad_clip(
    optim_cls: Type[torch.optim.Optimizer], max_norm: float, norm_type: float
):
    """Subclass of ``optim_cls`` whose step() first clips the global gradient norm of all its params.

    Detectron2's own SOLVER.CLIP_GRADIENTS clips each parameter separately, which is not the recipe.
    Under AMP the GradScaler unscales before calling step(), so the clip sees true gradients.
    """

    class FullModelGradClip(optim_cls):
        def step(self, closure=None):
            params = [p for group in self.param_groups for p in group["params"]]
            foreach = self.defaults.get("foreach")  # the same choice as the update itself
            torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, foreach=foreach)
            return super().step(closure=closure)

    FullModelGradClip.__name__ = optim_cls.__name__ + "WithFullModelGradClip"
    return FullModelGradClip


def build_isda_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        lr_factor_func=lr_factor_by_name(cfg.SOLVER.LR_MULTIPLIER_NAMES, cfg.SOLVER.LR_MULTIPLIER),
    )
    # foreach: multi-tensor calls over all parameters instead of a Python loop over them. torch
    # picks it by itself only on CUDA; on CPU it takes the demo's optimizer step over 275 small
    # tensors from 63 to 42 ms (benchmarks/RESULTS.md), with identical weights.
    kwargs = {"lr": cfg.SOLVER.BASE_LR, "foreach": True}
    if cfg.SOLVER.OPTIMIZER == "ADAMW":
        optim_cls = torch.optim.AdamW
    else:
        optim_cls = torch.optim.SGD
        kwargs["momentum"] = cfg.SOLVER.MOMENTUM
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        optim_cls = with_full_model_grad_clip(optim_cls, clip.CLIP_VALUE, clip.NORM_TYPE)
    elif clip.ENABLED:  # Detectron2's per-parameter "value" / "norm" clipping
        return maybe_add_gradient_clipping(cfg, optim_cls)(params, **kwargs)
    return optim_cls(params, **kwargs)
