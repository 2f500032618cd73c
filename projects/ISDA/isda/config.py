"""Configuration keys of ISDA and their validation. Defaults reproduce the authors' released code
(configs/isda/isda_r50_3x_coco.py).

The set of values a key accepts belongs to the module that implements them (e.g. the MFR strides to
the mask feature head); this file reads those sets, so each key is checked here, once, by name.
"""

from detectron2.config import CfgNode as CN

from .layers.msda_dispatch import IMPLS as MSDA_IMPLS
from .modeling.criterion import GT_DOWNSAMPLE_MODES, MASK_LOSSES
from .modeling.deformable_transformer import CHECKPOINT_MODES as ACTIVATION_CHECKPOINTING_MODES
from .modeling.mask_feature_head import COORD_MODES as MFR_COORD_MODES
from .modeling.mask_feature_head import STRIDES as MFR_STRIDES
from .modeling.mask_feature_head import fusion_stride
from .modeling.mask_head import REF_ENCODINGS as KERNEL_REF_ENCODINGS
from .modeling.meta_arch import TEST_DTYPES
from .modeling.neck import LEVEL_STRIDES as NECK_LEVELS

# Deepest encoder/decoder that is built and trained in tests (tests/test_reliability_inference.py).
# Deeper stacks are untested, and the usual cause of e.g. DEC_LAYERS 60 is a typo for 6 that would
# otherwise surface only as an out-of-memory error hours into a run.
MAX_TRANSFORMER_LAYERS = 12


def add_isda_config(cfg):
    """Adds MODEL.ISDA.*, the ISDA input augmentation and solver keys to a Detectron2 config."""
    cfg.MODEL.ISDA = CN()
    m = cfg.MODEL.ISDA
    m.NUM_CLASSES = 80  # K: foreground classes (sigmoid/focal, no background logit)
    m.IN_FEATURES = ["res2", "res3", "res4", "res5"]  # backbone outputs C2..C5 fed to the neck
    m.HIDDEN_DIM = 256  # d_model: width of the neck, transformer and queries
    m.NUM_QUERIES = 300  # number of object queries
    m.ENC_LAYERS = 6  # deformable encoder layers
    m.DEC_LAYERS = 6  # deformable decoder layers (each one predicts classes, kernels and masks)
    m.NHEADS = 8  # attention heads M
    m.DIM_FEEDFORWARD = 1024  # FFN hidden width
    m.DROPOUT = 0.1  # dropout in attention outputs and FFNs
    m.ENC_N_POINTS = 4  # sampling points P per head and level, encoder
    m.DEC_N_POINTS = 4  # sampling points P per head and level, decoder cross-attention
    m.NUM_FEATURE_LEVELS = 4  # transformer levels: 4 = P3..P6 (P6 from C5), 3 = P3..P5
    m.POS_ENC_OFFSET = -0.5  # offset added to the cumulative sine-encoding coordinate (0.0 = DETR)
    m.WITH_BOX_REFINE = False  # Deformable-DETR box refinement: needs a box branch; must stay False
    m.TWO_STAGE = False  # Deformable-DETR two-stage proposals: needs a box branch; must stay False
    m.MSDA_IMPL = ""  # deformable-attention op: "" automatic, or "reference" / "cpu" / "cuda"
    m.CHANNELS_LAST = True  # convolutions in channels-last memory (faster oneDNN/cuDNN kernels)
    m.ACTIVATION_CHECKPOINTING = "none"  # recompute in backward: "encoder", "encoder_decoder"

    m.MFR_STRIDE = 4  # stride of the mask feature representation F (paper Table 1: 8, 4, 2)
    m.MFR_IN_FEATURES = ["p2", "p3", "p4", "p5"]  # neck levels fused into F
    m.MFR_INNER_DIM = 128  # width inside the mask feature head
    m.MFR_OUT_DIM = 256  # channels of F = kernel length (+2 coordinate channels with "output")
    m.MFR_COORD = "p5_input"  # MP: "p5_input" (released code), "none", "output" (coords on F)

    m.KERNEL_REF = True  # KP: kernel = FFN output (MFR_OUT_DIM - 2) ++ encoded reference point (2)
    m.KERNEL_REF_ENCODING = "logit"  # r in the kernel: "logit", "unit" [0,1], "signed" [-1,1]
    m.KERNEL_REF_DETACH = False  # stop the mask loss from moving the reference points
    m.KERNEL_FFN_LAYERS = 2  # hidden Linear+ReLU layers of the kernel FFN before its output layer
    m.SHARE_HEADS_ACROSS_LAYERS = True  # one class FFN and one kernel FFN for all decoder layers
    m.DEEP_SUPERVISION = True  # supervise every decoder layer, equal weights (else the last only)

    m.CLASS_WEIGHT = 2.0  # lambda_cls, focal loss weight (paper: 1.0)
    m.MASK_WEIGHT = 3.0  # lambda_mask, mask loss weight
    m.MASK_BCE_WEIGHT = 0.0  # weight of a per-pixel BCE on the matched masks (0: off, as released)
    m.MASK_LOSS = "dice"  # "dice" (squared V-Net dice, code) or "iou" (soft 1 - IoU, paper)
    m.FOCAL_ALPHA = 0.25  # focal loss / cost alpha
    m.FOCAL_GAMMA = 2.0  # focal loss / cost gamma
    m.COST_CLASS = 2.0  # matching weight of the focal class cost
    m.COST_MASK = 3.0  # matching weight of the soft mask-IoU cost
    m.GT_DOWNSAMPLE = "bilinear"  # GT masks to F's resolution: "bilinear" (soft, code) or "nearest"

    m.TEST = CN()
    m.TEST.MAX_PER_IMAGE = 100  # top-k over the query x class scores
    m.TEST.MASK_THRESHOLD = 0.5  # binarisation threshold of mask probabilities
    m.TEST.MASKNESS = True  # rescore by the mean probability inside the binary mask (SOLOv2)
    m.TEST.SCORE_THRESHOLD = 0.0  # drop detections scoring below this (0 keeps all for COCO AP)
    m.TEST.DTYPE = "float32"  # inference autocast: "float32" (off), "bfloat16", "float16" (CUDA)
    # Inference (eval mode) on weights that leave tensors unloaded: refused unless True (isda.weights)
    m.ALLOW_INCOMPLETE_WEIGHTS = False

    # Training augmentation (DETR recipe, the released config's train_pipeline): with probability
    # 1/2 the image is first resized (short side from CROP_PRE_RESIZE) and cropped (INPUT.CROP),
    # then resized as usual.
    cfg.INPUT.ISDA = CN()
    cfg.INPUT.ISDA.CROP_PRE_RESIZE = [400, 500, 600]  # short-side choices before the random crop
    cfg.INPUT.ISDA.CROP_PRE_MAX_SIZE = 4200  # long-side limit of that first resize

    # AdamW with lr multipliers by parameter-name substring (mmcv custom_keys).
    cfg.SOLVER.OPTIMIZER = "ADAMW"  # "ADAMW" or "SGD"
    cfg.SOLVER.LR_MULTIPLIER_NAMES = ["backbone", "sampling_offsets", "reference_points"]
    cfg.SOLVER.LR_MULTIPLIER = 0.1  # lr factor of parameters whose name contains one of the above


def validate_isda_config(cfg):
    """Fails at startup, naming the key, on values that are unknown or cannot work together."""
    m = cfg.MODEL.ISDA

    def check(ok: bool, msg: str):
        if not ok:
            raise ValueError(f"Invalid ISDA config: {msg}")

    for key, allowed in (
        ("MFR_STRIDE", MFR_STRIDES),
        ("MFR_COORD", MFR_COORD_MODES),
        ("KERNEL_REF_ENCODING", KERNEL_REF_ENCODINGS),
        ("MASK_LOSS", MASK_LOSSES),
        ("GT_DOWNSAMPLE", GT_DOWNSAMPLE_MODES),
        ("MSDA_IMPL", ("", *MSDA_IMPLS)),
        ("ACTIVATION_CHECKPOINTING", ACTIVATION_CHECKPOINTING_MODES),
    ):
        check(m.get(key) in allowed, f"MODEL.ISDA.{key}={m.get(key)!r} must be one of {allowed}")
    check(
        not m.WITH_BOX_REFINE,
        "MODEL.ISDA.WITH_BOX_REFINE=True needs a box branch, which ISDA has not",
    )
    check(not m.TWO_STAGE, "MODEL.ISDA.TWO_STAGE=True needs box proposals, which ISDA has not")
    check(
        m.NUM_FEATURE_LEVELS in (3, 4),
        "MODEL.ISDA.NUM_FEATURE_LEVELS must be 3 (P3-P5) or 4 (P3-P6)",
    )
    for key in (
        "NUM_CLASSES",
        "HIDDEN_DIM",
        "NUM_QUERIES",
        "ENC_LAYERS",
        "DEC_LAYERS",
        "NHEADS",
        "DIM_FEEDFORWARD",
        "ENC_N_POINTS",
        "DEC_N_POINTS",
        "MFR_INNER_DIM",
        "MFR_OUT_DIM",
    ):
        check(
            isinstance(m.get(key), int) and m.get(key) >= 1,
            f"MODEL.ISDA.{key}={m.get(key)!r} must be an int >= 1",
        )
    check(
        m.HIDDEN_DIM % m.NHEADS == 0,
        f"MODEL.ISDA.HIDDEN_DIM={m.HIDDEN_DIM} must be divisible by NHEADS={m.NHEADS}",
    )
    check(
        m.HIDDEN_DIM % 2 == 0,
        "MODEL.ISDA.HIDDEN_DIM must be even (sine encoding splits it in y and x)",
    )
    for key in ("HIDDEN_DIM", "MFR_INNER_DIM"):
        check(
            m.get(key) % 32 == 0,
            f"MODEL.ISDA.{key}={m.get(key)} must be a multiple of 32 (GroupNorm(32))",
        )
    check(
        m.MFR_OUT_DIM % 32 == 0,
        f"MODEL.ISDA.MFR_OUT_DIM={m.MFR_OUT_DIM} must be a multiple of 32 (GroupNorm(32))",
    )
    check(
        m.MFR_OUT_DIM + 2 * int(m.MFR_COORD == "output") > 2 * int(m.KERNEL_REF),
        "MODEL.ISDA.MFR_OUT_DIM leaves the kernel FFN no output with KERNEL_REF=True",
    )
    check(0.0 <= m.DROPOUT < 1.0, f"MODEL.ISDA.DROPOUT={m.DROPOUT} must be in [0, 1)")
    check(m.TEST.MAX_PER_IMAGE >= 1, "MODEL.ISDA.TEST.MAX_PER_IMAGE must be >= 1")
    check(0.0 < m.TEST.MASK_THRESHOLD < 1.0, "MODEL.ISDA.TEST.MASK_THRESHOLD must be in (0, 1)")
    check(
        len(m.IN_FEATURES) == 4,
        f"MODEL.ISDA.IN_FEATURES must name 4 backbone levels, got {m.IN_FEATURES}",
    )
    check(
        cfg.SOLVER.OPTIMIZER in ("ADAMW", "SGD"),
        f"SOLVER.OPTIMIZER={cfg.SOLVER.OPTIMIZER!r} must be ADAMW or SGD",
    )
    check(
        not (cfg.SOLVER.AMP.ENABLED and cfg.MODEL.DEVICE == "cpu"),
        "SOLVER.AMP.ENABLED=True needs MODEL.DEVICE cuda (Detectron2's AMPTrainer is CUDA-only)",
    )
    _validate_test_dtype(cfg, check)
    _validate_depth_and_mfr(m, check)
    _validate_losses(m, check)
    _validate_input_and_solver(cfg, check)


def _validate_test_dtype(cfg, check) -> None:
    dtype = cfg.MODEL.ISDA.TEST.DTYPE
    check(dtype in TEST_DTYPES, f"MODEL.ISDA.TEST.DTYPE={dtype!r} must be one of {TEST_DTYPES}")
    check(
        not (dtype == "float16" and not str(cfg.MODEL.DEVICE).startswith("cuda")),
        f"MODEL.ISDA.TEST.DTYPE='float16' needs MODEL.DEVICE cuda (got {cfg.MODEL.DEVICE!r}): "
        "CPUs have no fast float16 kernels; use 'bfloat16'",
    )


def _validate_depth_and_mfr(m, check) -> None:
    for key in ("ENC_LAYERS", "DEC_LAYERS"):
        check(
            m.get(key) <= MAX_TRANSFORMER_LAYERS,
            f"MODEL.ISDA.{key}={m.get(key)} exceeds the supported maximum "
            f"{MAX_TRANSFORMER_LAYERS} (see MAX_TRANSFORMER_LAYERS in isda/config.py)",
        )
    check(
        isinstance(m.KERNEL_FFN_LAYERS, int) and m.KERNEL_FFN_LAYERS >= 0,
        f"MODEL.ISDA.KERNEL_FFN_LAYERS={m.KERNEL_FFN_LAYERS!r} must be an int >= 0",
    )
    unknown = [f for f in m.MFR_IN_FEATURES if f not in NECK_LEVELS]
    check(
        len(m.MFR_IN_FEATURES) > 0 and not unknown,
        f"MODEL.ISDA.MFR_IN_FEATURES={list(m.MFR_IN_FEATURES)} must name neck levels "
        f"{list(NECK_LEVELS)}",
    )
    finest = min(NECK_LEVELS[f] for f in m.MFR_IN_FEATURES)
    fuse = fusion_stride(m.MFR_STRIDE)
    check(
        finest == fuse,
        f"MODEL.ISDA.MFR_IN_FEATURES={list(m.MFR_IN_FEATURES)} must start at stride "
        f"{fuse} for MODEL.ISDA.MFR_STRIDE={m.MFR_STRIDE} (e.g. p3..p5 for 8)",
    )


def _validate_losses(m, check) -> None:
    for key in (
        "CLASS_WEIGHT",
        "MASK_WEIGHT",
        "MASK_BCE_WEIGHT",
        "COST_CLASS",
        "COST_MASK",
        "FOCAL_GAMMA",
    ):
        check(m.get(key) >= 0, f"MODEL.ISDA.{key}={m.get(key)} must be >= 0")
    check(0.0 <= m.FOCAL_ALPHA <= 1.0, f"MODEL.ISDA.FOCAL_ALPHA={m.FOCAL_ALPHA} must be in [0, 1]")
    check(
        0.0 <= m.TEST.SCORE_THRESHOLD <= 1.0,
        f"MODEL.ISDA.TEST.SCORE_THRESHOLD={m.TEST.SCORE_THRESHOLD} must be in [0, 1]",
    )


def _validate_input_and_solver(cfg, check) -> None:
    """Keys outside MODEL.ISDA whose wrong values would fail mid-run or train on wrong data."""
    check(
        cfg.INPUT.MASK_FORMAT == "bitmask",
        f"INPUT.MASK_FORMAT={cfg.INPUT.MASK_FORMAT!r} must be 'bitmask' (ISDA's targets are masks)",
    )
    check(
        cfg.INPUT.FORMAT in ("RGB", "BGR") and len(cfg.MODEL.PIXEL_MEAN) == 3,
        f"INPUT.FORMAT={cfg.INPUT.FORMAT!r} must be RGB or BGR, with 3 MODEL.PIXEL_MEAN values",
    )
    for key in ("CHECKPOINT_PERIOD", "IMS_PER_BATCH", "MAX_ITER"):
        value = cfg.SOLVER.get(key)
        check(value >= 1, f"SOLVER.{key}={value} must be >= 1")
    check(cfg.SOLVER.LR_MULTIPLIER >= 0, "SOLVER.LR_MULTIPLIER must be >= 0")
    check(
        len(cfg.INPUT.MIN_SIZE_TRAIN) > 0 and min(cfg.INPUT.MIN_SIZE_TRAIN) >= 1,
        f"INPUT.MIN_SIZE_TRAIN={cfg.INPUT.MIN_SIZE_TRAIN} must hold sizes >= 1",
    )
    check(cfg.INPUT.MIN_SIZE_TEST >= 0, "INPUT.MIN_SIZE_TEST must be >= 0 (0 disables resizing)")
