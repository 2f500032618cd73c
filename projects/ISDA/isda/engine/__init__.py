"""Run-time safety for long training runs: atomic checkpoints, non-finite-loss stops, and
accounting for skipped data (README "Failure behaviour")."""

from .data_issues import DataIssueCounter, DataIssueLogger, SkippedImageFilter
from .safe_checkpoint import SafeDetectionCheckpointer, atomic_write
from .trainers import ISDAAMPTrainer, ISDASimpleTrainer, check_finite_losses

__all__ = [
    "DataIssueCounter",
    "DataIssueLogger",
    "ISDAAMPTrainer",
    "ISDASimpleTrainer",
    "SafeDetectionCheckpointer",
    "SkippedImageFilter",
    "atomic_write",
    "check_finite_losses",
]
