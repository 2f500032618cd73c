"""Deployment: ISDA as a graph of plain tensors (TorchScript, ONNX, torch.export), verified
against eager PyTorch at several input sizes."""

from .attention_impl import attention_impl
from .detections import detections_from_query_outputs
from .module import INPUT_NAMES, OUTPUT_NAMES, ISDAExportModule, normalised_batch

__all__ = [
    "ISDAExportModule",
    "INPUT_NAMES",
    "OUTPUT_NAMES",
    "attention_impl",
    "detections_from_query_outputs",
    "normalised_batch",
]
