"""MODEL.ISDA.ACTIVATION_CHECKPOINTING: transformer layers recompute their forward in the backward,
with the same losses and gradients, alone and under DDP (two gloo processes)."""

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Instances

from conftest import TINY_CONFIG, run_train_net, tiny_cfg


def _sample(h, w, seed):
    g = torch.Generator().manual_seed(seed)
    inst = Instances((h, w))
    inst.gt_classes = torch.tensor([1, 4])
    masks = torch.zeros(2, h, w, dtype=torch.bool)
    masks[0, 10:60, 20:70] = True
    masks[1, 50:90, 60:120] = True
    inst.gt_masks = BitMasks(masks)
    image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
    return {"image": image, "instances": inst}


def _losses_and_grads(mode, state_dict):
    """One training forward + backward of the tiny model (dropout on, two layers each) in ``mode``.

    Returns the losses, the gradients by name, and how often each transformer layer ran forward."""
    cfg = tiny_cfg(
        "MODEL.ISDA.ACTIVATION_CHECKPOINTING",
        mode,
        "MODEL.ISDA.DROPOUT",
        0.1,
        "MODEL.ISDA.ENC_LAYERS",
        2,
    )
    model = build_model(cfg).train()
    if state_dict is not None:
        model.load_state_dict(state_dict)
    calls = {"encoder": 0, "decoder": 0}
    for part in calls:
        for layer in getattr(model.transformer, part):
            # A pre-hook: the recomputation stops early, once it has rebuilt what the backward needs.
            layer.register_forward_pre_hook(lambda *_, p=part: calls.__setitem__(p, calls[p] + 1))
    torch.manual_seed(123)  # the dropout masks
    losses = model([_sample(96, 128, 0), _sample(80, 112, 1)])  # the second one is padded
    sum(losses.values()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return model.state_dict(), {k: v.detach() for k, v in losses.items()}, grads, calls


def test_checkpointed_layers_recompute_and_give_the_same_losses_and_gradients():
    torch.manual_seed(0)
    state, ref_losses, ref_grads, ref_calls = _losses_and_grads("none", None)
    assert ref_calls == {"encoder": 2, "decoder": 2}
    for mode, recomputed in (
        ("encoder", {"encoder": 4, "decoder": 2}),
        ("encoder_decoder", {"encoder": 4, "decoder": 4}),
    ):
        _, losses, grads, calls = _losses_and_grads(mode, state)
        assert calls == recomputed, mode  # each checkpointed layer ran again in the backward
        torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6)
        assert grads.keys() == ref_grads.keys()
        for name in ref_grads:
            torch.testing.assert_close(
                grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=f"{mode}: {name}"
            )


def test_checkpointing_is_off_in_inference():
    model = build_model(tiny_cfg("MODEL.ISDA.ACTIVATION_CHECKPOINTING", "encoder_decoder")).eval()
    calls = []
    model.transformer.encoder[0].register_forward_pre_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        out = model([_sample(96, 128, 0)])
    assert len(calls) == 1 and len(out[0]["instances"]) > 0


def test_unknown_checkpointing_mode_is_rejected_naming_the_key():
    with pytest.raises(ValueError, match="MODEL.ISDA.ACTIVATION_CHECKPOINTING"):
        build_model(tiny_cfg("MODEL.ISDA.ACTIVATION_CHECKPOINTING", "decoder"))


def test_two_gloo_processes_train_with_checkpointing(tiny_data_root, tmp_path):
    """DDP's gradient hooks fire once per parameter although each layer runs forward twice."""
    overrides = {
        "MODEL.ISDA.ACTIVATION_CHECKPOINTING": "encoder_decoder",
        "MODEL.ISDA.NUM_QUERIES": 10,
        "INPUT.MIN_SIZE_TRAIN": "(96,)",
        "OUTPUT_DIR": tmp_path,
        "SOLVER.MAX_ITER": 2,
        "SOLVER.IMS_PER_BATCH": 2,
        "TEST.EVAL_PERIOD": 0,
        "DATASETS.TEST": "()",
    }
    args = [x for item in overrides.items() for x in item]
    proc = run_train_net("--config-file", TINY_CONFIG, "--num-gpus", 2, *args)
    assert "World size: 2" in proc.stdout + proc.stderr
    assert (tmp_path / "model_final.pth").is_file()
