"""Every stage produces the shapes of the released code (neck, MFR, transformer, mask head), for
each MFR stride and each MP/KP setting."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Instances

from conftest import tiny_cfg
from isda.modeling.mask_head import MaskHead, encode_reference

B, H, W = 2, 96, 160  # the batch pads to H x W (both multiples of 32)
IMAGE_SIZES = [(96, 160), (70, 100)]


def _batch():
    return [
        {"image": torch.randint(0, 256, (3, h, w), dtype=torch.uint8), "height": h, "width": w}
        for h, w in IMAGE_SIZES
    ]


def _run(cfg):
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    images = model.preprocess_image(_batch())
    with torch.no_grad():
        pyramid = model.neck(model.backbone(images.tensor))
        logits, kernels, mfr = model.predict(images)
        out = model(_batch())
    return model, pyramid, logits, kernels, mfr, out


def _stride_opts(stride):
    feats = '["p3", "p4", "p5"]' if stride == 8 else '["p2", "p3", "p4", "p5"]'
    return ["MODEL.ISDA.MFR_STRIDE", stride, "MODEL.ISDA.MFR_IN_FEATURES", feats]


# Every MP x KP combination at stride 4, and every stride with the released code's MP/KP.
COMBOS = sorted(
    set(itertools.product((4,), ("p5_input", "none", "output"), (True, False)))
    | {(2, "p5_input", True), (8, "p5_input", True), (8, "output", False)}
)


@pytest.mark.parametrize("stride,coord,kernel_ref", COMBOS)
def test_stage_shapes_follow_the_spec(stride, coord, kernel_ref):
    cfg = tiny_cfg(
        *_stride_opts(stride), "MODEL.ISDA.MFR_COORD", coord, "MODEL.ISDA.KERNEL_REF", kernel_ref
    )
    m = cfg.MODEL.ISDA
    model, pyramid, logits, kernels, mfr, out = _run(cfg)
    C = m.HIDDEN_DIM
    for level, s in (("p2", 4), ("p3", 8), ("p4", 16), ("p5", 32)):
        assert pyramid[level].shape == (B, C, H // s, W // s)
    assert pyramid["p6"].shape == (B, C, -(-H // 64), -(-W // 64))  # ceil: 3x3 stride-2 conv of C5
    # Kernel length = MFR channels: 254 + 2 in the released code, +2 coordinate channels in "output".
    mfr_channels = m.MFR_OUT_DIM + (2 if coord == "output" else 0)
    assert mfr.shape == (B, mfr_channels, H // stride, W // stride)
    assert logits.shape == (m.DEC_LAYERS, B, m.NUM_QUERIES, m.NUM_CLASSES)
    assert kernels.shape == (m.DEC_LAYERS, B, m.NUM_QUERIES, mfr_channels)
    ffn_out = model.mask_head.kernel_branches[0][-1].out_features
    assert ffn_out == mfr_channels - (2 if kernel_ref else 0)
    for (h, w), result in zip(IMAGE_SIZES, out):
        inst = result["instances"]
        assert inst.image_size == (h, w)
        assert inst.pred_masks.shape[1:] == (h, w) and inst.pred_masks.dtype == torch.bool
        assert len(inst) == m.TEST.MAX_PER_IMAGE
        assert inst.pred_boxes.tensor.shape == (len(inst), 4)


def test_kernel_ends_with_the_encoded_reference_point():
    cfg = tiny_cfg("MODEL.ISDA.KERNEL_REF_ENCODING", "signed")
    model, _, _, kernels, _, _ = _run(cfg)
    query_pos = model.query_embedding.weight[:, : cfg.MODEL.ISDA.HIDDEN_DIM]
    ref = model.transformer.reference_points(query_pos).sigmoid()
    expected = encode_reference(ref, "signed").expand(kernels.shape[0], B, -1, -1)
    torch.testing.assert_close(kernels[..., -2:], expected)


@pytest.mark.parametrize(
    "encoding,lo,hi", [("logit", -11.6, 11.6), ("unit", 0, 1), ("signed", -1, 1)]
)
def test_reference_encodings_have_their_documented_range(encoding, lo, hi):
    r = torch.tensor([[0.0, 1.0], [0.5, 0.25]])
    code = encode_reference(r, encoding)
    assert code.min() >= lo and code.max() <= hi
    if encoding == "logit":  # inverse sigmoid, clamped at 1e-5
        torch.testing.assert_close(code[1], torch.logit(r[1]))


@pytest.mark.parametrize("depth,res2", [(18, 64), (34, 64), (50, 256)])
def test_neck_input_channels_come_from_the_backbone(depth, res2):
    cfg = tiny_cfg("MODEL.RESNETS.DEPTH", depth, "MODEL.RESNETS.RES2_OUT_CHANNELS", res2)
    model = build_model(cfg)
    expected = [res2 * 2**i for i in range(4)]
    assert [conv.in_channels for conv in model.neck.lateral] == expected


def test_three_feature_levels_drop_p6():
    cfg = tiny_cfg("MODEL.ISDA.NUM_FEATURE_LEVELS", 3)
    _, pyramid, logits, _, _, _ = _run(cfg)
    assert "p6" not in pyramid and logits.shape[0] == cfg.MODEL.ISDA.DEC_LAYERS


def test_unshared_heads_make_one_head_per_decoder_layer():
    cfg = tiny_cfg("MODEL.ISDA.SHARE_HEADS_ACROSS_LAYERS", False, "MODEL.ISDA.DEC_LAYERS", 3)
    model = build_model(cfg)
    assert len(model.mask_head.class_branches) == 3 and len(model.mask_head.kernel_branches) == 3
    shared = build_model(tiny_cfg("MODEL.ISDA.DEC_LAYERS", 3))
    assert len(shared.mask_head.class_branches) == 1


def test_masks_are_a_bias_free_1x1_convolution_of_the_mfr_with_each_kernel():
    kernels, mfr = torch.randn(2, 5, 6), torch.randn(2, 6, 4, 7)  # (B, n, E), (B, E, h, w)
    expected = torch.stack(
        [F.conv2d(f[None], k[:, :, None, None])[0] for k, f in zip(kernels, mfr)]
    )
    torch.testing.assert_close(MaskHead.mask_logits(kernels, mfr), expected)
    torch.testing.assert_close(MaskHead.mask_logits(kernels[1], mfr[1]), expected[1])  # one image


@pytest.mark.parametrize("stride", [2, 8])
def test_training_targets_follow_the_stride_of_the_mask_feature_head(stride):
    model = build_model(tiny_cfg(*_stride_opts(stride)))
    inst = Instances((70, 100), gt_classes=torch.tensor([1]))
    inst.gt_masks = BitMasks(torch.ones(1, 70, 100, dtype=torch.bool))
    targets = model.prepare_targets([{"instances": inst}], (H, W))
    assert model.mask_feature_head.stride == stride
    assert targets[0]["masks"].shape == (1, H // stride, W // stride)
