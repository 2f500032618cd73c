"""Failure behaviour, data: every bad sample is either used correctly or skipped with one warning
that names the file and the reason, and the skips are counted (README "Failure behaviour")."""

import json
import logging
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.modeling import build_model
from PIL import Image

from conftest import REPO, TINY_CONFIG, tiny_cfg
from isda.data import ISDADatasetMapper
from isda.data.sample_checks import check_dataset_categories
from isda.engine import SkippedImageFilter

CATEGORY_IDS = (3, 7, 11)  # not contiguous, on purpose
OBJECT = (10, 12, 40, 36)  # x0, y0, x1, y1 of the bright square in every readable image
BRIGHT, DARK = 220, 30
SQUARE = [[10, 12, 40, 12, 40, 36, 10, 36]]
UNREADABLE = {  # file -> the words its warning must contain
    "corrupt.jpg": "cannot decode",
    "truncated.png": "cannot decode",
    "missing.png": "file not found",
    "exif_unrotated_record.jpg": "EXIF",
    "too_thin.png": "aspect ratio",
}


def _scene(h=48, w=64):
    image = np.full((h, w), DARK, np.uint8)
    x0, y0, x1, y1 = OBJECT
    image[y0:y1, x0:x1] = BRIGHT
    return image


def _write_images(root: Path) -> dict:
    """Writes every image kind; returns file -> (width, height) of its record."""
    gray = _scene()
    rgb = np.stack([gray] * 3, -1)
    Image.fromarray(rgb).save(root / "good.png")
    Image.fromarray(rgb).save(root / "good.jpg", quality=95)
    Image.fromarray(gray).save(root / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full_like(gray, 128)])).save(root / "rgba.png")
    Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE).save(root / "palette.png")
    cv2.imwrite(str(root / "gray16.png"), gray.astype(np.uint16) * 257)
    _write_exif_rotated(root / "exif.jpg", rgb)
    _write_exif_rotated(root / "exif_unrotated_record.jpg", rgb)
    Image.fromarray(rgb[:20, :24]).save(root / "tiny.png")
    wide = np.full((16, 1200, 3), DARK, np.uint8)
    wide[2:14, 100:300] = BRIGHT
    Image.fromarray(wide).save(root / "wide.png")
    Image.fromarray(np.full((2, 600, 3), DARK, np.uint8)).save(root / "too_thin.png")
    for name in ("empty.png", "crowd.png", "degenerate.png"):
        Image.fromarray(rgb).save(root / name)
    sizes = {p.name: Image.open(p).size for p in root.iterdir()}
    (root / "corrupt.jpg").write_bytes(b"this is not a jpeg")
    (root / "truncated.png").write_bytes((root / "good.png").read_bytes()[:-40])
    sizes.update({"corrupt.jpg": (64, 48), "truncated.png": (64, 48), "missing.png": (64, 48)})
    sizes["exif.jpg"] = (64, 48)  # displayed size; exif_unrotated_record.jpg keeps the stored one
    return sizes


def _write_exif_rotated(path: Path, rgb: np.ndarray) -> None:
    """Stores the scene rotated by 90 degrees with EXIF orientation 8, which rotates it back."""
    exif = Image.Exif()
    exif[274] = 8  # displayed = stored rotated by 90 degrees counter-clockwise
    Image.fromarray(np.ascontiguousarray(np.rot90(rgb, k=-1))).save(path, exif=exif, quality=95)


def _annotations(name: str, cat: int) -> list:
    poly = {"segmentation": SQUARE, "bbox": [10, 12, 30, 24], "category_id": cat, "iscrowd": 0}
    if name == "empty.png":
        return []
    if name == "wide.png":
        return [
            dict(poly, segmentation=[[100, 2, 300, 2, 300, 14, 100, 14]], bbox=[100, 2, 200, 12])
        ]
    if name == "crowd.png":
        return [poly, dict(poly, iscrowd=1, segmentation=[[0, 0, 8, 0, 8, 8, 0, 8]])]
    if name == "degenerate.png":
        collinear = [[0, 0, 10, 10, 20, 20]]
        bowtie = [[44, 4, 60, 20, 60, 4, 44, 20]]  # self-intersecting: rasterised even-odd
        return [poly, dict(poly, segmentation=collinear), dict(poly, segmentation=bowtie)]
    return [poly]


@pytest.fixture(scope="module")
def bad_dataset(tmp_path_factory):
    """A COCO-format dataset with every troublesome kind of sample, registered as
    isda_bad_train / isda_bad_val; category ids 3, 7, 11."""
    root = tmp_path_factory.mktemp("bad_dataset")
    images = root / "images"
    images.mkdir()
    sizes = _write_images(images)
    coco = {"images": [], "annotations": [], "categories": []}
    coco["categories"] = [{"id": c, "name": f"class{c}"} for c in CATEGORY_IDS]
    for image_id, (name, (w, h)) in enumerate(sorted(sizes.items()), start=1):
        coco["images"].append({"id": image_id, "file_name": name, "width": w, "height": h})
        cat = CATEGORY_IDS[image_id % len(CATEGORY_IDS)]
        for anno in _annotations(name, cat):
            anno.update(id=len(coco["annotations"]) + 1, image_id=image_id, area=720.0)
            coco["annotations"].append(anno)
    json_file = root / "annotations.json"
    json_file.write_text(json.dumps(coco))
    for split in ("train", "val"):
        name = f"isda_bad_{split}"
        if name not in DatasetCatalog.list():
            register_coco_instances(name, {}, str(json_file), str(images))
    return root


def _records():
    return {Path(r["file_name"]).name: r for r in DatasetCatalog.get("isda_bad_train")}


def _mapper(is_train=True, *opts):
    return ISDADatasetMapper(tiny_cfg("MODEL.ISDA.NUM_CLASSES", 3, *opts), is_train=is_train)


def _assert_mask_on_the_bright_object(out):
    image = out["image"].float().mean(0)  # (H, W)
    mask = out["instances"].gt_masks.tensor[0]
    assert mask.shape == image.shape and mask.any()
    assert image[mask].mean() > (BRIGHT + DARK) / 2 > image[~mask].mean()


@pytest.mark.parametrize(
    "name", ["good.jpg", "gray.png", "rgba.png", "palette.png", "gray16.png", "exif.jpg"]
)
def test_image_modes_are_read_as_rgb_with_masks_on_their_objects(bad_dataset, name):
    record = _records()[name]
    out = _mapper()(record)
    image = out["image"]
    assert image.dtype == torch.uint8 and image.shape[0] == 3
    channels = image.int()
    assert (channels - channels[0]).abs().max() <= 3  # a gray scene stays gray (JPEG: +-3)
    _assert_mask_on_the_bright_object(out)
    assert out["instances"].gt_classes.tolist() == [record["annotations"][0]["category_id"]]


@pytest.mark.parametrize("name", ["tiny.png", "wide.png"])
def test_tiny_and_elongated_images_are_resized_and_train(bad_dataset, name):
    out = _mapper()(_records()[name])
    _assert_mask_on_the_bright_object(out)
    assert max(out["image"].shape[1:]) <= 192  # INPUT.MAX_SIZE_TRAIN of the tiny config
    model = build_model(tiny_cfg("MODEL.ISDA.NUM_CLASSES", 3)).train()
    losses = model([out])
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("name,reason", sorted(UNREADABLE.items()))
def test_unusable_images_are_skipped_with_one_warning_naming_file_and_reason(
    bad_dataset, caplog, name, reason
):
    mapper, record = _mapper(), _records()[name]
    with caplog.at_level(logging.WARNING):
        assert mapper(record) is None  # Detectron2's MapDataset then draws another index
        assert mapper(record) is None
    warnings = [r.getMessage() for r in caplog.records if name in r.getMessage()]
    assert len(warnings) == 1 and reason in warnings[0], warnings
    # The count travels with the next good sample to the main process.
    good = mapper(_records()["good.png"])
    assert good[ISDADatasetMapper.ISSUES_KEY] == {"skipped_images": 2}


def test_evaluation_drops_unreadable_images_instead_of_substituting_others(bad_dataset):
    mapper = _mapper(False)
    batches = [[mapper(r)] for r in DatasetCatalog.get("isda_bad_val")]
    marked = [b[0]["file_name"] for b in batches if ISDADatasetMapper.SKIP_KEY in b[0]]
    assert sorted(Path(f).name for f in marked) == sorted(UNREADABLE)
    kept = list(SkippedImageFilter(batches, "isda_bad_val"))
    assert len(kept) == len(batches) - len(UNREADABLE)
    assert all("image" in b[0] for b in kept)


def test_degenerate_polygons_are_dropped_and_self_intersecting_ones_kept(bad_dataset, caplog):
    record = _records()["degenerate.png"]
    two_points = dict(
        record["annotations"][0], segmentation=[[1, 1, 30, 30]]
    )  # pycocotools: a box!
    outside = dict(record["annotations"][0], segmentation=[[200, 200, 220, 200, 220, 220]])
    no_mask = {k: v for k, v in record["annotations"][0].items() if k != "segmentation"}
    record = dict(record, annotations=record["annotations"] + [two_points, outside, no_mask])
    mapper = _mapper()
    with caplog.at_level(logging.WARNING):
        out = mapper(record)
    assert len(out["instances"]) == 2  # the square and the bowtie
    assert out[ISDADatasetMapper.ISSUES_KEY] == {"dropped_annotations": 4}
    (warning,) = [r.getMessage() for r in caplog.records if "degenerate.png" in r.getMessage()]
    for reason in ("fewer than 3 points", "zero area", "no segmentation"):
        assert reason in warning


def test_crowd_annotations_are_ignored_in_training(bad_dataset):
    record = _records()["crowd.png"]
    assert len(record["annotations"]) == 2
    out = _mapper()(record)
    assert len(out["instances"]) == 1
    _assert_mask_on_the_bright_object(out)


def test_crops_that_remove_every_instance_train_as_background(tiny_data_root, monkeypatch):
    """A small object in a corner and small crops: the mapper redraws the crop, and when every
    draw misses the object the sample trains as all-background; no instance survives with an
    empty box, and every surviving one keeps its class."""
    image = np.full((200, 200, 3), DARK, np.uint8)
    image[0:40, 0:40] = BRIGHT
    anno = {"segmentation": [[0, 0, 40, 0, 40, 40, 0, 40]], "bbox": [0, 0, 40, 40], "bbox_mode": 1}
    record = {"file_name": "corner.png", "height": 200, "width": 200}
    record["annotations"] = [dict(anno, category_id=2)]
    opts = ("INPUT.CROP.ENABLED", True, "INPUT.CROP.SIZE", (20, 30))
    mapper = ISDADatasetMapper(tiny_cfg(*opts, "INPUT.ISDA.CROP_PRE_RESIZE", (200,)), is_train=True)
    mapper.policies = [mapper.policies[1]] * 2  # the crop policy only, with redraws allowed
    monkeypatch.setattr("isda.data.dataset_mapper.read_image_checked", lambda *_: image)
    np.random.seed(0)
    outs = [mapper(record) for _ in range(20)]
    counts = [len(o["instances"]) for o in outs]
    assert 0 in counts and 1 in counts
    for o in outs:
        inst = o["instances"]
        assert (inst.gt_boxes.area() > 0).all() and (inst.gt_classes == 2).all()
        # Boxes and masks went through the same (last drawn) crop, not several.
        has_mask = inst.gt_masks.tensor.flatten(1).any(1)
        mask_boxes = inst.gt_masks.get_bounding_boxes().tensor[has_mask]
        assert torch.allclose(mask_boxes, inst.gt_boxes.tensor[has_mask], atol=2)
    model = build_model(tiny_cfg()).train()
    empty = next(o for o in outs if len(o["instances"]) == 0)
    assert all(torch.isfinite(v) for v in model([empty]).values())


def test_non_contiguous_category_ids_map_to_contiguous_classes(bad_dataset):
    meta = MetadataCatalog.get("isda_bad_train")
    assert meta.thing_dataset_id_to_contiguous_id == {3: 0, 7: 1, 11: 2}
    dicts = DatasetCatalog.get("isda_bad_train")
    check_dataset_categories(dicts, ["isda_bad_train"], 3)
    with pytest.raises(ValueError, match="NUM_CLASSES=5"):
        check_dataset_categories(dicts, ["isda_bad_train"], 5)


def test_raw_category_ids_fail_before_training_naming_the_key(bad_dataset):
    """A custom loader that forgot the contiguous mapping must not train id 7 as another class."""
    raw = {
        name: dict(r, annotations=[dict(a, category_id=7) for a in r["annotations"]])
        for name, r in _records().items()
    }
    with pytest.raises(ValueError, match=r"ids \[7\].*NUM_CLASSES=3"):
        check_dataset_categories(raw.values(), ["my_raw_dataset"], 3)
    with pytest.raises(RuntimeError, match="good.png.*category_id 7"):
        _mapper()(raw["good.png"])


def test_an_unexpected_mapper_error_names_the_file(bad_dataset):
    mapper = _mapper()
    mapper._augment = lambda *_: (_ for _ in ()).throw(ZeroDivisionError("boom"))
    with pytest.raises(RuntimeError, match=r"good\.png.*boom"):
        mapper(_records()["good.png"])


def test_train_net_survives_the_bad_dataset_and_counts_the_skips(bad_dataset, tmp_path):
    """A real train_net.py run (train + COCO evaluation) on the bad dataset, registered the way the
    README tells users to: every unusable file is named once per pass, with its reason."""
    driver = tmp_path / "train_bad.py"
    driver.write_text(textwrap.dedent(f"""
            import sys
            sys.path.insert(0, {str(REPO)!r})
            from detectron2.data.datasets import register_coco_instances
            import train_net
            for split in ("train", "val"):
                register_coco_instances(
                    f"isda_bad_{{split}}", {{}}, {str(bad_dataset / 'annotations.json')!r},
                    {str(bad_dataset / 'images')!r},
                )
            train_net.invoke_main()
            """))
    args = [
        "--config-file",
        TINY_CONFIG,
        "MODEL.ISDA.NUM_CLASSES",
        3,
        "OUTPUT_DIR",
        tmp_path / "out",
    ]
    args += ["DATASETS.TRAIN", "('isda_bad_train',)", "DATASETS.TEST", "('isda_bad_val',)"]
    args += ["SOLVER.MAX_ITER", 12, "SOLVER.CHECKPOINT_PERIOD", 100, "MODEL.ISDA.NUM_QUERIES", 10]
    args += ["SEED", 1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, str(driver), *map(str, args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    for name, reason in UNREADABLE.items():
        lines = [l for l in log.splitlines() if "WARNING" in l and f"{name}: skipped" in l]
        assert 1 <= len(lines) <= 2, (name, lines)  # at most once in training, once in evaluation
        assert all(reason in l for l in lines)
    assert re.search(rf"Evaluation on isda_bad_val skipped {len(UNREADABLE)} unreadable", log)
    assert re.search(r"Data issues in this run.*: [1-9]\d* image\(s\) skipped", log), log[-3000:]
    metrics = [json.loads(l) for l in (tmp_path / "out" / "metrics.json").read_text().splitlines()]
    assert any(m.get("data/skipped_images", 0) >= 1 for m in metrics)
    assert "copypaste: Task: segm" in log
