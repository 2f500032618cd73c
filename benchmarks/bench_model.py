"""Whole-model benchmarks: ISDA against Detectron2's Mask R-CNN R50-FPN, on the same machine and run.

    .venv/bin/python benchmarks/bench_model.py inference [--device cpu] [--repeats 5] [--dtypes ...]
    .venv/bin/python benchmarks/bench_model.py train     [--device cpu] [--repeats 3] [--cases ...]
    .venv/bin/python benchmarks/bench_model.py scaling   [--device cpu] [--plot benchmarks/scaling.png]
    .venv/bin/python benchmarks/bench_model.py compiled  [--device cpu] [--repeats 3]
    .venv/bin/python benchmarks/bench_model.py postprocess [--repeats 5]

Both models use random weights (nothing can be downloaded here) and the same 800 x 1216 image.
Mask R-CNN runs with ROI_HEADS.SCORE_THRESH_TEST 0 so that, like ISDA, it returns 100 masks per image
(with random weights it would otherwise return few and do less mask work).

* inference: the models alternate, one image at a time, under ``torch.inference_mode``: ISDA in
  each of --dtypes (MODEL.ISDA.TEST.DTYPE; same weights) and Mask R-CNN in fp32. The table gives the
  median of --repeats, the per-stage breakdown (forward hooks; ISDA's post-processing is timed
  around ``ISDA.inference``, the remainder is input normalisation, padding masks, position
  encodings and token layout) and the ratios to Mask R-CNN.
* train: one iteration (forward, backward, AdamW step) at batch 1 with 10 ground-truth instances, with
  the same per-stage breakdown of the forward pass, and the peak memory above the level before the
  step. ``isda (released-code loss)`` recomputes all Q masks of all decoder layers with gradient, as
  the authors' code does; ``isda`` (this project) matches without gradient and recomputes only the
  matched masks: the losses are identical (checked), the cost is not. ``isda (checkpointing ...)``
  sets MODEL.ISDA.ACTIVATION_CHECKPOINTING; time and memory ratios are to ``isda``.
* scaling: ISDA inference time and peak memory against the image's short side and the query count.
* compiled: ISDA inference with its deformable transformer under ``torch.compile`` (default inductor
  backend) against eager, same model and image; the compile time is reported apart.
* postprocess: ISDA's mask pasting (``isda.modeling.postprocess.paste_masks``) for 100 masks of a
  800 x 1216 input, each computed only where it can pass the threshold (eager CPU) against every
  mask upsampled over the whole image (the path of recorded graphs and CUDA), at the input size and
  resized to a 480 x 730 original. Random-weight models give masks that cover the whole image, so
  the masks here are noisy discs whose areas spread from 0.1% to 10% of the image, as a trained
  model's do; a set of whole-image masks shows the cost where nothing can be skipped.

Memory (CPU) is measured in a child process per case, with glibc's mmap threshold lowered so freed
blocks leave the RSS: peak RSS (VmHWM, reset through /proc/self/clear_refs) minus the RSS before.
On CUDA it is torch.cuda.max_memory_allocated() above the allocation before the call.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from typing import Callable, Dict, List

import torch
import detectron2
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Instances
from detectron2.utils.events import EventStorage
from isda import add_isda_config
from isda.modeling import postprocess
from isda.modeling.criterion import SetCriterion
from isda.modeling.mask_head import MaskHead
from isda.solver import build_isda_optimizer

# The sibling script (this folder is on sys.path when a script in it runs).
from bench_ms_deform_attn import MMAP_THRESHOLD, describe_machine, peak_memory_mib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ISDA_CONFIG = os.path.join(REPO, "configs", "COCO-InstanceSegmentation", "isda_R_50_12ep.yaml")
MASK_RCNN_CONFIG = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"
IMAGE_HW = (800, 1216)
NUM_GT = 10
ISDA_STAGES = (
    ("backbone", "backbone"),
    ("neck", "neck"),
    ("mask feature head", "mask_feature_head"),
    ("encoder", "transformer.encoder"),
    ("decoder", "transformer.decoder"),
    ("mask head", "mask_head"),
)
# ISDA.inference: top-k, mask products, upsampling, thresholding, boxes.
ISDA_INFERENCE_STAGES = ISDA_STAGES + (("post-processing", "inference"),)
MRCNN_STAGES = (
    ("backbone+FPN", "backbone"),
    ("RPN", "proposal_generator"),
    ("ROI heads", "roi_heads"),
)


# ---------------------------------------------------------------------------------------------
# Models and inputs
# ---------------------------------------------------------------------------------------------
def build_isda(device: str, *opts) -> torch.nn.Module:
    cfg = get_cfg()
    add_isda_config(cfg)
    cfg.merge_from_file(ISDA_CONFIG)
    cfg.merge_from_list(["MODEL.WEIGHTS", "", "MODEL.DEVICE", device, *map(str, opts)])
    return build_model(cfg), cfg


def build_mask_rcnn(device: str) -> torch.nn.Module:
    # The YAML ships inside the detectron2 package; detectron2.model_zoo would find it with
    # pkg_resources, which setuptools >= 81 no longer provides.
    zoo = os.path.join(os.path.dirname(detectron2.__file__), "model_zoo", "configs")
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(zoo, MASK_RCNN_CONFIG))
    cfg.merge_from_list(
        ["MODEL.WEIGHTS", "", "MODEL.DEVICE", device, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]
    )
    return build_model(cfg), cfg


def calibrate_frozen_bn(model: torch.nn.Module, inputs) -> None:
    """Sets every FrozenBN's statistics to those of its input on ``inputs`` (one pass, in order).

    A random ResNet with identity FrozenBN blows activations up layer after layer; Mask R-CNN's RPN
    then scores all anchors alike and keeps ~1 proposal, so its ROI heads would do almost no work.
    With calibrated statistics both models see unit-scale features, the RPN keeps its 1000
    proposals and the ROI heads return 100 detections, the workload of a trained model.
    """

    def set_stats(module, args):
        x = args[0].float()
        module.running_mean.copy_(x.mean((0, 2, 3)))
        module.running_var.copy_(x.var((0, 2, 3)) + module.eps)

    handles = [
        m.register_forward_pre_hook(set_stats)
        for m in model.modules()
        if isinstance(m, FrozenBatchNorm2d)
    ]
    with torch.inference_mode():
        was_training = model.training
        model.eval()
        model(inputs)
        model.train(was_training)
    for h in handles:
        h.remove()


def make_input(hw, device: str, with_gt: bool, seed: int = 0) -> Dict:
    """One Detectron2 input dict; with_gt adds NUM_GT rectangular instances."""
    g = torch.Generator().manual_seed(seed)
    H, W = hw
    sample = {
        "image": torch.randint(0, 256, (3, H, W), generator=g, dtype=torch.uint8),
        "height": H,
        "width": W,
    }
    if with_gt:
        masks = torch.zeros(NUM_GT, H, W, dtype=torch.bool)
        for i in range(NUM_GT):
            y, x = (
                torch.randint(0, H - 200, (1,), generator=g).item(),
                torch.randint(0, W - 200, (1,), generator=g).item(),
            )
            h, w = torch.randint(40, 200, (2,), generator=g).tolist()
            masks[i, y : y + h, x : x + w] = True
        inst = Instances((H, W))
        inst.gt_masks = BitMasks(masks)
        inst.gt_boxes = inst.gt_masks.get_bounding_boxes()
        inst.gt_classes = torch.randint(0, 80, (NUM_GT,), generator=g)
        sample["instances"] = inst
    return sample


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


class StageTimer:
    """Sums the wall time spent inside named submodules (or module lists), through forward hooks,
    and inside named methods of a submodule (e.g. "inference"), through a wrapper."""

    def __init__(self, model, stages, device):
        self.totals, self.device, self.handles = defaultdict(float), device, []
        self.wrapped = []
        for label, path in stages:
            owner, _, name = path.rpartition(".")
            target = getattr(model.get_submodule(owner), name)
            if not isinstance(target, torch.nn.Module):
                self._wrap_method(label, model.get_submodule(owner), name)
                continue
            for m in target if isinstance(target, torch.nn.ModuleList) else [target]:
                self._attach(label, m)

    def _wrap_method(self, label, owner, name):
        method = getattr(owner, name)

        def timed_method(*args, **kwargs):
            _sync(self.device)
            start = time.perf_counter()
            out = method(*args, **kwargs)
            _sync(self.device)
            self.totals[label] += time.perf_counter() - start
            return out

        setattr(owner, name, timed_method)  # an instance attribute shadows the method
        self.wrapped.append((owner, name))

    def _attach(self, label, module):
        def pre(*_):
            _sync(self.device)
            module._bench_start = time.perf_counter()

        def post(*_):
            _sync(self.device)
            self.totals[label] += time.perf_counter() - module._bench_start

        self.handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def reset(self):
        self.totals.clear()

    def remove(self):
        for h in self.handles:
            h.remove()
        for owner, name in self.wrapped:
            delattr(owner, name)


def timed(fn: Callable[[], object], device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _median_ms(values: List[float]) -> float:
    return 1e3 * statistics.median(values)


def stage_rows(name, totals, stage_samples, stages, rest_label):
    """Table rows: the total, then each stage's median and the remainder."""
    total = _median_ms(totals)
    rows = [(name, "total", total)]
    known = 0.0
    for label, _ in stages:
        ms = _median_ms([s.get(label, 0.0) for s in stage_samples])
        known += ms
        rows.append((name, label, ms))
    rows.append((name, rest_label, max(total - known, 0.0)))
    return rows


def print_rows(title, rows, header=("model", "stage", "median ms")):
    print(f"\n{title}")
    print(f"| {header[0]} | {header[1]} | {header[2]} |\n| --- | --- | ---: |")
    for model, stage, ms in rows:
        print(f"| {model} | {stage} | {ms:.1f} |")


# ---------------------------------------------------------------------------------------------
# inference
# ---------------------------------------------------------------------------------------------
def inference_models(device: str, dtypes, hw):
    """-> {label: (model, stages)}: ISDA in each dtype (same weights), then Mask R-CNN, all calibrated
    and in eval mode."""
    x = [make_input(hw, device, with_gt=False)]
    models, isda_state = {}, None
    for dtype in dtypes:
        model, _ = build_isda(device, "MODEL.ISDA.TEST.DTYPE", dtype)
        if isda_state is None:
            calibrate_frozen_bn(model, x)
            isda_state = model.state_dict()
        model.load_state_dict(isda_state)
        models[f"ISDA R50 {dtype}"] = (model.eval(), ISDA_INFERENCE_STAGES)
    mrcnn, _ = build_mask_rcnn(device)
    calibrate_frozen_bn(mrcnn, x)
    models["Mask R-CNN R50-FPN float32"] = (mrcnn.eval(), MRCNN_STAGES)
    return models, x


def bench_inference(args):
    models, x = inference_models(args.device, args.dtypes, args.image_size)
    timers = {name: StageTimer(m, stages, args.device) for name, (m, stages) in models.items()}
    samples = {name: ([], []) for name in models}
    with torch.inference_mode():
        detections = {name: len(m(x)[0]["instances"]) for name, (m, _) in models.items()}
        for _ in range(args.repeats):
            for name, (model, _) in models.items():
                timers[name].reset()
                samples[name][0].append(timed(lambda: model(x), args.device))
                samples[name][1].append(dict(timers[name].totals))
    rows = []
    for name, (_, stages) in models.items():
        rest = "pre-processing + glue" if name.startswith("ISDA") else "pre/post-processing"
        rows += stage_rows(name, *samples[name], stages, rest)
    print_rows(
        f"Inference, 1 image {args.image_size[0]}x{args.image_size[1]}, {args.device}, "
        f"median of {args.repeats}",
        rows,
    )
    print("\n| model | detections | time / Mask R-CNN |\n| --- | ---: | ---: |")
    reference = _median_ms(samples["Mask R-CNN R50-FPN float32"][0])
    for name in models:
        ratio = _median_ms(samples[name][0]) / reference
        print(f"| {name} | {detections[name]} | {ratio:.2f} |")
    print(f"\n{describe_machine()}")


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------
class ReleasedCodeCriterion(SetCriterion):
    """The authors' loss path: every layer rebuilds all Q masks with gradient and weights the
    unmatched ones by zero. Same value as SetCriterion, kept here only as the 'before' of the table.
    """

    def layer_losses(self, logits, kernels, mfr, mfr_images, targets, num_masks):
        all_masks = MaskHead.mask_logits(kernels, mfr)  # (B, Q, h, w), with gradient
        indices = self.matcher(logits, all_masks.detach(), targets)
        total = all_masks.sum() * 0.0
        for b, (q, g) in enumerate(indices):
            weight = torch.zeros(all_masks.shape[1], device=all_masks.device)
            weight[q] = 1.0
            target = torch.zeros_like(all_masks[b])
            target[q] = targets[b]["masks"][g]
            per_query = self.mask_loss_fn(all_masks[b].flatten(1).sigmoid(), target.flatten(1))
            total = total + (weight * per_query).sum()
        return {
            "loss_cls": self.class_weight * self.class_loss(logits, targets, indices) / num_masks,
            "loss_mask": self.mask_weight * total / num_masks,
        }


def train_case(model_name: str, device: str, hw=IMAGE_HW):
    """-> (model, step function, stages) for one train-step case."""
    if model_name.startswith("isda"):
        model, cfg = build_isda(device, *CHECKPOINTING_OPTS.get(model_name, ()))
        if model_name == "isda-released-loss":
            model.criterion.__class__ = ReleasedCodeCriterion
        stages = ISDA_STAGES
    else:
        model, cfg = build_mask_rcnn(device)
        stages = MRCNN_STAGES
    x = [make_input(hw, device, with_gt=True)]
    calibrate_frozen_bn(model, x)
    model.train()
    optimizer = (
        build_isda_optimizer(cfg, model)
        if model_name.startswith("isda")
        else torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    )

    def step():
        with EventStorage():  # Mask R-CNN logs training statistics there
            losses = model(x)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()
        return {k: v.item() for k, v in losses.items()}

    return model, step, stages


TRAIN_NAMES = {
    "isda": "ISDA R50",
    "isda-ckpt-encoder": "ISDA R50 (checkpointing encoder)",
    "isda-ckpt-all": "ISDA R50 (checkpointing encoder + decoder)",
    "isda-released-loss": "ISDA R50 (released-code loss)",
    "mask-rcnn": "Mask R-CNN R50-FPN",
}
CHECKPOINTING_OPTS = {
    "isda-ckpt-encoder": ("MODEL.ISDA.ACTIVATION_CHECKPOINTING", "encoder"),
    "isda-ckpt-all": ("MODEL.ISDA.ACTIVATION_CHECKPOINTING", "encoder_decoder"),
}


def bench_train(args):
    rows, peaks, loss_values, step_ms = [], {}, {}, {}
    for name in args.cases:
        size = [str(v) for v in args.image_size]
        peaks[name] = _child(
            ["train-memory", "--device", args.device, "--case", name, "--image-size", *size]
        )
        torch.manual_seed(0)
        model, step, stages = train_case(name, args.device, args.image_size)
        timer = StageTimer(model, stages, args.device)
        torch.manual_seed(0)
        loss_values[name] = step()  # warm-up; the first step's losses are compared below
        totals, stage_samples = [], []
        for _ in range(args.repeats):
            timer.reset()
            totals.append(timed(step, args.device))
            stage_samples.append(dict(timer.totals))
        step_ms[name] = _median_ms(totals)
        rows += stage_rows(
            TRAIN_NAMES[name], totals, stage_samples, stages, "loss + backward + step"
        )
        del model
    print_rows(
        f"Training iteration, batch 1, {args.image_size[0]}x{args.image_size[1]}, {NUM_GT} GT, fp32, "
        f"{args.device}, "
        f"median of {args.repeats}",
        rows,
    )
    print(
        "\n| model | peak memory above start (MiB) | memory / ISDA | time / ISDA |"
        "\n| --- | ---: | ---: | ---: |"
    )
    for name, peak in peaks.items():
        ratios = (
            f"{peak / peaks['isda']:.2f} | {step_ms[name] / step_ms['isda']:.2f}"
            if "isda" in peaks
            else "- | -"
        )
        print(f"| {TRAIN_NAMES[name]} | {peak:.0f} | {ratios} |")
    for name in loss_values:
        if name.startswith("isda") and name != "isda" and "isda" in loss_values:
            a, b = loss_values["isda"], loss_values[name]
            diff = max(abs(a[k] - b[k]) for k in a)
            print(
                f"First-step losses, {TRAIN_NAMES[name]} vs ISDA R50: max abs difference {diff:.2e}"
            )
    print(f"\n{describe_machine()}")


def _train_memory(args):
    torch.manual_seed(0)
    _, step, _ = train_case(args.case, args.device, args.image_size)
    step()  # allocate optimizer state and caches first
    print(json.dumps(peak_memory_mib(step, args.device)))


# ---------------------------------------------------------------------------------------------
# scaling
# ---------------------------------------------------------------------------------------------
def _scaled_hw(short: int):
    return short, int(round(short * IMAGE_HW[1] / IMAGE_HW[0] / 32)) * 32


def _scaling_point(args):
    """Child: ISDA inference at one (short side, queries); prints {ms, mib}."""
    model, _ = build_isda(
        args.device,
        "MODEL.ISDA.NUM_QUERIES",
        args.queries,
        "MODEL.ISDA.TEST.MAX_PER_IMAGE",
        min(100, args.queries * 80),
    )
    x = [make_input(_scaled_hw(args.short), args.device, with_gt=False)]
    calibrate_frozen_bn(model, x)
    model.eval()
    with torch.inference_mode():
        model(x)
        times = [timed(lambda: model(x), args.device) for _ in range(args.repeats)]
        mib = peak_memory_mib(lambda: model(x), args.device)
    print(json.dumps({"ms": _median_ms(times), "mib": mib}))


def bench_scaling(args):
    points = [(s, 300) for s in args.sizes] + [(800, q) for q in args.queries_list if q != 300]
    results = {}
    print(f"\nISDA inference scaling, fp32, {args.device}, median of {args.repeats}")
    print(
        "| short side | image | queries | median ms | peak MiB |\n| ---: | --- | ---: | ---: | ---: |"
    )
    for short, q in points:
        r = _child(
            [
                "scaling-point",
                "--device",
                args.device,
                "--short",
                str(short),
                "--queries",
                str(q),
                "--repeats",
                str(args.repeats),
            ]
        )
        results[(short, q)] = r
        h, w = _scaled_hw(short)
        print(f"| {short} | {h}x{w} | {q} | {r['ms']:.0f} | {r['mib']:.0f} |", flush=True)
    if args.plot:
        _plot_scaling(results, args)


def _plot_scaling(results, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    sizes = sorted(s for s, q in results if q == 300)
    queries = sorted(q for s, q in results if s == 800)
    for ax, key, label in (
        (axes[0], "ms", "median time (ms)"),
        (axes[1], "mib", "peak memory (MiB)"),
    ):
        ax.plot(
            sizes,
            [results[(s, 300)][key] for s in sizes],
            "o-",
            label="vs short side (300 queries)",
        )
        ax2 = ax.twiny()
        ax2.plot(
            queries,
            [results[(800, q)][key] for q in queries],
            "s--",
            color="tab:orange",
            label="vs queries (short side 800)",
        )
        ax.set_xlabel("image short side (px)")
        ax2.set_xlabel("queries")
        ax.set_ylabel(label)
        ax.legend(loc="upper left", fontsize=8)
        ax2.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"ISDA R50 inference, {args.device}")
    fig.tight_layout()
    fig.savefig(args.plot, dpi=100)
    print(f"\nplot: {args.plot}")


# ---------------------------------------------------------------------------------------------
# compiled
# ---------------------------------------------------------------------------------------------
def bench_compiled(args):
    """ISDA inference, eager against its transformer compiled with torch.compile (eval mode)."""
    model, _ = build_isda(args.device)
    x = [make_input(IMAGE_HW, args.device, with_gt=False)]
    calibrate_frozen_bn(model, x)
    model.eval()
    eager_transformer = model.transformer
    compiled_transformer = torch.compile(eager_transformer)
    with torch.no_grad():
        model.transformer = compiled_transformer
        compile_s = timed(lambda: model(x), args.device)  # the first call compiles
        samples = {"eager": [], "transformer compiled": []}
        for _ in range(args.repeats):
            for name, transformer in (
                ("eager", eager_transformer),
                ("transformer compiled", compiled_transformer),
            ):
                model.transformer = transformer
                samples[name].append(timed(lambda: model(x), args.device))
    rows = [("ISDA R50", name, _median_ms(times)) for name, times in samples.items()]
    print_rows(
        f"Inference, 1 image {IMAGE_HW[0]}x{IMAGE_HW[1]}, fp32, {args.device}, "
        f"median of {args.repeats}",
        rows,
        header=("model", "transformer", "median ms"),
    )
    ratio = _median_ms(samples["eager"]) / _median_ms(samples["transformer compiled"])
    print(f"\nfirst compiled call (compiles): {compile_s:.1f} s; eager / compiled: {ratio:.2f}")


# ---------------------------------------------------------------------------------------------
# post-processing
# ---------------------------------------------------------------------------------------------
def disc_probs(n: int, hw, stride: int, seed: int = 0) -> torch.Tensor:
    """n (H/stride, W/stride) mask probabilities: noisy discs whose areas are log-uniform between
    0.1% and 10% of the image."""
    g = torch.Generator().manual_seed(seed)
    H, W = hw[0] // stride, hw[1] // stride
    area = 10 ** (-3 + 2 * torch.rand(n, 1, 1, generator=g)) * H * W
    radius = (area / torch.pi).sqrt()
    cy, cx = torch.rand(n, 1, 1, generator=g) * H, torch.rand(n, 1, 1, generator=g) * W
    ys, xs = torch.meshgrid(torch.arange(H).float(), torch.arange(W).float(), indexing="ij")
    dist = ((ys - cy) ** 2 + (xs - cx) ** 2).sqrt()
    return (2 * (radius - dist) + 0.5 * torch.randn(n, H, W, generator=g)).sigmoid()


def bench_postprocess(args):
    hw, stride, n = tuple(args.image_size), 4, 100
    sets = {
        "discs, 0.1-10% of the image": disc_probs(n, hw, stride),
        "whole-image masks": torch.rand(n, hw[0] // stride, hw[1] // stride) * 0.2 + 0.45,
    }
    outputs = {"at the input size": hw, "resized to 480 x 730": (480, 730)}
    print(f"\n100 masks, input {hw[0]} x {hw[1]}, stride {stride}, fp32, median of {args.repeats}")
    print("| masks | output | whole (ms) | windowed (ms) | whole / windowed | pixels that differ |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for set_name, probs in sets.items():
        for out_name, out_hw in outputs.items():
            call = (probs, stride, hw, out_hw, 0.5)
            whole = [
                timed(lambda: postprocess._paste_whole(*call), "cpu") for _ in range(args.repeats)
            ]
            windowed = [
                timed(lambda: postprocess.paste_masks(*call), "cpu") for _ in range(args.repeats)
            ]
            differ = int((postprocess._paste_whole(*call) != postprocess.paste_masks(*call)).sum())
            a, b = _median_ms(whole), _median_ms(windowed)
            print(f"| {set_name} | {out_name} | {a:.1f} | {b:.1f} | {a / b:.2f} | {differ} |")


# ---------------------------------------------------------------------------------------------
def _child(argv: List[str]):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD)
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *argv],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def cpu_bf16_support() -> str:
    """The CPU's vector ISA as PyTorch dispatches it, and whether it computes bf16 natively."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
    except (OSError, StopIteration):
        flags = []
    native = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return (
        f"CPU ISA {torch.backends.cpu.get_cpu_capability()}, native bf16: "
        f"{', '.join(native) if native else 'none (bf16 is emulated through fp32)'}"
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "mode",
        choices=[
            "inference",
            "train",
            "scaling",
            "compiled",
            "postprocess",
            "train-memory",
            "scaling-point",
        ],
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--image-size",
        type=int,
        nargs=2,
        default=list(IMAGE_HW),
        metavar=("H", "W"),
        help="inference and train: input size (default: %(default)s)",
    )
    p.add_argument(
        "--dtypes",
        nargs="+",
        default=["float32", "bfloat16"],
        choices=["float32", "bfloat16", "float16"],
        help="inference: ISDA's MODEL.ISDA.TEST.DTYPE values (float16 on CUDA only)",
    )
    p.add_argument(
        "--cases", nargs="+", default=list(TRAIN_NAMES), choices=list(TRAIN_NAMES), help="train"
    )
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 800, 1024, 1333])
    p.add_argument("--queries-list", type=int, nargs="+", default=[100, 300, 900])
    p.add_argument("--plot", default=None, help="scaling: write a PNG plot here")
    p.add_argument("--case", choices=list(TRAIN_NAMES), help=argparse.SUPPRESS)
    p.add_argument("--short", type=int, help=argparse.SUPPRESS)
    p.add_argument("--queries", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if min(args.image_size) < 256:  # the ground-truth rectangles are up to 200 pixels wide
        p.error(f"--image-size {args.image_size}: both sides must be >= 256")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.mode in ("inference", "train", "scaling", "compiled", "postprocess"):
        print(describe_machine())
        print(cpu_bf16_support())
    {
        "inference": bench_inference,
        "train": bench_train,
        "scaling": bench_scaling,
        "compiled": bench_compiled,
        "postprocess": bench_postprocess,
        "train-memory": _train_memory,
        "scaling-point": _scaling_point,
    }[args.mode](args)


if __name__ == "__main__":
    main()
