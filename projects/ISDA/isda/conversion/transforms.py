"""Value transforms a conversion rule may apply to a source tensor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import torch

__all__ = ["RowSelect", "coco91_to_80", "coco_thing_ids"]

Shape = Tuple[int, ...]


@dataclass(frozen=True)
class RowSelect:
    """Keeps rows ``rows`` (in that order): a class head with more outputs than ISDA's."""

    rows: Tuple[int, ...]
    source_rows: int
    doc: str

    def apply(self, tensor: torch.Tensor) -> torch.Tensor:
        """(source_rows, ...) -> (len(rows), ...); ValueError for any other row count."""
        if tensor.shape[0] != self.source_rows:
            raise ValueError(f"expected {self.source_rows} rows, got shape {tuple(tensor.shape)}")
        return tensor[list(self.rows)].clone()

    def source_shape(self, target_shape: Shape) -> Shape:
        """The source shape that yields ``target_shape``."""
        if target_shape[0] != len(self.rows):
            raise ValueError(
                f"{self.doc}: the target has {target_shape[0]} rows, not {len(self.rows)}"
            )
        return (self.source_rows,) + tuple(target_shape[1:])


def coco_thing_ids() -> List[int]:
    """COCO category ids of the 80 thing classes, in Detectron2's contiguous order (sorted by id).

    Detectron2's builtin COCO metadata and ``load_coco_json`` both map sorted ids to 0..79, and so
    does MMDetection's CocoDataset, so contiguous class k means the same category everywhere.
    """
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    ids = sorted(c["id"] for c in COCO_CATEGORIES if c["isthing"])
    if len(ids) != 80:
        raise RuntimeError(f"expected 80 COCO thing ids in detectron2's metadata, got {len(ids)}")
    return ids


def coco91_to_80() -> RowSelect:
    """The original Deformable DETR classifies COCO *category ids* directly: 91 logits, index = id
    (0 and the 10 ids COCO never uses, e.g. 12, 26, 29, are dead logits). ISDA class k is COCO id
    ``coco_thing_ids()[k]``."""
    return RowSelect(
        rows=tuple(coco_thing_ids()),
        source_rows=91,
        doc="91 COCO-id logits -> 80 contiguous classes "
        "(row k = category id of Detectron2 class k)",
    )
