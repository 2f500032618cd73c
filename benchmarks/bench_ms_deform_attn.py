"""Benchmark of the multi-scale deformable attention op: every implementation available on every
present device, at ISDA's encoder and decoder shapes.

    .venv/bin/python benchmarks/bench_ms_deform_attn.py [--repeats 5] [--device cpu,cuda]
                                                         [--shapes enc1,enc2,dec1,dec2]

Shapes: 4 levels 100x152, 50x76, 25x38, 13x19 (S = 20197), M = 8 heads, D = 32, L = 4, P = 4.
"encN" is the encoder self-attention (Lq = S), "decN" the decoder cross-attention (Lq = 300), with
batch N. Sampling locations are realistic rather than uniform: every query has a reference point
(the centre of its own pixel for the encoder, uniform for the decoder) and its points are offset by
N(0, 2) pixels of each level, as a trained Deformable-DETR head does.

Time: median (and min) over --repeats of one forward, and of one forward + backward (gradients
wrt value, locations and weights), after one warm-up. The machine line, with its load average, is
printed before and after the table: on a shared machine the min is the less disturbed number.
Peak memory:
  * CPU: peak resident set size above the level before the call. The peak (VmHWM) is reset by
    writing "5" to /proc/self/clear_refs. Memory is measured in a child process in which glibc is
    told (MALLOC_MMAP_THRESHOLD_) to serve every large block with mmap, so freed memory leaves the
    RSS and the delta measures the op's own allocations (inputs are allocated before). Times are
    measured in the parent, with the default allocator (the mmap setting adds page faults).
  * CUDA: torch.cuda.max_memory_allocated() above the allocated level before the call.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

from isda.layers import msda_dispatch as msda
from isda.layers import msda_native

LEVELS = ((100, 152), (50, 76), (25, 38), (13, 19))
HEADS, CHANNELS, POINTS = 8, 32, 4
DECODER_QUERIES = 300
OFFSET_STD_PIXELS = 2.0
SHAPES = {
    "enc1": (1, None),
    "enc2": (2, None),
    "dec1": (1, DECODER_QUERIES),
    "dec2": (2, DECODER_QUERIES),
}
MMAP_THRESHOLD = "65536"  # bytes: every larger allocation gets its own mmap, returned on free
MiB = 1024.0**2


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
def level_tensors(device):
    spatial_shapes = torch.tensor(LEVELS, dtype=torch.int64, device=device)
    areas = spatial_shapes.prod(1)
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    return spatial_shapes, starts, int(areas.sum())


def pixel_centres() -> torch.Tensor:
    """(S, 2) normalised (x, y) centre of every token's pixel on its own level."""
    centres = []
    for h, w in LEVELS:
        y, x = torch.meshgrid(
            (torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij"
        )
        centres.append(torch.stack([x.flatten(), y.flatten()], -1))
    return torch.cat(centres)


def make_inputs(N: int, Lq: Optional[int], device: str, dtype: torch.dtype):
    """(value, spatial_shapes, level_start_index, locations, weights); Lq=None means Lq = S."""
    gen = torch.Generator().manual_seed(0)
    spatial_shapes, starts, S = level_tensors("cpu")
    L = len(LEVELS)
    if Lq is None:
        Lq = S
        ref = pixel_centres().expand(N, S, 2)
    else:
        ref = torch.rand(N, Lq, 2, generator=gen)
    norm = torch.tensor([[w, h] for h, w in LEVELS], dtype=torch.float32)  # (L, 2) as (W, H)
    offsets = torch.randn(N, Lq, HEADS, L, POINTS, 2, generator=gen) * OFFSET_STD_PIXELS
    loc = ref[:, :, None, None, None, :] + offsets / norm[None, None, None, :, None, :]
    logits = torch.randn(N, Lq, HEADS, L * POINTS, generator=gen)
    weights = logits.softmax(-1).view(N, Lq, HEADS, L, POINTS)
    value = torch.randn(N, S, HEADS, CHANNELS, generator=gen)
    floats = [t.to(device=device, dtype=dtype) for t in (value, loc, weights)]
    return floats[0], spatial_shapes.to(device), starts.to(device), floats[1], floats[2]


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------
def _read_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_mib(fn: Callable[[], object], device: str) -> float:
    """Peak memory the call adds on top of what was allocated before it (method in the module
    docstring)."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / MiB
    before = _read_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    fn()
    return (_read_status_kib("VmHWM") - before) / 1024.0


def times_ms(fn: Callable[[], object], repeats: int, device: str) -> List[float]:
    """Wall times of `repeats` calls after one warm-up (lazy init, allocator)."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def case_functions(impl, device, dtype, N, Lq):
    """(forward, forward_backward, Lq) closures over fresh inputs of one case."""
    value, shapes, starts, loc, weights = make_inputs(N, Lq, device, dtype)

    def forward():
        with torch.no_grad():
            return msda.ms_deform_attn(value, shapes, starts, loc, weights, impl=impl)

    grad_inputs = [t.detach().clone().requires_grad_() for t in (value, loc, weights)]
    grad_out = torch.randn(N, loc.shape[1], HEADS * CHANNELS, device=device, dtype=dtype)

    def forward_backward():
        v, l, w = grad_inputs
        out = msda.ms_deform_attn(v, shapes, starts, l, w, impl=impl)
        return torch.autograd.grad(out, (v, l, w), grad_out)

    return forward, forward_backward, loc.shape[1]


def case_key(impl, device, dtype, N, Lq) -> str:
    return f"{impl}/{device}/{str(dtype).replace('torch.', '')}/{N}/{Lq}"


def time_case(impl, device, dtype, N, Lq, repeats) -> Dict[str, object]:
    forward, forward_backward, Lq = case_functions(impl, device, dtype, N, Lq)
    fwd = times_ms(forward, repeats, device)
    fwdbwd = times_ms(forward_backward, repeats, device)
    return {
        "impl": impl,
        "device": device,
        "dtype": str(dtype).replace("torch.", ""),
        "N": N,
        "Lq": Lq,
        "fwd_ms": statistics.median(fwd),
        "fwd_min_ms": min(fwd),
        "fwdbwd_ms": statistics.median(fwdbwd),
        "fwdbwd_min_ms": min(fwdbwd),
    }


def memory_case(impl, device, dtype, N, Lq) -> Tuple[float, float]:
    forward, forward_backward, _ = case_functions(impl, device, dtype, N, Lq)
    forward(), forward_backward()  # warm-up: one-time allocations are not the op's
    return peak_memory_mib(forward, device), peak_memory_mib(forward_backward, device)


def all_cases(args):
    devices = [d for d in args.device.split(",") if d == "cpu" or torch.cuda.is_available()]
    for device in devices:
        for name in args.shapes.split(","):
            N, Lq = SHAPES[name]
            for impl, dtype in cases_for(device):
                yield impl, device, dtype, N, Lq


def measure_memory_in_child(argv: List[str]) -> Dict[str, Tuple[float, float]]:
    """Runs this script with --memory-only under the mmap allocator setting; {case_key: peaks}."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD)
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--memory-only"]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def cases_for(device: str) -> List[Tuple[str, torch.dtype]]:
    impls = msda.available_impls(device)
    cases = [("reference", torch.float32)]
    if device == "cpu" and "cpu" in impls:
        cases.append(("cpu", torch.float32))
    if device == "cuda" and "cuda" in impls:
        cases += [("cuda", torch.float32), ("cuda", torch.bfloat16), ("cuda", torch.float16)]
    return cases


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def print_table(rows: List[Dict[str, object]]) -> None:
    header = (
        "| impl | device | dtype | N | Lq | fwd median (min) ms | fwd+bwd median (min) ms "
        "| fwd peak MiB | fwd+bwd peak MiB | fwd speed-up | fwd+bwd speed-up |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for row in rows:
        base = next(
            r
            for r in rows
            if r["impl"] == "reference"
            and r["device"] == row["device"]
            and (r["N"], r["Lq"]) == (row["N"], row["Lq"])
        )
        print(
            f"| {row['impl']} | {row['device']} | {row['dtype']} | {row['N']} | {row['Lq']} "
            f"| {row['fwd_ms']:.1f} ({row['fwd_min_ms']:.1f}) "
            f"| {row['fwdbwd_ms']:.1f} ({row['fwdbwd_min_ms']:.1f}) "
            f"| {row['fwd_peak_mib']:.1f} | {row['fwdbwd_peak_mib']:.1f} "
            f"| {base['fwd_ms'] / row['fwd_ms']:.1f}x | {base['fwdbwd_ms'] / row['fwdbwd_ms']:.1f}x |"
        )


def describe_machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    kernels = "native op not built"
    if msda_native.load_extension() is not None:
        build = msda_native.cpu_kernel_build()
        kernels = f"CPU kernels: {build['isa']}, {build['parallel']}"
    return (
        f"{datetime.date.today()} | {platform.machine()}, {os.cpu_count()} cores ({cpu}), {gpu} | "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads | {kernels} | "
        f"load average {load:.2f}"
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case (median)")
    parser.add_argument(
        "--device", default="cpu,cuda", help="comma list; devices that are not present are skipped"
    )
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {list(SHAPES)}")
    parser.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.memory_only:
        peaks = {case_key(*case): memory_case(*case) for case in all_cases(args)}
        print(json.dumps(peaks))
        return
    requested = set(args.device.split(","))
    print(describe_machine())
    if "cuda" in requested and not torch.cuda.is_available():
        print("skipped device cuda: no GPU present (no CUDA numbers measured)")
    rows = []
    for case in all_cases(args):
        rows.append(time_case(*case, repeats=args.repeats))
        print(f"  timed {case_key(*case)}", file=sys.stderr, flush=True)
    peaks = measure_memory_in_child([a for a in argv if a != "--memory-only"])
    for row, case in zip(rows, all_cases(args)):
        row["fwd_peak_mib"], row["fwdbwd_peak_mib"] = peaks[case_key(*case)]
    print_table(rows)
    print("speed-up: reference median / median, same device and shape")
    print(describe_machine())


if __name__ == "__main__":
    main()
