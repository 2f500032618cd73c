"""The optimizer of the recipe (isda.solver): lr by parameter name, full-model gradient clipping,
and multi-tensor updates that give the same weights as torch's per-tensor loop."""

import copy

import pytest
import torch
from detectron2.config import get_cfg
from torch import nn

from isda import add_isda_config
from isda.solver import build_isda_optimizer


class TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)


def solver_cfg(optimizer="ADAMW", clip=1.0):
    cfg = get_cfg()
    add_isda_config(cfg)
    cfg.SOLVER.OPTIMIZER = optimizer
    cfg.SOLVER.BASE_LR = 0.5
    cfg.SOLVER.MOMENTUM = 0.0
    cfg.SOLVER.WEIGHT_DECAY = 0.0
    cfg.SOLVER.LR_MULTIPLIER_NAMES = ["backbone"]
    cfg.SOLVER.LR_MULTIPLIER = 0.1
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = clip
    cfg.SOLVER.CLIP_GRADIENTS.NORM_TYPE = 2.0
    return cfg


def set_grads(model, seed):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def test_sgd_step_clips_by_the_norm_over_the_whole_model_and_scales_lr_by_name():
    torch.manual_seed(0)
    model = TinyModel()
    before = copy.deepcopy(model)
    set_grads(model, seed=1)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    total_norm = torch.cat([g.flatten() for g in grads.values()]).norm()
    assert total_norm > 1.0  # so that the clip acts
    build_isda_optimizer(solver_cfg("SGD", clip=1.0), model).step()
    for (name, p), p0 in zip(model.named_parameters(), before.parameters()):
        lr = 0.5 * (0.1 if name.startswith("backbone") else 1.0)
        # One factor for every tensor: max_norm / global norm (torch adds 1e-6 to the norm).
        expected = p0 - lr * grads[name] * (1.0 / (total_norm + 1e-6))
        torch.testing.assert_close(p.detach(), expected.detach(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("optimizer", ["ADAMW", "SGD"])
def test_multi_tensor_updates_equal_the_per_tensor_loop(optimizer):
    torch.manual_seed(0)
    models = [TinyModel(), None]
    models[1] = copy.deepcopy(models[0])
    optimizers = [build_isda_optimizer(solver_cfg(optimizer), m) for m in models]
    assert optimizers[0].defaults["foreach"] is True  # the project's choice, also on CPU
    optimizers[1].defaults["foreach"] = False  # torch's own CPU default, for the clip ...
    for group in optimizers[1].param_groups:
        group["foreach"] = False  # ... and for the update
    for step in range(3):
        for model, opt in zip(models, optimizers):
            set_grads(model, seed=step)
            opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)
