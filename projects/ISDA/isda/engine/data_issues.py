"""Counting and reporting the samples the data mapper skipped or repaired.

The mapper runs in DataLoader worker processes, where there is no EventStorage. It attaches its
counts to the next good sample (``ISDADatasetMapper.ISSUES_KEY``); these wrappers strip them in the
main process and keep running totals, which :class:`DataIssueLogger` writes to the log and to
``metrics.json``. The warning that names each file comes from the mapper itself.
"""

from __future__ import annotations

import logging
from collections import Counter

from detectron2.engine import HookBase

from ..data.dataset_mapper import ISDADatasetMapper

__all__ = ["DataIssueCounter", "SkippedImageFilter", "DataIssueLogger"]

logger = logging.getLogger(__name__)


def _pop_issues(sample, totals: Counter) -> None:
    totals.update(sample.pop(ISDADatasetMapper.ISSUES_KEY, None) or {})


class DataIssueCounter:
    """Wraps a training data loader (an iterable of batches) and totals the mapper's counts."""

    def __init__(self, loader):
        self.loader = loader
        self.totals = Counter()

    def __iter__(self):
        for batch in self.loader:
            for sample in batch:
                _pop_issues(sample, self.totals)
            yield batch

    def __len__(self):
        return len(self.loader)


class SkippedImageFilter:
    """Wraps a test data loader: drops images the mapper could not read, so the evaluator never
    sees them (their ground truth then counts as missed), and logs how many there were."""

    def __init__(self, loader, dataset_name: str):
        self.loader, self.dataset_name = loader, dataset_name
        self.totals = Counter()

    def __iter__(self):
        self.totals.clear()
        for batch in self.loader:
            kept = [x for x in batch if ISDADatasetMapper.SKIP_KEY not in x]
            for sample in batch:
                _pop_issues(sample, self.totals)
            if kept:
                yield kept
        if self.totals["skipped_images"]:
            logger.warning(
                "Evaluation on %s skipped %d unreadable image(s) (named in the warnings above); "
                "their ground truth counts as missed",
                self.dataset_name,
                self.totals["skipped_images"],
            )

    def __len__(self):
        return len(self.loader)


class DataIssueLogger(HookBase):
    """Puts ``data/skipped_images`` and ``data/dropped_annotations`` into the EventStorage every
    iteration, logs a line whenever they grew (at most every ``period`` iterations) and a summary
    at the end. The totals are saved in checkpoints, so they survive ``--resume``."""

    KEYS = ("skipped_images", "dropped_annotations")

    def __init__(self, counter: DataIssueCounter, period: int = 20):
        self.counter, self.period = counter, period
        self.base = Counter()  # totals of the runs before a resume
        self._logged = Counter()

    def totals(self) -> Counter:
        return self.base + self.counter.totals

    def after_step(self):
        totals = self.totals()
        for key in self.KEYS:
            self.trainer.storage.put_scalar(f"data/{key}", totals[key], smoothing_hint=False)
        due = (self.trainer.iter + 1) % self.period == 0
        if due and totals != self._logged:
            self._log(totals, "so far")

    def after_train(self):
        self._log(self.totals(), "in this run and the runs it resumed")

    def _log(self, totals: Counter, when: str) -> None:
        self._logged = Counter(totals)
        log = logger.warning if any(totals.values()) else logger.info
        log(
            "Data issues %s: %d image(s) skipped, %d annotation(s) dropped "
            "(files and reasons in the warnings above)",
            when,
            totals["skipped_images"],
            totals["dropped_annotations"],
        )

    def state_dict(self):
        return {key: int(self.totals()[key]) for key in self.KEYS}

    def load_state_dict(self, state_dict):
        self.base = Counter({k: int(v) for k, v in state_dict.items()})
