#!/usr/bin/env python
"""Export a trained ISDA to TorchScript, ONNX or torch.export, and verify it against eager PyTorch.

Writes OUTPUT/<artifact> and OUTPUT/<artifact>.json (the sidecar: input contract, pixel mean/std,
channel order, class names, k, op implementation, library versions, verification result). The
artifact is run on a padded batch at the export size and at two other sizes (one with the other
aspect ratio), on --sample-image files when given, and compared with eager PyTorch: same classes,
scores within 1e-4, mask IoU >= 0.99 per detection. Any mismatch exits with status 1.

Examples:
    python tools/export_model.py \
        --config-file configs/COCO-InstanceSegmentation/isda_R_50_12ep.yaml \
        --format onnx --dynamic --output export/onnx --sample-image a.jpg MODEL.WEIGHTS model.pth
    python tools/export_model.py --config-file CFG --format onnx --output export/onnx --verify-only
Trailing ``KEY VALUE`` pairs override the config, as with train_net.py.
"""

import argparse
import json
import logging
import os
import sys

import torch
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model

import isda.data  # noqa: F401  (registers the synthetic datasets' metadata)
from isda import add_isda_config
from isda.engine import load_inference_weights
from isda.export import ISDAExportModule
from isda.export.formats import FORMATS, block_size, pad_canvas, takes_blocks
from isda.export.inputs import load_images, make_batch
from isda.export.sidecar import describe
from isda.export.verify import verification_sizes, verify
from isda.weights import WeightsError

logger = logging.getLogger("isda.export")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config-file", required=True, metavar="FILE")
    p.add_argument("--format", required=True, choices=sorted(FORMATS))
    p.add_argument("--output", required=True, metavar="DIR", help="folder for artifact + sidecar")
    p.add_argument(
        "--dynamic",
        action="store_true",
        help="symbolic batch, height and width (ONNX dynamic axes; torch_export: Dims on a canvas taken as 64-px blocks, see README 'Deployment')",
    )
    p.add_argument(
        "--size",
        nargs=2,
        type=int,
        metavar=("H", "W"),
        help="export size, multiples of 32 (default: INPUT.MIN_SIZE_TEST x MAX_SIZE_TEST, rounded)",
    )
    p.add_argument(
        "--sample-image",
        action="append",
        default=[],
        metavar="FILE",
        help="an image to verify on (repeat the flag for several); default: random pixels",
    )
    p.add_argument(
        "--verify-only",
        action="store_true",
        help="verify the artifact already in --output against eager, without exporting",
    )
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return p.parse_args(argv)


def setup_cfg(args):
    cfg = get_cfg()
    add_isda_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    return cfg


def export_size(args, cfg, divisor: int):
    if args.size:
        h, w = args.size
        if h % divisor or w % divisor or h <= 0 or w <= 0:
            raise SystemExit(f"--size {h} {w}: both must be positive multiples of {divisor}")
        return h, w
    short = cfg.INPUT.MIN_SIZE_TEST
    return (-(-short // divisor) * divisor, -(-cfg.INPUT.MAX_SIZE_TEST // divisor) * divisor)


def class_names(cfg):
    n = cfg.MODEL.ISDA.NUM_CLASSES
    names = (
        MetadataCatalog.get(cfg.DATASETS.TEST[0]).get("thing_classes", None)
        if cfg.DATASETS.TEST
        else None
    )
    return list(names) if names and len(names) == n else [f"class_{i}" for i in range(n)]


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    cfg = setup_cfg(args)
    model = build_model(cfg).eval()
    try:
        load_inference_weights(model, cfg)
    except WeightsError as e:
        logger.error("error: %s", e)
        return 2
    module = ISDAExportModule(model)
    fmt = FORMATS[args.format]
    size = export_size(args, cfg, model.size_divisibility)
    sources = load_images(args.sample_image, cfg.INPUT.FORMAT)
    # A fixed-shape graph takes one image of the export size; a dynamic one, padded batches.
    batch = 2 if args.dynamic or fmt.name == "torchscript" else 1
    sizes = verification_sizes(*size) if batch > 1 else [size]

    os.makedirs(args.output, exist_ok=True)
    path = os.path.join(args.output, fmt.filename)
    if not args.verify_only:
        images, image_sizes = make_batch(model, size, sources, batch)
        logger.info("Exporting %s at %s to %s ...", fmt.name, list(images.shape), path)
        fmt.export(
            module, (torch.from_numpy(images), torch.from_numpy(image_sizes)), path, args.dynamic
        )
    elif not os.path.isfile(path):
        raise SystemExit(f"--verify-only: no artifact at {path}")

    batches = [(f"{h}x{w}", *make_batch(model, (h, w), sources, batch)) for h, w in sizes]
    if takes_blocks(fmt.name, args.dynamic):  # the program's canvas: multiples of its block
        block = block_size(model)
        batches = [(n, pad_canvas(torch.from_numpy(im), block).numpy(), s) for n, im, s in batches]
    result = verify(module, fmt.load(path), batches)
    sidecar = describe(cfg, module, fmt, class_names(cfg), size, args.dynamic, result)
    with open(path + ".json", "w") as f:
        json.dump(sidecar, f, indent=2)
    for check in result["checks"]:
        logger.info("verify %s", json.dumps(check))
    if not result["passed"]:
        logger.error(
            "VERIFICATION FAILED: %s does not match eager PyTorch (see %s.json)", path, path
        )
        return 1
    logger.info(
        "Verified %s at %s; sidecar %s.json", path, [c["name"] for c in result["checks"]], path
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
