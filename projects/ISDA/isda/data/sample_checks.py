"""Checks that decide whether a dataset sample can be used as it is, repaired, or must be skipped.

A multi-day run must survive one bad file, and must never train on a silently mislabelled one. Each
check either returns usable data or raises :class:`SkipSample` with a reason a user can act on; the
mapper turns that into one warning that names the file (see README "Failure behaviour").
"""

from __future__ import annotations

import struct
from collections import Counter
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import pycocotools.mask as mask_util
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.structures import BoxMode
from detectron2.utils.file_io import PathManager
from PIL import Image, ImageOps

__all__ = [
    "SkipSample",
    "read_image_checked",
    "check_image_matches_record",
    "validate_annotations",
    "check_dataset_categories",
]

# PIL modes that hold more than 8 bits per pixel. PIL's own convert("RGB") clips them at 255, which
# turns a 16-bit PNG into a white image; they are scaled to 8 bits instead.
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
# Errors that PIL raises for a missing, truncated, corrupt or oversized file.
READ_ERRORS = (
    OSError,
    ValueError,
    EOFError,
    SyntaxError,
    struct.error,
    Image.DecompressionBombError,
)
MIN_POLYGON_COORDS = 6  # 3 points


class SkipSample(Exception):
    """The sample cannot be used; ``str(self)`` is the reason shown to the user."""


def read_image_checked(file_name: str, format: str) -> np.ndarray:
    """Reads an image as (H, W, C) uint8 in ``format`` (e.g. "RGB"), like Detectron2's ``read_image``.

    Applies the EXIF orientation, expands grayscale / palette / RGBA / CMYK to ``format``, and maps
    16-bit grayscale to 8 bits (the high byte). Raises SkipSample for files that cannot be decoded.
    """
    try:
        with PathManager.open(file_name, "rb") as f:
            image = ImageOps.exif_transpose(Image.open(f))
            if image.mode in SIXTEEN_BIT_MODES:
                image = _sixteen_to_eight_bit(image)
            elif image.mode == "F":
                raise SkipSample("32-bit float image: no defined mapping to 8-bit colour")
            return utils.convert_PIL_to_numpy(image, format)
    except FileNotFoundError:
        raise SkipSample("file not found") from None
    except READ_ERRORS as e:
        raise SkipSample(f"cannot decode the image ({type(e).__name__}: {e})") from None


def _sixteen_to_eight_bit(image: Image.Image) -> Image.Image:
    """16-bit grayscale (0..65535) -> 8-bit "L" by keeping the high byte."""
    array = np.asarray(image).astype(np.int64)
    return Image.fromarray((np.clip(array, 0, 65535) >> 8).astype(np.uint8), mode="L")


def check_image_matches_record(record: Dict, image: np.ndarray) -> None:
    """Raises SkipSample if the record's width/height disagree with the decoded image.

    Annotations are in the record's coordinates, so a mismatch would misplace every mask. A swapped
    size usually means the annotations were drawn on the pixels before EXIF rotation.
    """
    h, w = image.shape[:2]
    expected = (record.get("height", h), record.get("width", w))
    if expected == (h, w):
        record.setdefault("height", h)
        record.setdefault("width", w)
        return
    hint = (
        " (the swapped size: the annotations were probably made before EXIF rotation)"
        if expected == (w, h)
        else ""
    )
    raise SkipSample(
        f"image is {w}x{h} (WxH, after EXIF orientation) but its record says "
        f"{expected[1]}x{expected[0]}{hint}"
    )


def validate_annotations(
    annos: Sequence[Dict], image_hw: Tuple[int, int], num_classes: Optional[int], file_name: str
) -> Tuple[List[Dict], List[str]]:
    """Keeps the annotations whose mask is usable; returns (kept, reasons for each dropped one).

    Polygons with fewer than 3 points are removed (pycocotools would read a 2-point polygon as a box),
    and an annotation whose mask has zero area inside the image is dropped. Self-intersecting polygons
    are kept and rasterised as COCO does (even-odd). Every kept mask comes back as RLE; a missing box
    is taken from the mask.
    Category ids outside [0, num_classes) raise ValueError: that is a dataset-wide labelling error.
    """
    kept, dropped = [], []
    for anno in annos:
        _check_category(anno, num_classes, file_name)
        try:
            kept.append(_validated(anno, image_hw))
        except SkipSample as e:
            dropped.append(str(e))
    return kept, dropped


def _check_category(anno: Dict, num_classes: Optional[int], file_name: str) -> None:
    cat = anno.get("category_id")
    if num_classes is not None and not (
        isinstance(cat, (int, np.integer)) and 0 <= cat < num_classes
    ):
        raise ValueError(
            f"{file_name}: category_id {cat!r} is outside [0, MODEL.ISDA.NUM_CLASSES={num_classes}). "
            "Detectron2 datasets use contiguous ids; register COCO json with register_coco_instances, "
            "which maps the file's ids through thing_dataset_id_to_contiguous_id."
        )


def _validated(anno: Dict, image_hw: Tuple[int, int]) -> Dict:
    """A copy of ``anno`` with a clean segmentation and a box, or SkipSample."""
    if "segmentation" not in anno:
        raise SkipSample("annotation has no segmentation")
    rle = _segmentation_rle(anno["segmentation"], image_hw)
    if int(mask_util.area(rle)) == 0:
        raise SkipSample("mask has zero area inside the image")
    # Polygons travel on as RLE: cropping polygons needs shapely, which Detectron2 does not
    # install, and ISDA trains on bitmasks anyway (INPUT.MASK_FORMAT "bitmask").
    anno = dict(anno, segmentation=rle)
    if "bbox" not in anno or "bbox_mode" not in anno:
        anno["bbox"], anno["bbox_mode"] = mask_util.toBbox(rle).tolist(), BoxMode.XYWH_ABS
    return anno


def _segmentation_rle(segm, image_hw: Tuple[int, int]) -> Dict:
    """Polygons, RLE or a mask array -> one compressed RLE at the image size, or SkipSample."""
    h, w = image_hw
    if isinstance(segm, list):
        # pycocotools would read a 4-number polygon as a box: drop polygons under 3 points.
        polys = [p for p in segm if len(p) >= MIN_POLYGON_COORDS and len(p) % 2 == 0]
        if not polys:
            raise SkipSample("polygon with fewer than 3 points")
        return mask_util.merge(mask_util.frPyObjects(polys, h, w))
    if isinstance(segm, dict):
        if list(segm.get("size", ())) != [h, w]:
            raise SkipSample(f"RLE size {segm.get('size')} differs from the image size {[h, w]}")
        if isinstance(segm["counts"], list):  # uncompressed RLE: Detectron2 decodes compressed only
            segm = mask_util.frPyObjects(segm, h, w)
        return segm
    if isinstance(segm, np.ndarray):
        if segm.shape != (h, w):
            raise SkipSample(f"mask array shape {segm.shape} differs from the image size {(h, w)}")
        return mask_util.encode(np.asfortranarray(segm.astype(np.uint8)))
    raise SkipSample(f"unknown segmentation type {type(segm).__name__}")


def check_dataset_categories(
    dataset_dicts: Iterable[Dict], dataset_names: Sequence[str], num_classes: int
) -> None:
    """Fails before training or evaluation starts if labels and MODEL.ISDA.NUM_CLASSES disagree.

    Raw (non-contiguous) COCO ids in a custom loader would otherwise be trained as other classes, or
    crash the loss hours into the run.
    """
    for name in dataset_names:
        classes = MetadataCatalog.get(name).get("thing_classes", None)
        if classes is not None and len(classes) != num_classes:
            raise ValueError(
                f"MODEL.ISDA.NUM_CLASSES={num_classes} but dataset {name!r} has "
                f"{len(classes)} thing_classes; set MODEL.ISDA.NUM_CLASSES {len(classes)}"
            )
    bad = Counter()
    for record in dataset_dicts:
        for anno in record.get("annotations", ()):
            cat = anno.get("category_id")
            if not (isinstance(cat, (int, np.integer)) and 0 <= cat < num_classes):
                bad[cat] += 1
    if bad:
        raise ValueError(
            f"Datasets {tuple(dataset_names)} use category ids {sorted(bad, key=str)} outside "
            f"[0, MODEL.ISDA.NUM_CLASSES={num_classes}). Ids must be contiguous 0..K-1: "
            "register_coco_instances maps COCO ids for you; a custom loader must map them itself."
        )
