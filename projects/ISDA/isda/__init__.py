"""ISDA: position-aware instance segmentation with deformable attention (ICASSP 2022), for Detectron2.

Importing the package registers the ``ISDA`` meta-architecture with Detectron2.
"""

from .config import add_isda_config
from . import modeling  # noqa: F401  (registers META_ARCH "ISDA")

__all__ = ["add_isda_config"]
