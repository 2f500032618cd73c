from .ms_deform_attn import MSDeformAttn

# Imported after the submodule `ms_deform_attn` so that the name `isda.layers.ms_deform_attn`
# is the function (importing a submodule binds its name on the package).
from .ms_deform_attn_func import ms_deform_attn, ms_deform_attn_reference

__all__ = ["ms_deform_attn", "ms_deform_attn_reference", "MSDeformAttn"]
