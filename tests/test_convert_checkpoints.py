"""Checkpoint conversion (isda.conversion, tools/convert_*.py): Deformable DETR (original release
and MMDetection 2.x) and torchvision ResNet files -> ISDA's Detectron2 state dict.

No real checkpoint can be downloaded here, so each test writes a synthetic file with the exact key
names of its format and random values. The key sets come from two independent places: the mapping
tables (for the reduced-width model used end to end), and hand-written source keys with the shapes
of the real R50 releases (plus torchvision's own ResNet-50 definition), so a wrong table entry fails
a test.
"""

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from isda import add_isda_config
from isda.conversion import (
    coco_thing_ids,
    convert,
    expected_source_shapes,
    load_source,
    source_formats,
)
from isda.weights import UnsafePickleError

REPO = Path(__file__).resolve().parents[1]
BASE = str(REPO / "configs" / "Base-ISDA.yaml")
FORMATS = source_formats()


def _tool(name):
    """A module of tools/ (a folder of scripts, not a package), loaded from its file."""
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cli_main = _tool("checkpoint_cli").main

# Full R50 depth and all 6 + 6 transformer layers (so every index expansion is exercised), but
# narrow.
SMALL = [
    "MODEL.RESNETS.STEM_OUT_CHANNELS", "8",
    "MODEL.RESNETS.RES2_OUT_CHANNELS", "32",
    "MODEL.RESNETS.WIDTH_PER_GROUP", "8",
    "MODEL.ISDA.HIDDEN_DIM", "64",
    "MODEL.ISDA.NUM_QUERIES", "10",
    "MODEL.ISDA.DIM_FEEDFORWARD", "32",
    "MODEL.ISDA.MFR_INNER_DIM", "32",
    "MODEL.ISDA.MFR_OUT_DIM", "64",
]  # fmt: skip
DIM = 64
TR = "bbox_head.transformer."  # prefix of the mmdet transformer keys

# Target keys that no Deformable DETR holds (spec §1, §3, §4).
ISDA_ONLY_PREFIXES = ("neck.lateral.0.", "mask_feature_head.", "mask_head.kernel_branches.")


def build(*opts):
    cfg = get_cfg()
    add_isda_config(cfg)
    cfg.merge_from_file(BASE)
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE, cfg.MODEL.WEIGHTS = "cpu", ""
    torch.manual_seed(0)
    return build_model(cfg).eval()


def shapes_of(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def r50_shapes():
    return shapes_of(build())


@pytest.fixture(scope="module")
def small_shapes():
    return shapes_of(build(*SMALL))


# ------------------------------------------------------------------------------------------------
# Synthetic source files
# ------------------------------------------------------------------------------------------------


def _rand(shape, gen):
    return torch.randn(shape, generator=gen)


def _extras(fmt, src, dim, gen):
    """Keys each real file has that ISDA does not use, written by hand from the public models."""
    if fmt == "ddetr":  # input_proj convs have a bias; 6 views of the shared class/box FFNs
        extra = {f"input_proj.{j}.0.bias": (dim,) for j in range(4)}
        for k in range(6):
            for i, out in enumerate((dim, dim, 4)):
                extra[f"bbox_embed.{k}.layers.{i}.weight"] = (out, dim)
                extra[f"bbox_embed.{k}.layers.{i}.bias"] = (out,)
        out = {k: _rand(s, gen) for k, s in extra.items()}
        for k in range(1, 6):  # one module listed 6 times: the same values
            out[f"class_embed.{k}.weight"] = src["class_embed.0.weight"]
            out[f"class_embed.{k}.bias"] = src["class_embed.0.bias"]
        return out
    # mmdet and torchvision store nn.BatchNorm2d step counters.
    out = {
        k.replace("running_var", "num_batches_tracked"): torch.tensor(7)
        for k in src
        if k.endswith("running_var")
    }
    if fmt == "mmdet":
        for k in range(6):
            for i, o in zip((0, 2, 4), (dim, dim, 4)):
                out[f"bbox_head.reg_branches.{k}.{i}.weight"] = _rand((o, dim), gen)
                out[f"bbox_head.reg_branches.{k}.{i}.bias"] = _rand((o,), gen)
            if k:
                out[f"bbox_head.cls_branches.{k}.weight"] = src["bbox_head.cls_branches.0.weight"]
                out[f"bbox_head.cls_branches.{k}.bias"] = src["bbox_head.cls_branches.0.bias"]
    if fmt == "torchvision":
        c5 = src["layer4.0.downsample.0.weight"].shape[0]
        out["fc.weight"], out["fc.bias"] = _rand((1000, c5), gen), _rand((1000,), gen)
    return out


def synth_state(fmt, target_shapes, dim=DIM, seed=0):
    """A state dict with every key of ``fmt`` (for the model described by ``target_shapes``)."""
    gen = torch.Generator().manual_seed(seed)
    src = {k: _rand(s, gen) for k, s in expected_source_shapes(FORMATS[fmt], target_shapes).items()}
    src.update(_extras(fmt, src, dim, gen))
    return src


def wrap(fmt, state):
    """The file layout of each release around its state dict."""
    if fmt == "ddetr":
        return {"model": state, "epoch": 49}
    if fmt == "mmdet":
        meta = {"mmdet_version": "2.12.0", "CLASSES": ("person", "bicycle"), "epoch": 50}
        return {"meta": meta, "state_dict": state}
    return state


def write(tmp_path, fmt, state, name="src.pth"):
    path = tmp_path / name
    torch.save(wrap(fmt, state), path)
    return path


def run_cli(src, out, *flags, opts=SMALL):
    # Options go before the positionals: everything after them is a config override.
    return cli_main([*flags, "--config-file", BASE, str(src), str(out), *opts], FORMATS, "test")


# ------------------------------------------------------------------------------------------------
# The tables against hand-written facts about the real files
# ------------------------------------------------------------------------------------------------

# A few keys of the real R50 releases with their shapes, from the public model definitions.
KNOWN_SOURCE_KEYS = {
    "ddetr": {
        "backbone.0.body.conv1.weight": (64, 3, 7, 7),
        "backbone.0.body.layer3.5.conv2.weight": (256, 256, 3, 3),
        "backbone.0.body.layer4.0.downsample.1.running_var": (2048,),
        "input_proj.0.0.weight": (256, 512, 1, 1),
        "input_proj.3.0.weight": (256, 2048, 3, 3),
        "input_proj.3.1.bias": (256,),
        "transformer.level_embed": (4, 256),
        "transformer.encoder.layers.5.self_attn.sampling_offsets.weight": (256, 256),
        "transformer.encoder.layers.0.self_attn.attention_weights.bias": (128,),
        "transformer.encoder.layers.2.linear1.weight": (1024, 256),
        "transformer.encoder.layers.2.norm2.bias": (256,),
        "transformer.decoder.layers.5.self_attn.in_proj_weight": (768, 256),
        "transformer.decoder.layers.3.cross_attn.value_proj.weight": (256, 256),
        "transformer.decoder.layers.1.norm3.weight": (256,),
        "transformer.reference_points.weight": (2, 256),
        "query_embed.weight": (300, 512),
        "class_embed.0.weight": (91, 256),
        "class_embed.0.bias": (91,),
    },
    "mmdet": {
        "backbone.conv1.weight": (64, 3, 7, 7),
        "backbone.bn1.running_mean": (64,),
        "backbone.layer2.0.downsample.0.weight": (512, 256, 1, 1),
        "neck.convs.2.conv.weight": (256, 2048, 1, 1),
        "neck.convs.0.gn.weight": (256,),
        "neck.extra_convs.0.conv.weight": (256, 2048, 3, 3),
        "neck.extra_convs.0.gn.bias": (256,),
        TR + "level_embeds": (4, 256),
        TR + "encoder.layers.5.attentions.0.sampling_offsets.bias": (256,),
        TR + "encoder.layers.0.ffns.0.layers.0.0.weight": (1024, 256),
        TR + "encoder.layers.0.ffns.0.layers.1.weight": (256, 1024),
        TR + "encoder.layers.4.norms.1.weight": (256,),
        TR + "decoder.layers.2.attentions.0.attn.in_proj_bias": (768,),
        TR + "decoder.layers.2.attentions.0.attn.out_proj.weight": (256, 256),
        TR + "decoder.layers.5.attentions.1.attention_weights.weight": (128, 256),
        TR + "decoder.layers.0.norms.2.bias": (256,),
        TR + "reference_points.bias": (2,),
        "bbox_head.query_embedding.weight": (300, 512),
        "bbox_head.cls_branches.0.weight": (80, 256),
    },
}


@pytest.mark.parametrize("fmt", ["ddetr", "mmdet"])
def test_table_yields_known_r50_source_keys(fmt, r50_shapes):
    expected = expected_source_shapes(FORMATS[fmt], r50_shapes)
    for key, shape in KNOWN_SOURCE_KEYS[fmt].items():
        assert key in expected, f"{fmt}: the table does not ask for {key}"
        assert expected[key] == shape, f"{fmt}: {key} {expected[key]} != {shape}"
    # 265 backbone tensors (torchvision R50 minus fc and BN counters) + 246 others, all fed.
    assert len(expected) == 511
    _, report = convert({k: torch.empty(s) for k, s in expected.items()}, FORMATS[fmt], r50_shapes)
    assert report.ok, report.errors()
    assert {t for t, _ in report.kept_init} == {
        t for t in r50_shapes if t.startswith(ISDA_ONLY_PREFIXES)
    }


def _torchvision_r50():
    torch.manual_seed(1)
    return torchvision.models.resnet50().state_dict()  # torchvision's own names and shapes


@pytest.mark.parametrize(
    "fmt,prefix,keep_counters",
    [("torchvision", "", True), ("mmdet", "backbone.", True), ("ddetr", "backbone.0.body.", False)],
)
def test_backbone_from_torchvision_definition(fmt, prefix, keep_counters, r50_shapes):
    """The real torchvision ResNet-50 key set, under each format's prefix, fills ISDA's backbone."""
    tv = _torchvision_r50()
    src = {
        prefix + k: v
        for k, v in tv.items()
        if (keep_counters or "num_batches_tracked" not in k)
        and (fmt == "torchvision" or "fc." not in k)
    }
    state, report = convert(src, FORMATS[fmt], r50_shapes)
    backbone = {k for k in r50_shapes if k.startswith("backbone.")}
    assert {t for t, _, _ in report.loaded if t.startswith("backbone.")} == backbone
    assert not report.unused and not report.mismatched
    torch.testing.assert_close(state["backbone.stem.conv1.weight"], tv["conv1.weight"])
    torch.testing.assert_close(state["backbone.res5.2.conv3.weight"], tv["layer4.2.conv3.weight"])
    torch.testing.assert_close(
        state["backbone.res3.0.shortcut.norm.running_mean"],
        tv["layer2.0.downsample.1.running_mean"],
    )
    torch.testing.assert_close(
        state["backbone.res4.5.conv2.norm.weight"], tv["layer3.5.bn2.weight"]
    )
    if fmt == "torchvision":
        assert report.ok
        assert {s for s, _ in report.dropped} == {"fc.weight", "fc.bias"} | {
            k for k in tv if "num_batches_tracked" in k
        }


def test_coco91_to_80_mapping():
    ids = coco_thing_ids()
    assert len(ids) == 80 and ids[0] == 1 and ids[-1] == 90
    assert ids[11] == 13  # "stop sign": id 12 is one of the unused COCO ids
    assert not {0, 12, 26, 29, 30, 45, 66, 68, 69, 71, 83} & set(ids)


# ------------------------------------------------------------------------------------------------
# End to end: synthetic file -> CLI -> DetectionCheckpointer -> values in place
# ------------------------------------------------------------------------------------------------


def _load_converted(path, *opts):
    # A converted file is a training initialisation (neck P2, MFR head and kernel FFN stay at
    # their init): it is loaded as training loads it, in train mode.
    model = build(*SMALL, *opts).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["matching_heuristics"] is False
    incompatible = model.load_state_dict(ckpt["model"], strict=False)
    assert not incompatible.unexpected_keys
    left = set(incompatible.missing_keys)
    # DetectionCheckpointer (what MODEL.WEIGHTS uses) reads the same file.
    DetectionCheckpointer(model).load(str(path))
    return model, before, left


def _param(model, key):
    return model.state_dict()[key]


@pytest.mark.parametrize("fmt", ["ddetr", "mmdet"])
def test_ddetr_conversion_end_to_end(fmt, small_shapes, tmp_path):
    src = synth_state(fmt, small_shapes)
    out = tmp_path / "isda.pth"
    assert run_cli(write(tmp_path, fmt, src), out) == 0
    model, before, left = _load_converted(out)
    # Strict check: exactly the ISDA-only modules stay at their initialisation.
    assert left == {k for k in small_shapes if k.startswith(ISDA_ONLY_PREFIXES)}
    for k in left:
        torch.testing.assert_close(_param(model, k), before[k])
    for target, source in VALUE_PAIRS[fmt]:
        torch.testing.assert_close(_param(model, target), src[source], msg=f"{target} <- {source}")
    _check_query_and_classes(model, src, fmt)


# Hand-written (target, source) pairs; the decoder norms of the original release swap by function.
VALUE_PAIRS = {
    "ddetr": [
        ("transformer.encoder.3.self_attn.value_proj.weight",
         "transformer.encoder.layers.3.self_attn.value_proj.weight"),
        ("transformer.encoder.5.self_attn.sampling_offsets.bias",
         "transformer.encoder.layers.5.self_attn.sampling_offsets.bias"),
        ("transformer.encoder.1.ffn.norm.weight", "transformer.encoder.layers.1.norm2.weight"),
        ("transformer.encoder.1.norm.bias", "transformer.encoder.layers.1.norm1.bias"),
        ("transformer.decoder.2.norm1.weight", "transformer.decoder.layers.2.norm2.weight"),
        ("transformer.decoder.2.norm2.weight", "transformer.decoder.layers.2.norm1.weight"),
        ("transformer.decoder.4.ffn.norm.bias", "transformer.decoder.layers.4.norm3.bias"),
        ("transformer.decoder.5.self_attn.in_proj_weight",
         "transformer.decoder.layers.5.self_attn.in_proj_weight"),
        ("transformer.decoder.0.cross_attn.attention_weights.weight",
         "transformer.decoder.layers.0.cross_attn.attention_weights.weight"),
        ("transformer.level_embed", "transformer.level_embed"),
        ("transformer.reference_points.weight", "transformer.reference_points.weight"),
        ("neck.lateral.1.weight", "input_proj.0.0.weight"),
        ("neck.lateral.3.norm.bias", "input_proj.2.1.bias"),
        ("neck.p6.weight", "input_proj.3.0.weight"),
        ("backbone.res4.3.conv2.weight", "backbone.0.body.layer3.3.conv2.weight"),
        ("backbone.stem.conv1.norm.running_var", "backbone.0.body.bn1.running_var"),
    ],
    "mmdet": [
        ("transformer.encoder.3.self_attn.value_proj.weight",
         TR + "encoder.layers.3.attentions.0.value_proj.weight"),
        ("transformer.encoder.1.ffn.linear2.weight",
         TR + "encoder.layers.1.ffns.0.layers.1.weight"),
        ("transformer.encoder.0.ffn.linear1.bias",
         TR + "encoder.layers.0.ffns.0.layers.0.0.bias"),
        ("transformer.encoder.2.ffn.norm.weight", TR + "encoder.layers.2.norms.1.weight"),
        ("transformer.decoder.4.self_attn.in_proj_weight",
         TR + "decoder.layers.4.attentions.0.attn.in_proj_weight"),
        ("transformer.decoder.4.self_attn.out_proj.bias",
         TR + "decoder.layers.4.attentions.0.attn.out_proj.bias"),
        ("transformer.decoder.1.cross_attn.sampling_offsets.weight",
         TR + "decoder.layers.1.attentions.1.sampling_offsets.weight"),
        ("transformer.decoder.3.norm1.weight", TR + "decoder.layers.3.norms.0.weight"),
        ("transformer.decoder.3.norm2.weight", TR + "decoder.layers.3.norms.1.weight"),
        ("transformer.decoder.3.ffn.norm.weight", TR + "decoder.layers.3.norms.2.weight"),
        ("transformer.level_embed", TR + "level_embeds"),
        ("transformer.reference_points.bias", TR + "reference_points.bias"),
        ("neck.lateral.2.weight", "neck.convs.1.conv.weight"),
        ("neck.lateral.1.norm.weight", "neck.convs.0.gn.weight"),
        ("neck.p6.norm.bias", "neck.extra_convs.0.gn.bias"),
        ("backbone.res2.0.shortcut.weight", "backbone.layer1.0.downsample.0.weight"),
        ("backbone.res5.1.conv3.norm.bias", "backbone.layer4.1.bn3.bias"),
    ],
}  # fmt: skip


def _check_query_and_classes(model, src, fmt):
    q_src = src["query_embed.weight" if fmt == "ddetr" else "bbox_head.query_embedding.weight"]
    q = model.query_embedding.weight
    # [query_pos | target] in both: the first DIM columns feed the reference points.
    torch.testing.assert_close(q[:, :DIM], q_src[:, :DIM])
    torch.testing.assert_close(q[:, DIM:], q_src[:, DIM:])
    head = model.mask_head.class_branches[0]
    if fmt == "ddetr":
        w, b = src["class_embed.0.weight"], src["class_embed.0.bias"]
        # Contiguous class 0 = person (id 1), 11 = stop sign (id 13), 79 = toothbrush (id 90).
        for k, coco_id in [(0, 1), (11, 13), (79, 90)]:
            torch.testing.assert_close(head.bias[k], b[coco_id])
            torch.testing.assert_close(head.weight[k], w[coco_id])
    else:
        torch.testing.assert_close(head.bias, src["bbox_head.cls_branches.0.bias"])
        torch.testing.assert_close(head.weight[7], src["bbox_head.cls_branches.0.weight"][7])


def test_unshared_class_heads_take_each_layer(small_shapes, tmp_path):
    opts = (*SMALL, "MODEL.ISDA.SHARE_HEADS_ACROSS_LAYERS", "False")
    shapes = shapes_of(build(*opts))
    src = synth_state("mmdet", shapes)
    for k in range(6):  # a box-refine style file: 6 different class FCs
        src[f"bbox_head.cls_branches.{k}.bias"] = torch.full((80,), float(k))
    out = tmp_path / "isda.pth"
    assert run_cli(write(tmp_path, "mmdet", src), out, opts=opts) == 0
    model, _, _ = _load_converted(out, "MODEL.ISDA.SHARE_HEADS_ACROSS_LAYERS", "False")
    for k in range(6):
        assert torch.all(model.mask_head.class_branches[k].bias == k)


def test_torchvision_converter_script(small_shapes, tmp_path):
    """The script as a user runs it: a fresh process that imports the installed package."""
    src = synth_state("torchvision", small_shapes)
    out = tmp_path / "isda.pth"
    script = REPO / "tools" / "convert_torchvision_resnet.py"
    args = ["--config-file", BASE, str(write(tmp_path, "torchvision", src)), str(out), *SMALL]
    proc = subprocess.run(
        [sys.executable, str(script), *args],
        cwd=tmp_path,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert "fc.weight  (ImageNet classifier)" in text and "0 errors" in text
    model, _, left = _load_converted(out)
    assert left == {k for k in small_shapes if not k.startswith("backbone.")}
    torch.testing.assert_close(
        _param(model, "backbone.res3.2.conv1.weight"), src["layer2.2.conv1.weight"]
    )


# ------------------------------------------------------------------------------------------------
# Broken files: clear report, non-zero exit, nothing written
# ------------------------------------------------------------------------------------------------


def _broken(fmt, small_shapes, edit):
    src = synth_state(fmt, small_shapes)
    edit(src)
    return src


BREAKAGES = {
    "missing": (
        "mmdet",
        lambda s: s.pop(TR + "decoder.layers.3.norms.1.weight"),
        ["MISSING SOURCE KEYS (1)", TR + "decoder.layers.3.norms.1.weight"],
    ),
    "renamed": (
        "ddetr",
        lambda s: s.__setitem__(
            "transformer.encoder.layers.2.norm_1.weight",
            s.pop("transformer.encoder.layers.2.norm1.weight"),
        ),
        ["UNMAPPED SOURCE KEYS (1)", "transformer.encoder.layers.2.norm_1.weight"],
    ),
    "shape": (
        "ddetr",
        lambda s: s.__setitem__("query_embed.weight", torch.zeros(7, 2 * DIM)),
        ["SHAPE MISMATCHES source -> target (1)", "query_embed.weight (7, 128)"],
    ),
    "classes": (
        "mmdet",
        lambda s: s.__setitem__("bbox_head.cls_branches.0.weight", torch.zeros(91, DIM)),
        ["bbox_head.cls_branches.0.weight (91, 64) -> mask_head.class_branches.0.weight (80, 64)"],
    ),
}


@pytest.mark.parametrize("case", sorted(BREAKAGES))
def test_broken_checkpoint_is_reported_not_loaded(case, small_shapes, tmp_path, capsys):
    fmt, edit, expected_lines = BREAKAGES[case]
    src = write(tmp_path, fmt, _broken(fmt, small_shapes, edit))
    out = tmp_path / "isda.pth"
    assert run_cli(src, out) == 1
    captured = capsys.readouterr()
    for line in expected_lines:
        assert line in captured.out
    assert "nothing written" in captured.err
    assert not out.exists()
    # --allow-partial writes what did convert, and says so.
    assert run_cli(src, out, "--allow-partial") == 0
    assert "PARTIAL" in capsys.readouterr().out and out.exists()


def test_pickled_objects_are_refused_with_an_explanation(small_shapes, tmp_path, capsys):
    # The original release stores its argparse.Namespace next to the weights.
    state = synth_state("ddetr", small_shapes)
    path = tmp_path / "r50_deformable_detr-checkpoint.pth"
    torch.save({"model": state, "args": argparse.Namespace(lr=2e-4)}, path)
    with pytest.raises(UnsafePickleError, match="refused, because it pickles Python objects"):
        load_source(str(path))
    out = tmp_path / "isda.pth"
    assert run_cli(path, out) == 2
    assert "--unsafe-pickle" in capsys.readouterr().err and not out.exists()
    assert run_cli(path, out, "--unsafe-pickle") == 0


def test_an_interrupted_write_leaves_no_output(small_shapes, tmp_path, monkeypatch, capsys):
    src = write(tmp_path, "mmdet", synth_state("mmdet", small_shapes))
    out = tmp_path / "isda.pth"

    def disk_full(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        run_cli(src, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.pth"]


def test_unknown_layout_is_refused(tmp_path, capsys):
    path = tmp_path / "other.pth"
    torch.save({"state_dict": {"foo.weight": torch.zeros(2)}}, path)
    assert run_cli(path, tmp_path / "isda.pth") == 2
    assert "unknown checkpoint layout" in capsys.readouterr().err


def _cfg(path):
    cfg = get_cfg()
    add_isda_config(cfg)
    cfg.merge_from_file(str(REPO / "configs" / "COCO-InstanceSegmentation" / path))
    return cfg


def test_ddetr_init_config_is_42ep_plus_converted_weights():
    cfg, base = _cfg("isda_R_50_42ep_ddetr_init.yaml"), _cfg("isda_R_50_42ep.yaml")
    assert cfg.MODEL.WEIGHTS == "checkpoints/isda_r50_from_mmdet_ddetr.pth"
    base.MODEL.WEIGHTS = cfg.MODEL.WEIGHTS
    assert cfg == base
