from . import backbone  # noqa: F401  (registers BACKBONE "build_isda_resnet_backbone")
from .meta_arch import ISDA

__all__ = ["ISDA"]
