from .ms_deform_attn_func import ms_deform_attn, ms_deform_attn_reference
from .ms_deform_attn import MSDeformAttn

__all__ = ["ms_deform_attn", "ms_deform_attn_reference", "MSDeformAttn"]
