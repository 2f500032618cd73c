"""The paper's ablations reproduced small: MP/KP (Table 2) and MFR stride (Table 1), each trained with
the demo config on the synthetic identical-instance scenes (copies of one shape that only their
position tells apart), with a fixed budget and seeds, and evaluated by COCOEvaluator.

    .venv/bin/python benchmarks/ablation_trend.py [--iters 600] [--seeds 0] [--only mpkp|stride]

Each run is a real ``train_net.py`` process on CPU; the table gives segm AP per variant (mean over
seeds, and each seed's value). The paper's COCO numbers are printed beside them for reference.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "ISDA-Demo.yaml")
DATA = ["DATASETS.TRAIN", '("isda_synth_identical_train",)', "DATASETS.TEST", '("isda_synth_identical_val",)']

MPKP = [  # (label, paper AP, overrides): paper Table 2, COCO val2017, 12 epochs
    ("MP off, KP off", 32.4, ["MODEL.ISDA.MFR_COORD", "none", "MODEL.ISDA.KERNEL_REF", "False"]),
    ("MP on,  KP off", 36.1, ["MODEL.ISDA.KERNEL_REF", "False"]),
    ("MP off, KP on", 31.8, ["MODEL.ISDA.MFR_COORD", "none"]),
    ("MP on,  KP on", 36.5, []),
]
STRIDES = [  # paper Table 1
    ("MFR 1/8", 35.0, ["MODEL.ISDA.MFR_STRIDE", "8", "MODEL.ISDA.MFR_IN_FEATURES", '["p3","p4","p5"]']),
    ("MFR 1/4", 36.5, []),
    ("MFR 1/2", 36.4, ["MODEL.ISDA.MFR_STRIDE", "2"]),
]


def train_and_evaluate(overrides, seed: int, iters: int, out_dir: str) -> float:
    """One real train_net.py run; returns the final segm AP on the identical-instance val split."""
    cmd = [
        sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", CONFIG, *DATA,
        "SEED", str(seed), "SOLVER.MAX_ITER", str(iters),
        "SOLVER.STEPS", f"({int(iters * 0.85)},)", "TEST.EVAL_PERIOD", "0", "OUTPUT_DIR", out_dir,
        *overrides,
    ]
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(os.path.join(out_dir, "metrics.json")) as f:
        evals = [json.loads(line) for line in f if '"segm/AP"' in line]
    return evals[-1]["segm/AP"]


def run_table(title, variants, args):
    print(f"\n{title}: segm AP on isda_synth_identical_val, {args.iters} iterations, seeds {args.seeds}")
    print("| variant | AP (mean) | AP per seed | paper (COCO) | minutes |\n| --- | ---: | --- | ---: | ---: |")
    for label, paper, overrides in variants:
        start, aps = time.time(), []
        for seed in args.seeds:
            tag = label.replace(" ", "").replace(",", "_").replace("/", "")
            aps.append(train_and_evaluate(overrides, seed, args.iters, os.path.join(args.output, f"{tag}_s{seed}")))
        per_seed = ", ".join(f"{a:.1f}" for a in aps)
        minutes = (time.time() - start) / 60
        print(f"| {label} | {statistics.mean(aps):.1f} | {per_seed} | {paper} | {minutes:.1f} |", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=600, help="training iterations per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--only", choices=["mpkp", "stride"], default=None)
    p.add_argument("--output", default=os.path.join(REPO, "output", "ablation_trend"))
    args = p.parse_args(argv)
    if args.only in (None, "mpkp"):
        run_table("Paper Table 2 (MP / KP)", MPKP, args)
    if args.only in (None, "stride"):
        run_table("Paper Table 1 (MFR stride)", STRIDES, args)


if __name__ == "__main__":
    main()
