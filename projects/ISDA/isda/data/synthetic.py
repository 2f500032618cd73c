"""A procedural instance-segmentation dataset ("isda_synth"), deterministic by seed.

Each scene is a small RGB image of geometric shapes (circle, square, triangle, star, ring) on a
textured or noisy background. Shapes have random sizes, rotations and colours; by default each
category draws its colour from its own band of hues (``SceneParams.hue_band``; None makes colours
independent of the category, a harder task than the 10-minute demo can learn). Later shapes occlude
earlier ones, and each annotation is the *visible* part after occlusion, so the masks of one image
never overlap. Shapes may be cut by the image border. A share of the scenes holds several identical
copies of one shape (same class, size, rotation and colour) that only their position tells apart:
the case ISDA's position-aware kernels exist for (paper Sec. 3.2). The ``identical_*`` splits hold
only such scenes.

Layout on disk (``root`` defaults to ``$DETECTRON2_DATASETS/isda_synth``, and to
``./datasets/isda_synth`` when that variable is unset, as Detectron2's builtin datasets do)::

    root/annotations/instances_{split}.json   COCO instances, masks as compressed RLE
    root/{split}/000000.png ...                the images

Masks are RLE, so train with ``INPUT.MASK_FORMAT: "bitmask"``. Importing this module registers the
splits in Detectron2's catalogs under ``isda_synth_{split}``; a split missing on disk is generated
the first time its dicts are requested.
"""

import colorsys
import json
import logging
import os
import zlib
from dataclasses import asdict, dataclass
from typing import Optional

import cv2
import numpy as np
import pycocotools.mask as mask_util
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from ..file_io import atomic_open

__all__ = [
    "CATEGORIES",
    "DEFAULT_SPLITS",
    "SceneParams",
    "dataset_name",
    "generate_split",
    "generate_synthetic_dataset",
    "get_synthetic_root",
    "register_synthetic_datasets",
]

logger = logging.getLogger(__name__)

CATEGORIES = ("circle", "square", "triangle", "star", "ring")
# RGB colours for Detectron2's Visualizer, one per category.
CATEGORY_COLORS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180))
DATASET_PREFIX = "isda_synth"
# Bumped whenever the generator's output changes, so stale data on disk is regenerated.
GENERATOR_VERSION = 3


@dataclass(frozen=True)
class SceneParams:
    """How scenes are drawn. Sizes are in pixels of the generated image."""

    min_size: int = 128  # image height and width are drawn from [min_size, max_size]
    max_size: int = 160
    min_objects: int = 1  # shapes per mixed scene
    max_objects: int = 4
    min_radius: float = 16.0  # shape radius (circumscribed circle)
    max_radius: float = 36.0
    identical_fraction: float = 0.15  # share of scenes made of identical copies of one shape
    min_copies: int = 2  # copies per identical scene
    max_copies: int = 4
    max_identical_radius: float = 24.0  # copies are smaller so that several fit side by side
    min_area: int = 40  # smallest visible area kept, in pixels
    min_visible_fraction: float = 0.5  # occlusion may hide at most half of a shape
    min_color_distance: float = 80.0  # RGB distance of a shape from the background mean
    placement_attempts: int = 30  # tries per shape before it is skipped
    # Width in degrees of each category's hue band, centred on evenly spaced hues (saturation and
    # brightness stay random). A colour cue lets a from-scratch model learn the classes in minutes;
    # shape alone takes it far longer. None: any colour for any category.
    hue_band: Optional[float] = 20.0


@dataclass(frozen=True)
class SplitSpec:
    """Default size and scene mix of one split."""

    num_images: int
    identical_only: bool = False


# Default sizes. val holds 300 scenes (751 shapes) because AP is a coarse measure on fewer: on the
# first 60 of them, demo models scored up to 9.6 AP points away from their AP on all 300 (README,
# "The demo").
DEFAULT_SPLITS = {
    "train": SplitSpec(600),
    "val": SplitSpec(300),
    "identical_train": SplitSpec(400, identical_only=True),
    "identical_val": SplitSpec(60, identical_only=True),
}


def get_synthetic_root(root=None):
    """The dataset folder: ``root`` if given, else ``$DETECTRON2_DATASETS/isda_synth``."""
    if root is None:
        root = os.path.join(
            os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")), DATASET_PREFIX
        )
    return root


def dataset_name(split):
    """The catalog name of a split, e.g. ``isda_synth_train``."""
    return f"{DATASET_PREFIX}_{split}"


def _split_paths(root, split):
    return os.path.join(root, "annotations", f"instances_{split}.json"), os.path.join(root, split)


# ----------------------------------------------------------------------------------------------
# Drawing primitives. Every shape is a boolean mask of the whole image; 1/16-pixel fixed point
# polygons keep sub-pixel positions, so shapes of equal parameters differ only by translation.
# ----------------------------------------------------------------------------------------------
_SHIFT = 4


def _fill_polygon(mask, points):
    pts = np.round(np.asarray(points) * (1 << _SHIFT)).astype(np.int32)
    cv2.fillPoly(mask, [pts], 1, lineType=cv2.LINE_8, shift=_SHIFT)


def _regular_points(cx, cy, radii, angle):
    """Vertices at equal angular steps; ``radii`` cycles (e.g. outer/inner radius of a star)."""
    radii = np.asarray(radii, dtype=np.float64)
    theta = angle + np.arange(len(radii)) * 2 * np.pi / len(radii)
    return np.stack([cx + radii * np.cos(theta), cy + radii * np.sin(theta)], axis=1)


def shape_mask(category, height, width, cx, cy, radius, angle):
    """Rasterises one shape as an (H, W) uint8 mask in {0, 1}; parts outside the image are cut."""
    mask = np.zeros((height, width), dtype=np.uint8)
    if category == "circle":
        _fill_polygon(mask, _regular_points(cx, cy, [radius] * 48, angle))
    elif category == "square":
        _fill_polygon(mask, _regular_points(cx, cy, [radius] * 4, angle))
    elif category == "triangle":
        _fill_polygon(mask, _regular_points(cx, cy, [radius] * 3, angle))
    elif category == "star":
        _fill_polygon(mask, _regular_points(cx, cy, [radius, 0.45 * radius] * 5, angle))
    elif category == "ring":
        _fill_polygon(mask, _regular_points(cx, cy, [radius] * 48, angle))
        hole = np.zeros_like(mask)
        _fill_polygon(hole, _regular_points(cx, cy, [0.55 * radius] * 48, angle))
        mask[hole > 0] = 0
    else:
        raise ValueError(f"Unknown category {category!r}; expected one of {CATEGORIES}")
    return mask


def _random_color(rng):
    return rng.uniform(0, 255, size=3)


def _background(rng, height, width):
    """A (H, W, 3) float image: flat, gradient, stripes, smooth blobs or checkerboard, plus noise."""
    kind = rng.integers(5)
    base, other = _random_color(rng), _random_color(rng)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    if kind == 0:
        weight = np.zeros((height, width), np.float32)
    elif kind == 1:
        theta = rng.uniform(0, 2 * np.pi)
        ramp = np.cos(theta) * xx + np.sin(theta) * yy
        weight = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0)
    elif kind == 2:
        theta, period = rng.uniform(0, np.pi), rng.uniform(6, 24)
        phase = (np.cos(theta) * xx + np.sin(theta) * yy) * 2 * np.pi / period
        weight = 0.5 + 0.5 * np.sin(phase)
    elif kind == 3:
        cells = rng.uniform(size=(int(rng.integers(3, 8)), int(rng.integers(3, 8)))).astype(
            np.float32
        )
        weight = np.clip(cv2.resize(cells, (width, height), interpolation=cv2.INTER_CUBIC), 0, 1)
    else:
        cell = int(rng.integers(8, 24))
        weight = (((yy // cell) + (xx // cell)) % 2).astype(np.float32)
    # Textures stay low-contrast so that shapes remain the most salient structure.
    other = base + (other - base) * rng.uniform(0.2, 0.5)
    image = base + weight[..., None] * (other - base)
    return image + rng.normal(0, rng.uniform(2, 15), size=image.shape)


def _category_color(rng, category, params):
    """An RGB colour in [0, 255]: any colour, or one from the category's hue band."""
    if params.hue_band is None:
        return _random_color(rng)
    centre = category / len(CATEGORIES)
    hue = (centre + rng.uniform(-0.5, 0.5) * params.hue_band / 360.0) % 1.0
    rgb = colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0))
    return np.asarray(rgb) * 255.0


def _object_color(rng, background_mean, params, category, avoid=()):
    """A colour for ``category`` far from the background mean (and from ``avoid``, if possible)."""
    color = _category_color(rng, category, params)
    for _ in range(50):
        far_from_bg = np.linalg.norm(color - background_mean) >= params.min_color_distance
        far_from_others = all(np.linalg.norm(color - c) >= 50 for c in avoid)
        if far_from_bg and far_from_others:
            break
        color = _category_color(rng, category, params)
    return color


def _paint(image, mask, color, shading):
    """Fills ``mask`` with ``color`` plus a linear shading ramp (same ramp for identical copies)."""
    ys, xs = np.nonzero(mask)
    theta, strength = shading
    ramp = (np.cos(theta) * (xs - xs.mean()) + np.sin(theta) * (ys - ys.mean())) * strength
    image[ys, xs] = color + ramp[:, None]


# ----------------------------------------------------------------------------------------------
# Scenes. ``labels`` is an (H, W) int map: 0 background, k the k-th shape; painting a shape
# overwrites what is under it, so each label's pixels are that shape's visible mask.
# ----------------------------------------------------------------------------------------------
def _occlusion_ok(labels, full_areas, new_mask, params):
    """True if drawing ``new_mask`` on top leaves every earlier shape visible enough."""
    hidden = np.bincount(labels[new_mask > 0].ravel(), minlength=len(full_areas) + 1)
    visible = np.bincount(labels.ravel(), minlength=len(full_areas) + 1)
    for k, full in enumerate(full_areas, start=1):
        left = visible[k] - hidden[k]
        if left < params.min_area or left < params.min_visible_fraction * full:
            return False
    return True


def _mixed_scene(rng, image, labels, params):
    """Random shapes anywhere (also across the border), with partial occlusion."""
    height, width = labels.shape
    bg_mean = image.mean(axis=(0, 1))
    objects, full_areas, colors = [], [], []
    for _ in range(int(rng.integers(params.min_objects, params.max_objects + 1))):
        for _ in range(params.placement_attempts):
            category = int(rng.integers(len(CATEGORIES)))
            radius = rng.uniform(params.min_radius, params.max_radius)
            # Centres anywhere in the image: up to three quarters of a shape can fall outside.
            cx, cy = rng.uniform(0, width - 1), rng.uniform(0, height - 1)
            mask = shape_mask(
                CATEGORIES[category], height, width, cx, cy, radius, rng.uniform(0, 2 * np.pi)
            )
            area = int(mask.sum())
            if area >= params.min_area and _occlusion_ok(labels, full_areas, mask, params):
                break
        else:
            continue  # no room for this shape
        color = _object_color(rng, bg_mean, params, category, avoid=colors)
        _paint(image, mask, color, (rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.8)))
        labels[mask > 0] = len(objects) + 1
        objects.append((category, area))
        full_areas.append(area)
        colors.append(color)
    return objects


def _identical_scene(rng, image, labels, params):
    """Identical copies of one shape, fully inside the image, not touching each other."""
    height, width = labels.shape
    category = int(rng.integers(len(CATEGORIES)))
    radius = rng.uniform(params.min_radius, params.max_identical_radius)
    angle = rng.uniform(0, 2 * np.pi)
    color = _object_color(rng, image.mean(axis=(0, 1)), params, category)
    shading = (rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.8))
    occupied = np.zeros_like(labels, dtype=np.uint8)
    # A 3 px gap keeps the copies separate shapes rather than one merged blob.
    gap = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7))
    objects = []
    for _ in range(int(rng.integers(params.min_copies, params.max_copies + 1))):
        for _ in range(params.placement_attempts):
            cx = rng.uniform(radius + 1, width - radius - 2)
            cy = rng.uniform(radius + 1, height - radius - 2)
            mask = shape_mask(CATEGORIES[category], height, width, cx, cy, radius, angle)
            if not np.any(cv2.dilate(mask, gap) & occupied):
                break
        else:
            continue
        _paint(image, mask, color, shading)
        occupied |= mask
        labels[mask > 0] = len(objects) + 1
        objects.append((category, int(mask.sum())))
    return objects


def render_scene(rng, params, identical):
    """Draws one scene.

    Returns:
        image (H, W, 3) uint8 RGB, labels (H, W) int32 (0 background, k for the k-th shape) and,
        for each shape k, (category index into CATEGORIES, its in-image area before occlusion).
    """
    height = int(rng.integers(params.min_size, params.max_size + 1))
    width = int(rng.integers(params.min_size, params.max_size + 1))
    image = _background(rng, height, width)
    labels = np.zeros((height, width), dtype=np.int32)
    scene = _identical_scene if identical else _mixed_scene
    objects = scene(rng, image, labels, params)
    # Sensor-like noise over everything, then a slight blur so edges are not perfectly crisp.
    image = image + rng.normal(0, rng.uniform(0, 6), size=image.shape)
    image = cv2.GaussianBlur(
        np.clip(image, 0, 255).astype(np.float32), (3, 3), rng.uniform(0.1, 0.8)
    )
    return np.round(image).clip(0, 255).astype(np.uint8), labels, objects


# ----------------------------------------------------------------------------------------------
# COCO output and registration.
# ----------------------------------------------------------------------------------------------
def _annotations_of(labels, objects, image_id, next_ann_id):
    """COCO annotations (RLE, area and bbox computed from the mask) of one scene's visible masks."""
    anns = []
    for k, (category, full_area) in enumerate(objects, start=1):
        mask = np.asfortranarray((labels == k).astype(np.uint8))
        if not mask.any():
            continue
        rle = mask_util.encode(mask)
        area = int(mask_util.area(rle))
        anns.append(
            {
                "id": next_ann_id + len(anns),
                "image_id": image_id,
                "category_id": category + 1,
                "segmentation": {
                    "size": [int(s) for s in rle["size"]],
                    "counts": rle["counts"].decode("ascii"),
                },
                "area": area,
                "bbox": [float(v) for v in mask_util.toBbox(rle)],
                "iscrowd": 0,
                # Extra key: share of the in-image shape left visible by occlusion (1 = none).
                "visible_fraction": round(area / full_area, 4),
            }
        )
    return anns


def _image_seed(seed, split, index):
    # crc32 rather than hash(): Python's str hash is salted per process.
    return [int(seed), zlib.crc32(split.encode("utf-8")), int(index)]


def _write_atomic(path, data):
    with atomic_open(path, "wb") as f:
        f.write(data)


def generate_split(root, split, num_images, seed=0, identical_only=False, params=None):
    """Writes ``num_images`` scenes of ``split`` and their COCO JSON under ``root``.

    Scene i depends only on (seed, split, i, params), so the output is byte-identical across runs.
    The JSON is written last (atomically), so its presence means the split is complete.

    Returns:
        str: the path of the COCO JSON file.
    """
    params = params or SceneParams()
    json_file, image_root = _split_paths(root, split)
    os.makedirs(image_root, exist_ok=True)
    os.makedirs(os.path.dirname(json_file), exist_ok=True)
    images, annotations = [], []
    for index in range(num_images):
        rng = np.random.default_rng(_image_seed(seed, split, index))
        identical = identical_only or rng.uniform() < params.identical_fraction
        image, labels, objects = render_scene(rng, params, identical)
        file_name = f"{index:06d}.png"
        ok, png = cv2.imencode(".png", image[:, :, ::-1])
        if not ok:
            raise RuntimeError(f"OpenCV could not encode image {file_name}")
        _write_atomic(os.path.join(image_root, file_name), png.tobytes())
        h, w = labels.shape
        scene = "identical" if identical else "mixed"
        images.append(
            {"id": index + 1, "file_name": file_name, "height": h, "width": w, "scene": scene}
        )
        annotations += _annotations_of(labels, objects, index + 1, len(annotations) + 1)
    coco = {
        "info": _split_info(split, num_images, seed, identical_only, params),
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CATEGORIES)
        ],
    }
    _write_atomic(json_file, json.dumps(coco, sort_keys=True).encode("utf-8"))
    logger.info(
        "Wrote %d images, %d instances of split %r to %s", num_images, len(annotations), split, root
    )
    return json_file


def _split_info(split, num_images, seed, identical_only, params):
    # No date or path: the annotations must be byte-identical across runs and machines.
    return {
        "description": f"ISDA synthetic shapes, split {split}",
        "generator_version": GENERATOR_VERSION,
        "num_images": num_images,
        "seed": seed,
        "identical_only": identical_only,
        "params": asdict(params),
    }


def _recorded_info(json_file):
    """The ``info`` record of a split's JSON, or None if the file is missing or unreadable."""
    try:
        with open(json_file, "rb") as f:
            return json.load(f).get("info", {})
    except (OSError, ValueError):
        return None


def _is_current(json_file, expected_info):
    """True if ``json_file`` exists and was generated with exactly ``expected_info``."""
    return _recorded_info(json_file) == json.loads(json.dumps(expected_info))


def generate_synthetic_dataset(
    root=None, splits=None, num_images=None, seed=0, params=None, force=False
):
    """Generates the splits that are missing or stale under ``root`` (see :func:`get_synthetic_root`).

    Args:
        splits: split names from DEFAULT_SPLITS (default: ``train`` and ``val``).
        num_images: optional {split: number of images}, overriding DEFAULT_SPLITS sizes.
        seed: base seed; each split and image derives its own stream from it.
        force: regenerate even if an up-to-date split exists.

    Returns:
        dict: {split: COCO JSON path}.
    """
    root = get_synthetic_root(root)
    params = params or SceneParams()
    out = {}
    for split in splits or ("train", "val"):
        spec = DEFAULT_SPLITS[split]
        n = (num_images or {}).get(split, spec.num_images)
        json_file, _ = _split_paths(root, split)
        info = _split_info(split, n, seed, spec.identical_only, params)
        if force or not _is_current(json_file, info):
            generate_split(root, split, n, seed, spec.identical_only, params)
        else:
            logger.info("Reusing split %r in %s", split, root)
        out[split] = json_file
    return out


def _load_split(root, split, name):
    """Dataset dicts of one split. A missing split, or one written by another generator version
    (its scenes no longer match this code), is generated first with the default size; a split of
    this version is used as it is, whatever its size and SceneParams."""
    json_file, image_root = _split_paths(root, split)
    if not os.path.isfile(json_file):
        logger.info("Split %r is missing under %s; generating it", split, root)
        generate_synthetic_dataset(root, splits=[split])
    else:
        version = (_recorded_info(json_file) or {}).get("generator_version")
        if version != GENERATOR_VERSION:
            logger.warning(
                "%s was written by generator version %s, not %d; regenerating split %r",
                json_file,
                version,
                GENERATOR_VERSION,
                split,
            )
            generate_synthetic_dataset(root, splits=[split], force=True)
    return load_coco_json(json_file, image_root, name)


def register_synthetic_datasets(root=None, splits=None):
    """Registers the synthetic splits as ``isda_synth_{split}`` in Detectron2's catalogs.

    Registration is lazy: nothing is read or generated until ``DatasetCatalog.get`` is called,
    which then generates a missing split with its default size. Calling this again (e.g. with
    another ``root``) replaces the earlier registration.

    Returns:
        list[str]: the registered dataset names.
    """
    root = get_synthetic_root(root)
    names = []
    for split in splits or DEFAULT_SPLITS:
        name = dataset_name(split)
        json_file, image_root = _split_paths(root, split)
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        DatasetCatalog.register(name, lambda r=root, s=split, n=name: _load_split(r, s, n))
        MetadataCatalog.get(name).set(
            json_file=json_file,
            image_root=image_root,
            evaluator_type="coco",
            thing_classes=list(CATEGORIES),
            thing_colors=[list(c) for c in CATEGORY_COLORS],
        )
        names.append(name)
    return names


# Like Detectron2's builtin datasets: importing the module registers the default root.
register_synthetic_datasets()
