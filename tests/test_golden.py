"""The model's numerics are frozen: a fixed tiny model on a fixed batch gives the stored outputs.

A refactor must leave these numbers unchanged (float rounding aside); an intended numeric change
regenerates the file in a commit of its own:

    .venv/bin/python tests/test_golden.py --regenerate

The weights come from the parameters' *names* (a generator seeded by each name), not from the order
in which modules are built, so moving code between modules does not change the model under test,
while renaming a checkpoint key (which would break saved checkpoints) does.
"""

import sys
import zlib
from pathlib import Path

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Instances

from conftest import tiny_cfg

GOLDEN = Path(__file__).resolve().parent / "data" / "golden_tiny.pt"
IMAGE_SIZES = [(96, 128), (80, 112)]  # the second is padded to 96 x 128 in the batch
SGD_LR = 0.05
# Float rounding differs between CPUs and thread counts; real changes move these numbers by far more.
RTOL, ATOL = 2e-4, 2e-5
MAX_MASK_PIXEL_FLIPS = 0.002  # fraction of pixels whose thresholded value may differ
GOLDEN_THREADS = 2  # torch threads the stored outputs were computed with


def _generator(seed_text: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(seed_text.encode()))


def _init_by_name(model: torch.nn.Module) -> None:
    """Deterministic weights keyed by state-dict name: fan-in scaled normals for weights, small
    normals for biases and embeddings, near-one scales for norms; BN statistics at (0, 1)."""
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if not p.is_floating_point():
                continue
            g = _generator(name)
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if name.endswith("running_var"):
                value = torch.ones_like(noise)
            elif name.endswith("running_mean"):
                value = torch.zeros_like(noise)
            elif p.dim() >= 2:
                value = noise / p[0].numel() ** 0.5
            elif name.endswith(".weight"):  # 1-D weights are the norms' scales
                value = 1.0 + 0.1 * noise
            else:
                value = 0.02 * noise
            p.copy_(value.to(p.dtype))


def _images():
    g = _generator("images")
    return [
        torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in IMAGE_SIZES
    ]


def _instances(h, w, boxes, classes):
    masks = torch.zeros((len(boxes), h, w), dtype=torch.bool)
    for m, (x0, y0, x1, y1) in zip(masks, boxes):
        m[y0:y1, x0:x1] = True
    inst = Instances((h, w))
    inst.gt_classes = torch.tensor(classes, dtype=torch.int64)
    inst.gt_masks = BitMasks(masks)
    return inst


def _batch(with_targets: bool):
    targets = [
        ([(10, 12, 60, 50), (70, 40, 120, 90)], [1, 3]),
        ([(5, 5, 40, 70)], [0]),
    ]
    batch = []
    for img, (h, w), (boxes, classes) in zip(_images(), IMAGE_SIZES, targets):
        x = {"image": img, "height": h, "width": w}
        if with_targets:
            x["instances"] = _instances(h, w, boxes, classes)
        batch.append(x)
    return batch


def _model():
    cfg = tiny_cfg("MODEL.ISDA.DEC_LAYERS", 2)
    model = build_model(cfg)
    _init_by_name(model)
    return model


def _inference(model):
    model.eval()
    with torch.no_grad():
        outs = model(_batch(with_targets=False))
    return [
        {
            "scores": o["instances"].scores,
            "pred_classes": o["instances"].pred_classes,
            "pred_masks": o["instances"].pred_masks,
            "pred_boxes": o["instances"].pred_boxes.tensor,
        }
        for o in outs
    ]


def _training_step(model):
    """One SGD step: the losses before it, the gradient norm, the losses after it."""
    model.train()
    torch.manual_seed(0)
    losses = model(_batch(with_targets=True))
    total = sum(losses.values())
    model.zero_grad()
    total.backward()
    grad_norm = torch.norm(
        torch.stack([p.grad.double().norm() for p in model.parameters() if p.grad is not None])
    )
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= SGD_LR * p.grad
    with torch.no_grad():
        after = model(_batch(with_targets=True))
    return {
        "losses": {k: v.detach() for k, v in losses.items()},
        "grad_norm": grad_norm,
        "losses_after_step": {k: v.detach() for k, v in after.items()},
    }


def _compute():
    torch.manual_seed(0)
    model = _model()
    out = {"inference": _inference(model), "training": _training_step(model)}
    out["after_step"] = _inference(model)  # BN statistics and weights moved by the step
    return out


@pytest.fixture(scope="module")
def results():
    if not GOLDEN.is_file():
        pytest.fail(f"{GOLDEN} is missing; regenerate it with `python {__file__} --regenerate`")
    return torch.load(GOLDEN, weights_only=True), compute()


def compute():
    """The stored outputs' conditions: reductions split over GOLDEN_THREADS threads, whatever the
    machine's core count (the large training step amplifies a different summation order)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(GOLDEN_THREADS)
    try:
        return _compute()
    finally:
        torch.set_num_threads(threads)


def _assert_detections_equal(got, want, what):
    for b, (g, w) in enumerate(zip(got, want)):
        where = f"{what}, image {b}"
        torch.testing.assert_close(g["scores"], w["scores"], rtol=RTOL, atol=ATOL, msg=where)
        assert torch.equal(g["pred_classes"], w["pred_classes"]), where
        flips = (g["pred_masks"] != w["pred_masks"]).float().mean().item()
        assert flips <= MAX_MASK_PIXEL_FLIPS, f"{where}: {flips:.4%} of mask pixels differ"
        torch.testing.assert_close(g["pred_boxes"], w["pred_boxes"], rtol=0, atol=1.0, msg=where)


def test_inference_matches_the_stored_outputs(results):
    want, got = results
    _assert_detections_equal(got["inference"], want["inference"], "inference")


def test_training_step_matches_the_stored_losses_and_gradient(results):
    want, got = results
    for key in ("losses", "losses_after_step"):
        assert got["training"][key].keys() == want["training"][key].keys()
        for name, value in want["training"][key].items():
            torch.testing.assert_close(
                got["training"][key][name], value, rtol=RTOL, atol=ATOL, msg=f"{key}[{name}]"
            )
    torch.testing.assert_close(
        got["training"]["grad_norm"], want["training"]["grad_norm"], rtol=RTOL, atol=ATOL
    )


def test_inference_after_the_training_step_matches(results):
    want, got = results
    _assert_detections_equal(got["after_step"], want["after_step"], "after one step")


def test_the_golden_model_detects_something(results):
    """Guards the golden file itself: an all-empty output would make the comparisons vacuous."""
    want, _ = results
    for image in want["inference"]:
        assert image["scores"].numel() > 0 and image["pred_masks"].any()
    assert all(v > 0 for v in want["training"]["losses"].values())


if __name__ == "__main__":
    if sys.argv[1:] != ["--regenerate"]:
        sys.exit(f"usage: python {sys.argv[0]} --regenerate")
    GOLDEN.parent.mkdir(exist_ok=True)
    torch.save(compute(), GOLDEN)
    print(f"wrote {GOLDEN}")
