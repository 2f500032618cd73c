"""Shared fixtures: a tiny generated dataset, the tiny CPU config, and a runner for train_net.py."""

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from detectron2.config import get_cfg

from isda import add_isda_config
from isda.data import generate_synthetic_dataset, register_synthetic_datasets

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "ISDA-Tiny-CPU.yaml"


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    for item in items:
        if "cuda" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="no CUDA GPU on this machine"))


@pytest.fixture(scope="session")
def tiny_data_root(tmp_path_factory) -> Path:
    """DETECTRON2_DATASETS folder with 8 train and 4 val synthetic scenes, registered as
    isda_synth_train / isda_synth_val (also for subprocesses, through the environment)."""
    base = tmp_path_factory.mktemp("datasets")
    root = base / "isda_synth"
    generate_synthetic_dataset(str(root), num_images={"train": 8, "val": 4})
    register_synthetic_datasets(str(root), splits=["train", "val"])
    os.environ["DETECTRON2_DATASETS"] = str(base)
    return base


def load_script(path: Path):
    """A repository script (not a package module) imported by its path, as a module object."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_cfg(*opts):
    cfg = get_cfg()
    add_isda_config(cfg)
    cfg.merge_from_file(str(TINY_CONFIG))
    cfg.merge_from_list(list(opts))
    return cfg


def train_net_args(config=TINY_CONFIG, *opts) -> argparse.Namespace:
    """The arguments train_net.setup() receives from its command line, without running it."""
    return argparse.Namespace(
        config_file=str(config),
        opts=[str(o) for o in opts],
        eval_only=False,
        resume=False,
        num_gpus=1,
        num_machines=1,
        machine_rank=0,
        dist_url="auto",
    )


def run_train_net(*args, timeout=600, check=True) -> subprocess.CompletedProcess:
    """Runs train_net.py as a user would, in a fresh process; returns its output."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(REPO / "train_net.py"), *map(str, args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"train_net.py {' '.join(map(str, args))} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc
