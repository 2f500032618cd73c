"""ISDA: position-aware instance segmentation with deformable attention (ICASSP 2022), for Detectron2.

Importing the package registers the ``ISDA`` meta-architecture with Detectron2, and makes
Detectron2's checkpointer read weights files without running pickled code (:mod:`isda.weights`).
"""

from .config import add_isda_config
from . import modeling  # noqa: F401  (registers META_ARCH "ISDA")
from .weights import protect_detectron2_checkpointer

protect_detectron2_checkpointer()

__all__ = ["add_isda_config"]
