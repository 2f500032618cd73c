"""The demo's training step (configs/ISDA-Demo.yaml) on real batches of the synthetic dataset.

    .venv/bin/python benchmarks/bench_demo_step.py [--repeats 10] [--threads 2] [KEY VALUE ...]

Variants of the optimizer step run on the same model, alternating step by step so that a shared,
noisy machine slows them alike; the table gives medians of the whole step and of the optimizer
step alone (gradient clip and update), and their ratios to the project's optimizer:
* ``foreach`` (the project's ``build_isda_optimizer``): AdamW and the full-model gradient clip each
  update all parameters with torch's multi-tensor (``_foreach_*``) calls;
* ``per-tensor loop``: the same optimizer with ``foreach=False`` on CPU, torch's default there.
Each variant keeps its own copy of the model, so both train from the same weights on the same
batches, and the script checks that their weights stay identical.

The data loader runs before the timing: the table is the step alone (forward, losses, backward,
optimizer step). Trailing ``KEY VALUE`` pairs override the demo config.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from train_net import Trainer, setup  # noqa: E402
from bench_ms_deform_attn import describe_machine  # noqa: E402
from detectron2.engine import default_argument_parser  # noqa: E402
from isda.data.synthetic import (  # noqa: E402
    generate_synthetic_dataset,
    register_synthetic_datasets,
)

DEMO_CONFIG = os.path.join(REPO, "configs", "ISDA-Demo.yaml")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=10, help="timed steps per variant")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return p.parse_args(argv)


def demo_cfg(opts):
    args = default_argument_parser().parse_args(["--config-file", DEMO_CONFIG])
    args.opts = ["OUTPUT_DIR", "/tmp/isda_bench_demo_step", "DATALOADER.NUM_WORKERS", "0", *opts]
    return setup(args)


def variant(cfg, model, foreach: bool):
    """-> (model copy, its optimizer) with the project's parameter groups and clipping, updating
    with multi-tensor calls or one tensor at a time."""
    model = copy.deepcopy(model)
    optimizer = Trainer.build_optimizer(cfg, model)
    optimizer.defaults["foreach"] = foreach  # read by the full-model gradient clip
    for group in optimizer.param_groups:
        group["foreach"] = foreach
    return model, optimizer


def train_step(model, optimizer, batch) -> float:
    """One training step; returns the seconds of its optimizer step (clip and update)."""
    losses = model(batch)
    optimizer.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    start = time.perf_counter()
    optimizer.step()
    return time.perf_counter() - start


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = demo_cfg(args.opts)
    generate_synthetic_dataset(splits=["train"])  # the default root, as make demo's
    register_synthetic_datasets()
    loader = iter(Trainer.build_train_loader(cfg))
    batches = [next(loader) for _ in range(args.repeats + 2)]
    torch.manual_seed(0)
    base = Trainer.build_model(cfg)
    base.train()
    variants = {"foreach": variant(cfg, base, True), "per-tensor loop": variant(cfg, base, False)}
    times = {name: [] for name in variants}
    update_times = {name: [] for name in variants}
    for i, batch in enumerate(batches):
        for name, (model, optimizer) in variants.items():
            start = time.perf_counter()
            update = train_step(model, optimizer, batch)
            if i >= 2:  # the first two steps warm up allocators and oneDNN
                times[name].append(time.perf_counter() - start)
                update_times[name].append(update)
    (m_a, _), (m_b, _) = variants.values()
    diff = max((a - b).abs().max().item() for a, b in zip(m_a.parameters(), m_b.parameters()))
    shape = tuple(batches[0][0]["image"].shape)
    print(
        f"\nDemo training step, batch {cfg.SOLVER.IMS_PER_BATCH}, images like {shape}, float32,"
        f" cpu, {args.threads} threads, median of {args.repeats}\n"
    )
    print(
        "| optimizer | median step ms | step / foreach | median optimizer step ms |"
        " optimizer step / foreach |\n| --- | ---: | ---: | ---: | ---: |"
    )
    ref = statistics.median(times["foreach"])
    ref_update = statistics.median(update_times["foreach"])
    for name, samples in times.items():
        med, update = statistics.median(samples), statistics.median(update_times[name])
        print(
            f"| {name} | {1e3 * med:.1f} | {med / ref:.2f} | {1e3 * update:.1f} |"
            f" {update / ref_update:.2f} |"
        )
    print(
        f"\nLargest weight difference between the variants after {len(batches)} steps: {diff:.1e}"
    )
    print(describe_machine())


if __name__ == "__main__":
    main()
