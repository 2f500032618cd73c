from .meta_arch import ISDA

__all__ = ["ISDA"]
