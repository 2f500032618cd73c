#!/usr/bin/env python
"""The one-command ISDA demo (``make demo``): data, CPU training, COCO evaluation, pictures.

Steps, each skipped when its result already exists:
  1. generate the synthetic shapes dataset (isda.data.synthetic) if it is missing;
  2. train configs/ISDA-Demo.yaml with train_net.py's Trainer (progress and ETA in the log; AP is
     measured every TEST.EVAL_PERIOD iterations); skipped if OUTPUT_DIR/model_final.pth exists,
     unless --retrain;
  3. evaluate the final model on the val split with COCOEvaluator (isda.evaluation);
  4. write ground truth | prediction PNGs for a few val images, and a PNG of the training loss and
     AP against iteration (from OUTPUT_DIR/metrics.json);
  5. print the AP table, the wall time of each step, the machine and the paths written.

Example:
    python tools/run_demo.py --output-dir output/demo --num-workers 2 SOLVER.MAX_ITER 500
Trailing ``KEY VALUE`` pairs override the config, as with train_net.py.
"""

import argparse
import glob
import importlib.util
import json
import logging
import os
import platform
import time

import cv2
import matplotlib

matplotlib.use("Agg")  # headless: only files are written
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.data.detection_utils import read_image  # noqa: E402
from detectron2.engine import DefaultPredictor, default_argument_parser  # noqa: E402
from tabulate import tabulate  # noqa: E402

from isda.data.synthetic import (  # noqa: E402
    DEFAULT_SPLITS,
    generate_synthetic_dataset,
    register_synthetic_datasets,
)
from isda.engine import load_inference_weights  # noqa: E402
from isda.evaluation import ISDACOCOEvaluator  # noqa: E402
from isda.visualization import draw_ground_truth, draw_predictions, side_by_side  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_train_net():
    """train_net.py, the repository's entry point, loaded from its file: it is a script beside
    the package rather than part of it, and loading it by path leaves sys.path untouched."""
    spec = importlib.util.spec_from_file_location(
        "train_net", os.path.join(REPO_ROOT, "train_net.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_train_net = _load_train_net()
Trainer, configure_cpu_threads, setup = (
    _train_net.Trainer,
    _train_net.configure_cpu_threads,
    _train_net.setup,
)

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
    """Removes what a fresh run would otherwise mix with its own: metrics.json is appended to,
    and old model_*.pth files would outlive the run that wrote them."""
    stale = [os.path.join(output_dir, name) for name in ("metrics.json", "last_checkpoint")]
    stale += glob.glob(os.path.join(output_dir, "model_*.pth"))  # these already hold output_dir
    for path in stale:
        if os.path.isfile(path):
            os.remove(path)


class DemoTrainer(Trainer):
    """train_net's Trainer that adds up the seconds its evaluations take. The periodic ones (the
    last at MAX_ITER) run inside ``train()``: the wall-time line counts them as evaluation."""

    eval_seconds = 0.0

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        start = time.perf_counter()
        try:
            return super().test(cfg, model, evaluators)
        finally:
            cls.eval_seconds += time.perf_counter() - start


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
    trainer = DemoTrainer(cfg)
    trainer.resume_or_load(resume=resume)
    trainer.train()
    return getattr(trainer, "_last_eval_results", None)


def evaluate(cfg):
    """COCO evaluation of OUTPUT_DIR/model_final.pth on every DATASETS.TEST split."""
    model = DemoTrainer.build_model(cfg)
    load_inference_weights(model, cfg, os.path.join(cfg.OUTPUT_DIR, FINAL_MODEL))
    evaluators = [
        ISDACOCOEvaluator(name, output_dir=os.path.join(cfg.OUTPUT_DIR, "inference", name))
        for name in cfg.DATASETS.TEST
    ]
    return DemoTrainer.test(cfg, model, evaluators=evaluators)


def write_visualisations(cfg, out_dir, num_images, threshold):
    """For the first val images, writes ``ground truth | prediction`` PNGs.

    Returns one dict per image: ``path`` of the PNG, and ``ground_truth`` / ``prediction``, the
    label texts drawn on each panel (class names; class names with scores).
    """
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = os.path.join(cfg.OUTPUT_DIR, FINAL_MODEL)
    predictor = DefaultPredictor(cfg)
    dataset = cfg.DATASETS.TEST[0]
    metadata = MetadataCatalog.get(dataset)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for record in DatasetCatalog.get(dataset)[:num_images]:
        rgb = read_image(record["file_name"], format="RGB")
        instances = predictor(rgb[:, :, ::-1])["instances"].to("cpu")  # the predictor takes BGR
        instances = instances[instances.scores >= threshold]
        gt, gt_labels = draw_ground_truth(rgb, record, metadata)
        pred, pred_labels = draw_predictions(rgb, instances, metadata)
        panel = side_by_side(
            [("ground truth", gt), (f"prediction (score >= {threshold:g})", pred)], metadata
        )
        name = os.path.splitext(os.path.basename(record["file_name"]))[0] + ".png"
        path = os.path.join(out_dir, name)
        cv2.imwrite(path, panel[:, :, ::-1])
        written.append({"path": path, "ground_truth": gt_labels, "prediction": pred_labels})
    return written


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
    # One iteration axis for both: a single evaluation (at the end) then sits where it belongs.
    fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
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


def cpu_model():
    """The CPU's model name (``/proc/cpuinfo`` on Linux), for comparing timings and AP between
    machines: float rounding, and so the trained model, differ between CPU types."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_summary():
    """One line: CPU model, cores, torch threads and, where the OS reports it, the load average
    (other jobs on the same cores slow the demo down)."""
    line = f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    if hasattr(os, "getloadavg"):
        line += ", load average %.1f" % os.getloadavg()[0]
    return line


def wall_time_line(total: float, phases: dict) -> str:
    """``Wall time: 8 min 53 s (data 2.0 s, training 480.3 s, ...)`` from seconds."""
    minutes, seconds = divmod(round(total), 60)
    parts = ", ".join(f"{name} {value:.1f} s" for name, value in phases.items())
    return f"Wall time: {minutes} min {seconds} s ({parts})"


def main(argv=None):
    """Runs the demo; returns the evaluation results."""
    args = parse_args(argv)
    start = time.perf_counter()
    cfg = build_cfg(args)
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    else:
        configure_cpu_threads(cfg)
    machine_at_start = machine_summary()
    logger.info("Machine: %s", machine_at_start)
    prepare_data(args)
    t_train = time.perf_counter()
    DemoTrainer.eval_seconds = 0.0
    results = train(cfg, args.retrain)
    t_trained, eval_in_training = time.perf_counter(), DemoTrainer.eval_seconds
    if not results:
        results = evaluate(cfg)
    t_vis = time.perf_counter()
    vis_dir = os.path.join(cfg.OUTPUT_DIR, "visualizations")
    drawn = write_visualisations(cfg, vis_dir, args.num_vis, args.vis_threshold)
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
    phases = {
        "data": t_train - start,
        "training": t_trained - t_train - eval_in_training,
        "evaluation": eval_in_training + (t_vis - t_trained),
        "pictures": end - t_vis,
    }
    print("\n" + wall_time_line(end - start, phases))
    print(f"Machine:       {machine_at_start} (at start); now {machine_summary()}")
    print(f"Model:         {os.path.join(cfg.OUTPUT_DIR, FINAL_MODEL)}")
    print(f"Metrics:       {metrics_file}")
    print(f"Curves:        {curves or 'none (no metrics.json)'}")
    print(f"Predictions:   {vis_dir}/ ({len(drawn)} PNGs: ground truth | prediction)")
    return results


if __name__ == "__main__":
    main()
