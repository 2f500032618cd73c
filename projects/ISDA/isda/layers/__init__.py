from .msda_dispatch import ms_deform_attn
from .msda_module import MSDeformAttn
from .msda_native import op_library_path
from .msda_reference import ms_deform_attn_reference

__all__ = ["ms_deform_attn", "ms_deform_attn_reference", "MSDeformAttn", "op_library_path"]
