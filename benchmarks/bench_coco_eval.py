"""COCO evaluation cost and agreement of the available evaluators, on the same predictions.

    python benchmarks/bench_coco_eval.py --gt GT.json --results coco_instances_results.json

GT.json and the results are what COCOEvaluator writes (``<output>/inference/<dataset>/``:
``<dataset>_coco_format.json`` and ``coco_instances_results.json``), for instance after
``make demo``. Evaluators, each where importable:

* ``pycocotools``: ``COCOeval``, what Detectron2 falls back to without its ``_C``;
* ``detectron2``: Detectron2's ``COCOeval_opt`` (needs ``detectron2._C``: the oldest stack);
* ``faster_coco_eval``: ``COCOeval_faster`` of the faster-coco-eval package.

For segm and bbox it prints the median seconds of evaluate + accumulate over --repeats (loading
the files is not timed) and the 12 COCO summary numbers, with each evaluator's largest AP
difference from pycocotools.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Tuple

import torch

IOU_TYPES = ("segm", "bbox")


def _pycocotools():
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    return COCO, COCOeval


def _detectron2():
    from detectron2.evaluation.fast_eval_api import COCOeval_opt
    from pycocotools.coco import COCO

    return COCO, COCOeval_opt


def _faster_coco_eval():
    from faster_coco_eval import COCO, COCOeval_faster

    return COCO, COCOeval_faster


EVALUATORS: Dict[str, Callable[[], Tuple[type, type]]] = {
    "pycocotools": _pycocotools,
    "detectron2": _detectron2,
    "faster_coco_eval": _faster_coco_eval,
}


def evaluate(classes, gt_path: str, results_path: str, iou_type: str, repeats: int):
    """(median seconds of evaluate + accumulate, the 12 summary stats) of one evaluator."""
    coco_cls, eval_cls = classes
    with contextlib.redirect_stdout(io.StringIO()):
        gt = coco_cls(gt_path)
        dt = gt.loadRes(results_path)
        times, stats = [], None
        for _ in range(repeats):
            ev = eval_cls(gt, dt, iou_type)
            start = time.perf_counter()
            ev.evaluate()
            ev.accumulate()
            times.append(time.perf_counter() - start)
            ev.summarize()
            stats = [float(s) * 100 for s in ev.stats[:12]]
    return statistics.median(times), stats


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gt", required=True, help="COCO-format ground truth JSON")
    p.add_argument("--results", required=True, help="COCO results JSON (segmentation and bbox)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    print(
        f"{platform.node()} | {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
        f" | Python {platform.python_version()}, torch {torch.__version__}"
    )
    rows: List[Tuple[str, str, float, List[float]]] = []
    for name, load in EVALUATORS.items():
        try:
            classes = load()
        except ImportError as e:
            print(f"skipped {name}: {e}")
            continue
        for iou_type in IOU_TYPES:
            seconds, stats = evaluate(classes, args.gt, args.results, iou_type, args.repeats)
            rows.append((name, iou_type, seconds, stats))
    reference = {t: s for n, t, _, s in rows if n == "pycocotools"}
    print(
        "| evaluator | type | seconds (median) | AP | AP50 | AP75 | max abs AP diff vs pycocotools |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, iou_type, seconds, stats in rows:
        diff = max(abs(a - b) for a, b in zip(stats, reference[iou_type]))
        print(
            f"| {name} | {iou_type} | {seconds:.2f} | {stats[0]:.2f} | {stats[1]:.2f} "
            f"| {stats[2]:.2f} | {diff:.4f} |"
        )


if __name__ == "__main__":
    main()
