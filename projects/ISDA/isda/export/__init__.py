"""Deployment: ISDA as a graph of plain tensors (TorchScript, ONNX, torch.export), verified
against eager PyTorch at several input sizes."""

from .attention import ms_deform_attn_traceable, traceable_attention
from .detections import detections_from_query_outputs
from .module import INPUT_NAMES, OUTPUT_NAMES, ISDAExportModule, normalised_batch

__all__ = [
    "ISDAExportModule",
    "INPUT_NAMES",
    "OUTPUT_NAMES",
    "detections_from_query_outputs",
    "ms_deform_attn_traceable",
    "normalised_batch",
    "traceable_attention",
]
