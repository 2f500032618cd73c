"""COCO evaluation with the fastest evaluator that gives pycocotools' numbers.

Detectron2's ``COCOEvaluator`` uses its C++ ``COCOeval_opt`` (in ``detectron2._C``) and falls back
to pycocotools' pure-Python ``COCOeval`` where that library is missing, as on the default stack
(docs/INSTALL.md). There :class:`ISDACOCOEvaluator` uses faster-coco-eval's ``COCOeval_faster``
when it is installed: on the demo's 300 val scenes it gave the same 12 COCO numbers as
pycocotools to 1e-4 AP, in a quarter of the time (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

from detectron2.evaluation import COCOEvaluator
from detectron2.evaluation import coco_evaluation

__all__ = ["ISDACOCOEvaluator", "faster_cocoeval"]


def faster_cocoeval() -> Optional[type]:
    """faster-coco-eval's ``COCOeval_faster``, or None when the package is not installed."""
    try:
        from faster_coco_eval import COCOeval_faster
    except ImportError:
        return None
    return COCOeval_faster


@contextlib.contextmanager
def _pure_python_cocoeval_replaced_by(cocoeval: type) -> Iterator[None]:
    # COCOEvaluator picks its evaluator as the module's COCOeval name at call time when its fast
    # implementation is off; evaluation runs in one thread, so a scoped swap is safe.
    previous = coco_evaluation.COCOeval
    coco_evaluation.COCOeval = cocoeval
    try:
        yield
    finally:
        coco_evaluation.COCOeval = previous


class ISDACOCOEvaluator(COCOEvaluator):
    """``COCOEvaluator`` (same arguments) that evaluates with faster-coco-eval where Detectron2's
    own C++ evaluator is unavailable and faster-coco-eval is installed."""

    def _eval_predictions(self, predictions, img_ids=None):
        fast = faster_cocoeval()
        if self._use_fast_impl or fast is None:
            return super()._eval_predictions(predictions, img_ids)
        with _pure_python_cocoeval_replaced_by(fast):
            return super()._eval_predictions(predictions, img_ids)
