"""The synthetic shapes dataset: deterministic, valid COCO, varied scenes, registered in Detectron2."""

import colorsys
import filecmp
import json
import os

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from pycocotools.coco import COCO

from isda.data.synthetic import (
    CATEGORIES,
    DEFAULT_SPLITS,
    SceneParams,
    dataset_name,
    generate_split,
    generate_synthetic_dataset,
    get_synthetic_root,
    register_synthetic_datasets,
)

NUM_IMAGES = 24


@pytest.fixture(scope="module")
def train_json(tmp_path_factory):
    """A small mixed split, generated once for the read-only tests of this module."""
    root = tmp_path_factory.mktemp("synth")
    return generate_split(str(root), "train", NUM_IMAGES, seed=0)


@pytest.fixture
def restore_default_registration():
    """Tests that register another root put the default registration back afterwards."""
    yield
    register_synthetic_datasets()


def _load(json_file):
    with open(json_file) as f:
        return json.load(f)


def _masks_by_image(coco):
    masks = {}
    for ann in coco.dataset["annotations"]:
        masks.setdefault(ann["image_id"], []).append(mask_util.decode(ann["segmentation"]))
    return masks


def test_generating_twice_gives_byte_identical_annotations_and_images(tmp_path, train_json):
    again = generate_split(str(tmp_path), "train", NUM_IMAGES, seed=0)
    with open(train_json, "rb") as a, open(again, "rb") as b:
        assert a.read() == b.read()
    image_dir = os.path.join(os.path.dirname(os.path.dirname(train_json)), "train")
    names = sorted(os.listdir(image_dir))
    _, mismatch, errors = filecmp.cmpfiles(image_dir, str(tmp_path / "train"), names, shallow=False)
    assert mismatch == [] and errors == []


def test_another_seed_gives_other_scenes(tmp_path, train_json):
    other = generate_split(str(tmp_path), "train", NUM_IMAGES, seed=1)
    assert _load(other)["annotations"] != _load(train_json)["annotations"]


def test_output_loads_in_pycocotools_with_all_categories(train_json):
    coco = COCO(train_json)
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CATEGORIES)
    assert len(coco.getImgIds()) == NUM_IMAGES
    assert {a["category_id"] for a in coco.dataset["annotations"]} == set(
        range(1, len(CATEGORIES) + 1)
    )


def test_every_mask_is_non_empty_and_matches_its_area_and_bbox(train_json):
    coco = COCO(train_json)
    for ann in coco.dataset["annotations"]:
        img = coco.imgs[ann["image_id"]]
        mask = mask_util.decode(ann["segmentation"])
        assert mask.shape == (img["height"], img["width"])
        assert mask.sum() > 0
        assert ann["area"] == mask.sum()
        ys, xs = np.nonzero(mask)
        expected = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert ann["bbox"] == pytest.approx(expected)
        assert ann["iscrowd"] == 0


def test_visible_masks_of_one_image_do_not_overlap(train_json):
    for masks in _masks_by_image(COCO(train_json)).values():
        assert np.stack(masks).sum(axis=0).max() <= 1


def test_images_on_disk_match_their_entries(train_json):
    import cv2

    image_dir = os.path.join(os.path.dirname(os.path.dirname(train_json)), "train")
    for img in _load(train_json)["images"]:
        pixels = cv2.imread(os.path.join(image_dir, img["file_name"]))
        assert pixels.shape == (img["height"], img["width"], 3)


def test_scenes_include_occlusion_border_contact_and_identical_copies(train_json):
    coco = COCO(train_json)
    anns = coco.dataset["annotations"]
    assert any(a["visible_fraction"] < 0.95 for a in anns), "no partially occluded shape"
    touching = 0
    for a in anns:
        x, y, w, h = a["bbox"]
        img = coco.imgs[a["image_id"]]
        touching += x == 0 or y == 0 or x + w == img["width"] or y + h == img["height"]
    assert touching > 0, "no shape touches the border"
    scenes = [img["scene"] for img in coco.dataset["images"]]
    assert "identical" in scenes and "mixed" in scenes
    assert (
        len({len(coco.getAnnIds(imgIds=[i])) for i in coco.getImgIds()}) > 2
    ), "object counts vary"


def _instance_hues(json_file):
    """(category index, hue in degrees, RGB) of every shape, read back from the written images:
    the median colour of its visible mask, eroded so that blurred edges do not count."""
    coco = COCO(json_file)
    image_dir = os.path.join(os.path.dirname(os.path.dirname(json_file)), "train")
    out = []
    for img_id, img in coco.imgs.items():
        pixels = cv2.imread(os.path.join(image_dir, img["file_name"]))[:, :, ::-1]
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[img_id])):
            core = cv2.erode(mask_util.decode(ann["segmentation"]), np.ones((5, 5), np.uint8))
            if core.sum() < 10:
                continue
            rgb = np.median(pixels[core > 0], axis=0)
            hue = colorsys.rgb_to_hsv(*(rgb / 255.0))[0] * 360
            out.append((ann["category_id"] - 1, hue, rgb))
    return out


def _hue_distance(a, b):
    d = abs(a - b) % 360
    return min(d, 360 - d)


def test_each_category_keeps_to_its_hue_band_while_colours_vary(train_json):
    band = SceneParams().hue_band
    shapes = _instance_hues(train_json)
    assert len(shapes) > 20
    for category, hue, _ in shapes:
        centre = 360 * category / len(CATEGORIES)
        # Shading, noise and blur move the hue a little beyond the drawn band.
        assert _hue_distance(hue, centre) <= band / 2 + 12, (CATEGORIES[category], hue)
    for category in range(len(CATEGORIES)):
        rgbs = np.array([rgb for c, _, rgb in shapes if c == category])
        assert len(rgbs) >= 2 and rgbs.std(0).max() > 15, f"{CATEGORIES[category]}: one colour"


def test_without_hue_band_colours_do_not_follow_the_category(tmp_path):
    json_file = generate_split(
        str(tmp_path), "train", NUM_IMAGES, seed=0, params=SceneParams(hue_band=None)
    )
    shapes = _instance_hues(json_file)
    off_band = [
        _hue_distance(hue, 360 * c / len(CATEGORIES)) > SceneParams().hue_band / 2 + 12
        for c, hue, _ in shapes
    ]
    assert sum(off_band) > len(shapes) / 3


def test_identical_split_holds_only_look_alike_copies(tmp_path):
    json_file = generate_split(str(tmp_path), "identical_val", 12, identical_only=True)
    coco = COCO(json_file)
    for img_id in coco.getImgIds():
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[img_id]))
        assert coco.imgs[img_id]["scene"] == "identical"
        assert len(anns) >= 2
        assert len({a["category_id"] for a in anns}) == 1
        areas = [a["area"] for a in anns]
        # Copies differ only by sub-pixel placement, which changes the pixel count a little.
        assert max(areas) <= 1.2 * min(areas)
        assert all(a["visible_fraction"] == 1.0 for a in anns)


def test_root_follows_detectron2_datasets_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    assert get_synthetic_root() == os.path.join(str(tmp_path), "isda_synth")
    monkeypatch.delenv("DETECTRON2_DATASETS")
    assert get_synthetic_root() == os.path.join("datasets", "isda_synth")
    assert get_synthetic_root("/data/x") == "/data/x"


def test_existing_split_is_reused_and_a_changed_size_regenerates(tmp_path):
    root = str(tmp_path)
    json_file = generate_synthetic_dataset(root, splits=["val"], num_images={"val": 3})["val"]
    stamp = os.stat(json_file).st_mtime_ns
    generate_synthetic_dataset(root, splits=["val"], num_images={"val": 3})
    assert os.stat(json_file).st_mtime_ns == stamp
    generate_synthetic_dataset(root, splits=["val"], num_images={"val": 4})
    assert len(_load(json_file)["images"]) == 4


@pytest.mark.usefixtures("restore_default_registration")
def test_splits_register_in_detectron2_catalogs(tmp_path):
    root = str(tmp_path)
    generate_synthetic_dataset(root, num_images={"train": 4, "val": 3})
    names = register_synthetic_datasets(root)
    assert set(names) == {dataset_name(s) for s in DEFAULT_SPLITS}
    dicts = DatasetCatalog.get(dataset_name("val"))
    assert len(dicts) == 3
    assert all(os.path.isfile(d["file_name"]) and d["annotations"] for d in dicts)
    meta = MetadataCatalog.get(dataset_name("val"))
    assert meta.thing_classes == list(CATEGORIES)
    assert meta.evaluator_type == "coco" and os.path.isfile(meta.json_file)


@pytest.mark.usefixtures("restore_default_registration")
def test_registered_split_missing_on_disk_is_generated_on_first_use(tmp_path):
    register_synthetic_datasets(str(tmp_path), splits=["identical_val"])
    dicts = DatasetCatalog.get(dataset_name("identical_val"))
    assert len(dicts) == DEFAULT_SPLITS["identical_val"].num_images


@pytest.mark.usefixtures("restore_default_registration")
def test_registered_split_of_another_generator_version_is_regenerated(tmp_path):
    root = str(tmp_path)
    json_file = generate_synthetic_dataset(root, splits=["val"], num_images={"val": 2})["val"]
    stale = _load(json_file)
    stale["info"]["generator_version"] -= 1
    with open(json_file, "w") as f:
        json.dump(stale, f)
    register_synthetic_datasets(root, splits=["val"])
    dicts = DatasetCatalog.get(dataset_name("val"))
    assert len(dicts) == DEFAULT_SPLITS["val"].num_images
    assert _load(json_file)["info"]["generator_version"] == stale["info"]["generator_version"] + 1


@pytest.mark.usefixtures("restore_default_registration")
def test_registered_split_of_this_version_is_used_as_written(tmp_path):
    root = str(tmp_path)
    json_file = generate_split(root, "val", 3, params=SceneParams(hue_band=None))
    register_synthetic_datasets(root, splits=["val"])
    assert len(DatasetCatalog.get(dataset_name("val"))) == 3
    assert _load(json_file)["info"]["params"]["hue_band"] is None


@pytest.mark.usefixtures("restore_default_registration")
def test_dataset_dicts_map_to_bitmask_instances(tmp_path):
    generate_synthetic_dataset(str(tmp_path), splits=["val"], num_images={"val": 2})
    register_synthetic_datasets(str(tmp_path), splits=["val"])
    cfg = get_cfg()
    cfg.MODEL.MASK_ON = True
    cfg.INPUT.MASK_FORMAT = "bitmask"
    cfg.INPUT.MIN_SIZE_TRAIN = (128,)
    mapper = DatasetMapper(cfg, is_train=True)
    record = DatasetCatalog.get(dataset_name("val"))[0]
    sample = mapper(record)
    instances = sample["instances"]
    assert len(instances) == len(record["annotations"])
    assert instances.gt_masks.tensor.shape[-2:] == sample["image"].shape[-2:]
    assert instances.gt_masks.tensor.flatten(1).any(dim=1).all()
