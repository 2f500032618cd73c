"""Run-time safety for long training runs: atomic checkpoints, complete weights for inference, non-finite-loss stops, accounting
for skipped data (README "Failure behaviour"), and CPU multi-process training."""

from .cpu_ddp import cpu_ddp_without_device_ids
from .data_issues import DataIssueCounter, DataIssueLogger, SkippedImageFilter
from .loss_check import FiniteLossCheck, check_finite_losses
from .safe_checkpoint import (
    SafeDetectionCheckpointer,
    inference_weights_given,
    load_inference_weights,
)

__all__ = [
    "DataIssueCounter",
    "DataIssueLogger",
    "FiniteLossCheck",
    "SafeDetectionCheckpointer",
    "SkippedImageFilter",
    "check_finite_losses",
    "inference_weights_given",
    "load_inference_weights",
    "cpu_ddp_without_device_ids",
]
