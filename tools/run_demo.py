#!/usr/bin/env python
"""The one-command ISDA demo (``make demo``): data, CPU training, COCO evaluation, pictures.

Steps, each skipped when its result already exists:
  1. generate the synthetic shapes dataset (isda.data.synthetic) if it is missing;
  2. train configs/ISDA-Demo.yaml with train_net.py's Trainer (progress and ETA in the log; AP is
     measured every TEST.EVAL_PERIOD iterations); skipped if OUTPUT_DIR/model_final.pth exists,
     unless --retrain;
  3. evaluate the final model on the val split with COCOEvaluator;
  4. write ground truth | prediction PNGs for a few val images, and a PNG of the training loss and
     AP against iteration (from OUTPUT_DIR/metrics.json);
  5. print the AP table and the paths written.

Example:
    python tools/run_demo.py --output-dir output/demo --num-workers 2 SOLVER.MAX_ITER 500
Trailing ``KEY VALUE`` pairs override the config, as with train_net.py.
"""

import argparse
import glob
import json
import logging
import os
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # train_net.py lives at the repository root

import cv2  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")  # headless: only files are written
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.data.detection_utils import read_image  # noqa: E402
from detectron2.engine import DefaultPredictor, default_argument_parser  # noqa: E402
from detectron2.evaluation import COCOEvaluator  # noqa: E402
from detectron2.utils.visualizer import Visualizer  # noqa: E402
from tabulate import tabulate  # noqa: E402

from isda.data.synthetic import (  # noqa: E402
    DEFAULT_SPLITS,
    generate_synthetic_dataset,
    register_synthetic_datasets,
)
from isda.engine import SafeDetectionCheckpointer  # noqa: E402
from train_net import Trainer, configure_cpu_threads, setup  # noqa: E402

logger = logging.getLogger("detectron2.run_demo")

DEFAULT_CONFIG = os.path.join(REPO_ROOT, "configs", "ISDA-Demo.yaml")
FINAL_MODEL = "model_final.pth"
COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def parse_args(argv=None):
    """Command line of the demo; unknown trailing ``KEY VALUE`` pairs become config overrides."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--config-file", default=DEFAULT_CONFIG, help="demo config (default: %(default)s)"
    )
    p.add_argument("--output-dir", default="output/demo", help="checkpoints, logs and pictures")
    p.add_argument("--dataset-root", default=None, help="default: $DETECTRON2_DATASETS/isda_synth")
    p.add_argument("--num-workers", type=int, default=None, help="data-loader worker processes")
    p.add_argument(
        "--num-threads",
        type=int,
        default=0,
        help="torch CPU threads; 0 (default) = as train_net.py: all cores, or $OMP_NUM_THREADS."
        " Use 1 when other jobs share the cores: oversubscribed threads slow training tenfold",
    )
    p.add_argument("--retrain", action="store_true", help="train even if a finished model exists")
    p.add_argument("--train-size", type=int, default=DEFAULT_SPLITS["train"].num_images)
    p.add_argument("--val-size", type=int, default=DEFAULT_SPLITS["val"].num_images)
    p.add_argument("--num-vis", type=int, default=6, help="val images to draw")
    p.add_argument("--vis-threshold", type=float, default=0.5, help="score threshold of drawings")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return p.parse_args(argv)


def build_cfg(args):
    """The frozen config through train_net.setup (which also sets up logging in OUTPUT_DIR)."""
    opts = ["OUTPUT_DIR", args.output_dir]
    if args.num_workers is not None:
        opts += ["DATALOADER.NUM_WORKERS", str(args.num_workers)]
    train_args = default_argument_parser().parse_args(["--config-file", args.config_file])
    train_args.opts = opts + list(args.opts)
    return setup(train_args)


def prepare_data(args):
    """Generates the train/val splits if missing (or of another size) and registers them."""
    sizes = {"train": args.train_size, "val": args.val_size}
    start = time.perf_counter()
    generate_synthetic_dataset(args.dataset_root, splits=["train", "val"], num_images=sizes)
    register_synthetic_datasets(args.dataset_root)
    logger.info("Dataset ready in %.1f s", time.perf_counter() - start)


def _clear_previous_run(output_dir):
    # metrics.json is appended to, so a fresh run starts from an empty one to keep curves clean.
    stale = ["metrics.json", "last_checkpoint"] + glob.glob(os.path.join(output_dir, "model_*.pth"))
    for name in stale:
        path = os.path.join(output_dir, name)
        if os.path.isfile(path):
            os.remove(path)


def train(cfg, retrain):
    """Trains unless a finished model exists; returns the final evaluation results, if any."""
    final = os.path.join(cfg.OUTPUT_DIR, FINAL_MODEL)
    if os.path.isfile(final) and not retrain:
        logger.info("Found %s: skipping training (use --retrain to train again)", final)
        return None
    has_checkpoint = os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))
    # An interrupted run resumes from its last checkpoint; --retrain starts afresh.
    resume = has_checkpoint and not retrain
    if not resume:
        _clear_previous_run(cfg.OUTPUT_DIR)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=resume)
    trainer.train()
    return getattr(trainer, "_last_eval_results", None)


def evaluate(cfg):
    """COCO evaluation of OUTPUT_DIR/model_final.pth on every DATASETS.TEST split."""
    model = Trainer.build_model(cfg)
    SafeDetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).load(
        os.path.join(cfg.OUTPUT_DIR, FINAL_MODEL)
    )
    evaluators = [
        COCOEvaluator(name, output_dir=os.path.join(cfg.OUTPUT_DIR, "inference", name))
        for name in cfg.DATASETS.TEST
    ]
    return Trainer.test(cfg, model, evaluators=evaluators)


def _titled(image, title):
    """Puts a title bar above an RGB image."""
    bar = np.full((28, image.shape[1], 3), 255, dtype=np.uint8)
    cv2.putText(bar, title, (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([bar, image], axis=0)


def write_visualisations(cfg, out_dir, num_images, threshold):
    """For the first val images, writes ``ground truth | prediction`` PNGs; returns their paths."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = os.path.join(cfg.OUTPUT_DIR, FINAL_MODEL)
    predictor = DefaultPredictor(cfg)
    dataset = cfg.DATASETS.TEST[0]
    metadata = MetadataCatalog.get(dataset)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for record in DatasetCatalog.get(dataset)[:num_images]:
        bgr = read_image(record["file_name"], format="BGR")
        instances = predictor(bgr)["instances"].to("cpu")
        instances = instances[instances.scores >= threshold]
        rgb = bgr[:, :, ::-1]
        # Small synthetic images are scaled up so labels stay readable.
        gt = Visualizer(rgb, metadata, scale=3.0).draw_dataset_dict(record).get_image()
        pred = Visualizer(rgb, metadata, scale=3.0).draw_instance_predictions(instances).get_image()
        sep = np.full((gt.shape[0], 8, 3), 255, dtype=np.uint8)
        panel = np.concatenate(
            [_titled(gt, "ground truth"), _titled(sep, ""), _titled(pred, "prediction")], axis=1
        )
        path = os.path.join(
            out_dir, os.path.splitext(os.path.basename(record["file_name"]))[0] + ".png"
        )
        cv2.imwrite(path, panel[:, :, ::-1])
        paths.append(path)
    return paths


def read_metrics(metrics_file):
    """metrics.json lines, one per logged iteration; a resumed run's repeats keep the latest."""
    by_iter = {}
    with open(metrics_file) as f:
        for line in f:
            line = line.strip()
            if line:
                entry = json.loads(line)
                by_iter.setdefault(entry["iteration"], {}).update(entry)
    return [by_iter[i] for i in sorted(by_iter)]


def plot_metrics(metrics_file, out_png):
    """Plots total training loss and bbox/segm AP against iteration into one PNG."""
    entries = read_metrics(metrics_file)
    fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(11, 4))
    loss = [(e["iteration"], e["total_loss"]) for e in entries if "total_loss" in e]
    if loss:
        ax_loss.plot(*zip(*loss), label="total_loss")
    ax_loss.set(xlabel="iteration", ylabel="loss", title="training loss", yscale="log")
    for task in ("segm", "bbox"):
        ap = [(e["iteration"], e[f"{task}/AP"]) for e in entries if f"{task}/AP" in e]
        if ap:
            ax_ap.plot(*zip(*ap), marker="o", label=f"{task} AP")
    ax_ap.set(xlabel="iteration", ylabel="AP", title="val AP (COCO)", ylim=(0, 100))
    for ax in (ax_loss, ax_ap):
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def format_results(results, datasets):
    """The AP table: one row per (dataset, task), COCO summary metrics as columns."""
    # Trainer.test returns {task: metrics} for one dataset, {dataset: {task: metrics}} for several.
    if len(datasets) == 1:
        results = {datasets[0]: results}
    rows = []
    for dataset, tasks in results.items():
        for task, metrics in tasks.items():
            rows.append(
                [f"{dataset} {task}"]
                + [f"{metrics.get(k, float('nan')):.1f}" for k in COCO_METRICS]
            )
    return tabulate(rows, headers=["task"] + list(COCO_METRICS), tablefmt="github")


def main(argv=None):
    """Runs the demo; returns the evaluation results."""
    args = parse_args(argv)
    start = time.perf_counter()
    cfg = build_cfg(args)
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    else:
        configure_cpu_threads(cfg)
    prepare_data(args)
    t_train = time.perf_counter()
    results = train(cfg, args.retrain)
    t_eval = time.perf_counter()
    if not results:
        results = evaluate(cfg)
    t_vis = time.perf_counter()
    vis_dir = os.path.join(cfg.OUTPUT_DIR, "visualizations")
    images = write_visualisations(cfg, vis_dir, args.num_vis, args.vis_threshold)
    metrics_file = os.path.join(cfg.OUTPUT_DIR, "metrics.json")
    curves = None
    if os.path.isfile(metrics_file):
        curves = plot_metrics(metrics_file, os.path.join(cfg.OUTPUT_DIR, "training_curves.png"))
    else:
        logger.warning("No %s (model trained elsewhere?): no training curves", metrics_file)
    end = time.perf_counter()
    print(
        "\nCOCO results on "
        + ", ".join(cfg.DATASETS.TEST)
        + ":\n"
        + format_results(results, cfg.DATASETS.TEST)
    )
    print(
        f"\nTime: total {end - start:.0f} s (data {t_train - start:.0f} s, training {t_eval - t_train:.0f} s,"
        f" evaluation {t_vis - t_eval:.0f} s, pictures {end - t_vis:.0f} s)"
    )
    print(f"Model:         {os.path.join(cfg.OUTPUT_DIR, FINAL_MODEL)}")
    print(f"Metrics:       {metrics_file}")
    print(f"Curves:        {curves or 'none (no metrics.json)'}")
    print(f"Predictions:   {vis_dir}/ ({len(images)} PNGs: ground truth | prediction)")
    return results


if __name__ == "__main__":
    main()
