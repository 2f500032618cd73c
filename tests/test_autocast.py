"""Mixed precision: the model trains under autocast and the deformable attention computes in fp32."""

import torch
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Instances

from conftest import tiny_cfg
from isda.layers import msda_module


def _sample(h=96, w=128, n=2):
    inst = Instances((h, w))
    inst.gt_classes = torch.tensor([0, 3])[:n]
    masks = torch.zeros(n, h, w, dtype=torch.bool)
    masks[0, 10:50, 20:60] = True
    masks[1:, 40:90, 70:120] = True
    inst.gt_masks = BitMasks(masks)
    return {"image": torch.randint(0, 256, (3, h, w), dtype=torch.uint8), "instances": inst}


def test_training_step_under_bf16_autocast_keeps_attention_in_fp32(monkeypatch):
    out_dtypes = []
    real_op = msda_module.ms_deform_attn

    def spy(*args, **kwargs):  # the real op, recording what it returns
        out = real_op(*args, **kwargs)
        out_dtypes.append(out.dtype)
        return out

    monkeypatch.setattr(msda_module, "ms_deform_attn", spy)
    torch.manual_seed(0)
    model = build_model(tiny_cfg()).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model([_sample(), _sample()])
    total = sum(losses.values())
    total.backward()
    assert torch.isfinite(total)
    assert out_dtypes and all(d == torch.float32 for d in out_dtypes)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
