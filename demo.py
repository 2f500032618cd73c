#!/usr/bin/env python
"""Run a trained ISDA model on image files, folders or globs and write the visualisations.

    python demo.py --config-file configs/ISDA-Demo.yaml --input photo.jpg images/ "shots/*.png" \\
        --output vis/ --confidence-threshold 0.5 MODEL.WEIGHTS output/demo/model_final.pth

Config overrides go after ``--opts`` or simply at the end as ``KEY VALUE`` pairs. A file that cannot
be read as an image is reported and skipped; the others still run, and the exit status is 1 if any
input failed (their names are listed at the end).
"""

import argparse
import glob
import logging
import os
import sys

import cv2
import torch
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor
from detectron2.utils.logger import setup_logger
from PIL import UnidentifiedImageError

import isda.data  # noqa: F401  (registers the synthetic datasets, whose metadata names classes)
from isda import add_isda_config
from isda.visualization import draw_predictions
from isda.engine import inference_weights_given
from isda.weights import WeightsError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")
logger = logging.getLogger("isda.demo")


def parse_args(argv=None):
    """Command line; ``--opts`` and any trailing ``KEY VALUE`` pairs both override the config."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config-file", required=True, metavar="FILE", help="model config")
    p.add_argument(
        "--input", nargs="+", required=True, help="image files, folders or glob patterns"
    )
    p.add_argument(
        "--output",
        default="demo_output",
        help="output folder (default: %(default)s), or a file name for a single input image",
    )
    p.add_argument("--confidence-threshold", type=float, default=0.5, help="minimum score drawn")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides")
    args, rest = p.parse_known_args(argv)
    if any(r.startswith("--") for r in rest):
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    args.opts = list(args.opts) + rest
    return args


def setup_cfg(args):
    """Config from file and overrides; falls back to CPU when CUDA is asked for but absent."""
    cfg = get_cfg()
    add_isda_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning(
            "MODEL.DEVICE=%s but CUDA is not available: running on CPU", cfg.MODEL.DEVICE
        )
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg


def expand_inputs(patterns):
    """Files named by ``patterns`` (files, folders, globs), in order; ``missing`` lists patterns
    that name nothing."""
    files, missing = [], []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = sorted(
                os.path.join(pattern, f)
                for f in os.listdir(pattern)
                if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(pattern, f))
            )
        elif os.path.isfile(pattern):
            found = [pattern]
        else:
            found = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not found:
            missing.append(pattern)
        files += found
    # A file named twice (say, by its folder and by a glob) is processed once.
    seen = set()
    files = [f for f in files if not (os.path.abspath(f) in seen or seen.add(os.path.abspath(f)))]
    return files, missing


def output_path(output, path, single, used):
    """Where the visualisation of ``path`` goes; same-named inputs from other folders get a suffix."""
    if single and os.path.splitext(output)[1].lower() in IMAGE_EXTENSIONS:
        return output
    stem = os.path.splitext(os.path.basename(path))[0]
    name, k = f"{stem}.png", 1
    while name in used:
        name, k = f"{stem}_{k}.png", k + 1
    used.add(name)
    return os.path.join(output, name)


def visualize(predictor, metadata, image_bgr, threshold):
    """Predicts and draws the instances scoring at least ``threshold`` (class name, score, box and
    contour, in the class colour; small images upscaled); returns (RGB image, count)."""
    instances = predictor(image_bgr)["instances"].to("cpu")
    instances = instances[instances.scores >= threshold]
    drawing, _ = draw_predictions(image_bgr[:, :, ::-1], instances, metadata)
    return drawing, len(instances)


def run(args):
    """Processes every input; returns the list of inputs that failed."""
    cfg = setup_cfg(args)
    files, failed = expand_inputs(args.input)
    for pattern in failed:
        logger.error("No such file, folder or matching image: %s", pattern)
    # A bad MODEL.WEIGHTS is refused before any model is built; the predictor then refuses
    # unsafe or incomplete files itself (isda.weights).
    inference_weights_given(cfg, cfg.MODEL.WEIGHTS)
    predictor = DefaultPredictor(cfg)
    dataset = cfg.DATASETS.TEST[0] if len(cfg.DATASETS.TEST) else "__unused"
    metadata = MetadataCatalog.get(dataset)
    single = len(files) == 1 and not os.path.isdir(args.input[0])
    if not (single and os.path.splitext(args.output)[1]):
        os.makedirs(args.output, exist_ok=True)
    used = set()
    for path in files:
        try:
            image = read_image(path, format="BGR")
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
            # PIL raises these for truncated, corrupt or non-image files.
            logger.error(
                "Cannot read %s: not a valid image (corrupt, truncated or unsupported format; %s: %s)."
                " Skipping it.",
                path,
                type(e).__name__,
                e,
            )
            failed.append(path)
            continue
        drawing, count = visualize(predictor, metadata, image, args.confidence_threshold)
        out = output_path(args.output, path, single, used)
        if not cv2.imwrite(out, drawing[:, :, ::-1]):
            logger.error("Could not write %s", out)
            failed.append(path)
            continue
        logger.info("%s: %d instances -> %s", path, count, out)
    return failed


def main(argv=None):
    """Entry point; returns the process exit status (1 if any input failed)."""
    setup_logger(name="isda")
    setup_logger(name="detectron2", abbrev_name="d2")
    args = parse_args(argv)
    try:
        failed = run(args)
    except WeightsError as e:
        logger.error("error: %s", e)
        return 2
    if failed:
        logger.error("%d input(s) failed: %s", len(failed), ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
