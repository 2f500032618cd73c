"""Is this installation right? ``python -m isda.check [--json FILE]``.

Prints the environment (Python, torch and its CUDA, torchvision, Detectron2 and whether its ``_C``
loads, isda; the op library's path, CPU build and compiled CUDA architectures; the visible GPUs and
whether the library covers them), then checks every deformable-attention implementation that can
run here against the float64 reference, forward and backward, on three shapes (the encoder's
among them), runs one tiny-model inference per device, and ends with one table. The exit status is
0 only when every case passes; quote the whole output in a bug report.

``ISDA_CHECK_FAULT=corrupt-cpu`` perturbs the native CPU kernel's result inside this check only,
so that the failure path can be seen to work (the check must then exit 1).
"""

from __future__ import annotations

import argparse
import importlib
from importlib import metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

FAULT_ENV = "ISDA_CHECK_FAULT"
# Level sizes (H, W) of the shapes checked: a small one, one with a 1-pixel level and locations
# outside the map, and the encoder's four levels (strides 8..64 of a 320 x 480 image, R50 widths).
SHAPES: Dict[str, dict] = {
    "small": dict(batch=1, heads=2, dim=4, levels=[(5, 7), (3, 4)], queries=6, points=2),
    "edges": dict(
        batch=2, heads=3, dim=3, levels=[(6, 5), (1, 1), (2, 9)], queries=5, points=3, spill=0.3
    ),
    "encoder": dict(
        batch=1, heads=8, dim=32, levels=[(40, 60), (20, 30), (10, 15), (5, 8)], points=4
    ),
}
# Largest |error| / max|reference| accepted, per dtype (forward, gradients). Half types round
# value to 11 / 8 bits; the kernels accumulate in fp32.
TOLERANCES = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (3e-5, 1e-4),
    torch.float16: (5e-3, 1e-2),
    torch.bfloat16: (3e-2, 6e-2),
}


@dataclass
class Case:
    name: str
    ok: bool
    error: Optional[float]  # relative max error, or None where no number applies
    tolerance: Optional[float]
    detail: str = ""


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", None) or metadata.version(
            module
        )
    except (ImportError, metadata.PackageNotFoundError) as e:
        return f"missing ({e})"


def _detectron2_c() -> str:
    try:
        importlib.import_module("detectron2._C")
        return "loads"
    except ImportError as e:
        return f"absent ({str(e).splitlines()[0][:80]}); pycocotools evaluation, as designed"


def find_cuobjdump(cuda_home: Optional[str] = None) -> Optional[str]:
    """cuobjdump on PATH, in ``cuda_home`` (default: torch's CUDA_HOME), or from the
    ``nvidia-cuda-cuobjdump`` wheel; None when there is none."""
    from torch.utils.cpp_extension import CUDA_HOME

    cuda_home = cuda_home or CUDA_HOME
    found = [shutil.which("cuobjdump")]
    found += [os.path.join(cuda_home, "bin", "cuobjdump")] if cuda_home else []
    for base in sys.path:
        found += [os.path.join(base, "nvidia", sub, "bin", "cuobjdump") for sub in ("cu13", "cu12")]
    return next((f for f in found if f and os.path.isfile(f)), None)


def compiled_cuda_archs(library: str, cuda_home: Optional[str] = None) -> Optional[List[str]]:
    """The sm_XX of the cubins and compute_XX of the PTX in ``library``, None when cuobjdump is not
    available to read them. (cuobjdump names a PTX file after its arch as sm_XX too.)"""
    tool = find_cuobjdump(cuda_home)
    if tool is None:
        return None
    archs = []
    for kind in ("elf", "ptx"):
        out = subprocess.run([tool, f"--list-{kind}", library], capture_output=True, text=True)
        for code in sorted(set(re.findall(r"\.sm_(\d+a?)\.", out.stdout))):
            archs.append(f"{'sm' if kind == 'elf' else 'compute'}_{code}")
    return archs


def _covers(archs: Sequence[str], major: int, minor: int) -> bool:
    """Whether a GPU of compute capability major.minor runs code with these archs: a cubin of the
    same major and no newer minor, or PTX of an older or equal capability (JIT-compiled)."""
    cc = major * 10 + minor
    for arch in archs:
        kind, code = arch.split("_")
        num = int(code.rstrip("a"))
        if kind == "sm" and num // 10 == major and num <= cc:
            return True
        if kind == "compute" and num <= cc:
            return True
    return False


def environment() -> Dict[str, object]:
    """Everything a bug report needs to know about this installation."""
    from .layers import msda_native

    env: Dict[str, object] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torchvision": _version("torchvision"),
        "detectron2": _version("detectron2"),
        "detectron2._C": _detectron2_c(),
        "isda": _version("isda"),
        "cpu_threads": torch.get_num_threads(),
    }
    if msda_native.load_extension() is None:
        env["op_library"] = "not built: the reference path runs everywhere"
        return env
    library = msda_native.op_library_path()
    env["op_library"] = library
    env["op_cpu_build"] = msda_native.cpu_kernel_build()
    env["op_cuda_kernels"] = msda_native.has_kernel("cuda")
    archs = compiled_cuda_archs(library) if env["op_cuda_kernels"] else []
    env["op_cuda_archs"] = archs if archs is not None else "unknown (no cuobjdump)"
    gpus = []
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        covered = None if archs is None else _covers(archs, major, minor)
        gpus.append(
            {"index": i, "name": torch.cuda.get_device_name(i), "capability": f"{major}.{minor}"}
            | {"covered": covered}
        )
    env["gpus"] = gpus
    return env


def _inputs(shape: dict, dtype: torch.dtype, device: str, seed: int):
    """Random op inputs of ``shape`` (see SHAPES); queries default to S (the encoder's self-
    attention). Locations spill ``spill`` beyond [0, 1] to exercise the zero padding."""
    g = torch.Generator().manual_seed(seed)
    levels = torch.tensor(shape["levels"], dtype=torch.int64)
    sizes = levels.prod(1)
    start = torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1]))
    n, m, d, p = shape["batch"], shape["heads"], shape["dim"], shape["points"]
    s, nl = int(sizes.sum()), len(shape["levels"])
    q = shape.get("queries", s)
    spill = shape.get("spill", 0.0)
    value = torch.randn(n, s, m, d, generator=g, dtype=torch.float64)
    loc = torch.rand(n, q, m, nl, p, 2, generator=g, dtype=torch.float64) * (1 + 2 * spill) - spill
    weights = torch.rand(n, q, m, nl, p, generator=g, dtype=torch.float64)
    weights = weights / weights.sum((-1, -2), keepdim=True)
    grad = torch.randn(n, q, m * d, generator=g, dtype=torch.float64)
    as_dev = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    floats = [as_dev(t).requires_grad_() for t in (value, loc, weights)]
    return floats, levels.to(device), start.to(device), as_dev(grad)


def _forward_backward(impl: str, shape: dict, dtype: torch.dtype, device: str, seed: int = 0):
    """(output, grads of value / locations / weights) of ``impl``, as float64 on the CPU."""
    from .layers import ms_deform_attn

    (value, loc, weights), levels, start, grad = _inputs(shape, dtype, device, seed)
    out = ms_deform_attn(value, levels, start, loc, weights, impl=impl)
    if impl == "cpu" and os.environ.get(FAULT_ENV) == "corrupt-cpu":
        out = out + 1e-2 * out.detach().abs().max()  # the fault hook: a wrong native result
    out.backward(grad)
    return [t.detach().double().cpu() for t in (out, value.grad, loc.grad, weights.grad)]


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.abs().max().clamp_min(1e-30)
    return float((got - want).abs().max() / scale)


def check_implementation(impl: str, device: str, dtype: torch.dtype, shape_name: str) -> Case:
    """One case: ``impl`` on ``device`` in ``dtype`` against the float64 CPU reference."""
    name = f"{impl} {device} {str(dtype).replace('torch.', '')} {shape_name}"
    shape = SHAPES[shape_name]
    want = _forward_backward("reference", shape, torch.float64, "cpu")
    try:
        got = _forward_backward(impl, shape, dtype, device)
    except RuntimeError as e:  # a kernel error is a failed case, reported, not a crash
        return Case(name, False, None, None, f"{type(e).__name__}: {str(e).splitlines()[0]}")
    fwd_tol, grad_tol = TOLERANCES[dtype]
    errors = [_relative_error(g, w) for g, w in zip(got, want)]
    worst_fwd, worst_grad = errors[0], max(errors[1:])
    ok = worst_fwd <= fwd_tol and worst_grad <= grad_tol
    detail = f"forward {worst_fwd:.1e}, backward {worst_grad:.1e}"
    return Case(name, ok, max(worst_fwd / fwd_tol, worst_grad / grad_tol), 1.0, detail)


def implementation_cases() -> List[Tuple[str, str, torch.dtype]]:
    """(impl, device, dtype) of every implementation that can run here."""
    from .layers.msda_dispatch import available_impls

    cases = [("reference", "cpu", d) for d in (torch.float32, torch.float64)]
    if "cpu" in available_impls("cpu"):
        cases += [("cpu", "cpu", d) for d in (torch.float32, torch.float64)]
    if torch.cuda.is_available() and "cuda" in available_impls("cuda"):
        for i in range(torch.cuda.device_count()):
            cases += [
                ("cuda", f"cuda:{i}", d) for d in (torch.float32, torch.float16, torch.bfloat16)
            ]
    return cases


def tiny_model_inference(device: str) -> Case:
    """A tiny ISDA with random weights, built from the package's config, runs on ``device`` and
    returns well-formed instances."""
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from .config import add_isda_config

    cfg = get_cfg()
    add_isda_config(cfg)
    cfg.MODEL.DEVICE, cfg.MODEL.MASK_ON = device, True
    cfg.MODEL.RESNETS.DEPTH, cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 18, 64
    m = cfg.MODEL.ISDA
    m.HIDDEN_DIM, m.NHEADS, m.NUM_QUERIES, m.ENC_LAYERS, m.DEC_LAYERS = 64, 4, 10, 1, 2
    m.DIM_FEEDFORWARD, m.MFR_INNER_DIM, m.MFR_OUT_DIM, m.NUM_CLASSES = 128, 32, 64, 5
    name = f"tiny model inference {device}"
    torch.manual_seed(0)
    try:
        model = build_model(cfg).eval()
        image = torch.randint(0, 255, (3, 96, 128), dtype=torch.uint8)
        with torch.no_grad():
            (out,) = model([{"image": image, "height": 96, "width": 128}])
    except RuntimeError as e:
        return Case(name, False, None, None, f"{type(e).__name__}: {str(e).splitlines()[0]}")
    inst = out["instances"]
    ok = inst.has("pred_masks") and inst.pred_masks.shape[1:] == (96, 128)
    ok = ok and bool(torch.isfinite(inst.scores).all())
    return Case(name, ok, None, None, f"{len(inst)} instances")


def run_checks() -> List[Case]:
    cases = [
        check_implementation(impl, device, dtype, shape)
        for impl, device, dtype in implementation_cases()
        for shape in SHAPES
    ]
    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return cases + [tiny_model_inference(d) for d in devices]


def format_table(cases: Sequence[Case]) -> str:
    width = max(len(c.name) for c in cases)
    rows = [f"{'case':<{width}}  result  error/tolerance  detail"]
    for c in cases:
        ratio = "" if c.error is None else f"{c.error:.2g}"
        rows.append(f"{c.name:<{width}}  {'ok' if c.ok else 'FAIL':<6}  {ratio:<15}  {c.detail}")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m isda.check", description=__doc__.split("\n")[0])
    p.add_argument("--json", metavar="FILE", help="also write the environment and cases as JSON")
    args = p.parse_args(argv)
    start = time.monotonic()
    env = environment()
    for key, value in env.items():
        print(f"{key:<16} {value}")
    if os.environ.get(FAULT_ENV):
        print(f"{FAULT_ENV}={os.environ[FAULT_ENV]}: fault injected on purpose")
    cases = run_checks()
    print()
    print(format_table(cases))
    failed = [c for c in cases if not c.ok]
    verdict = "installation OK" if not failed else f"{len(failed)} case(s) FAILED"
    print(f"\nisda.check: {len(cases)} cases, {verdict} ({time.monotonic() - start:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "cases": [asdict(c) for c in cases]}, f, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
