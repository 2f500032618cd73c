"""Failure behaviour, training: kill -9 and resume, atomic checkpoints, non-finite losses and
reproducibility with a fixed seed (README "Failure behaviour")."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine.hooks import PeriodicCheckpointer, PeriodicWriter

from conftest import REPO, TINY_CONFIG, run_train_net, tiny_cfg
from isda.engine import (
    DataIssueLogger,
    FiniteLossCheck,
    SafeDetectionCheckpointer,
    check_finite_losses,
)
from isda.modeling.criterion import SetCriterion
from isda.modeling.matcher import HungarianMatcher

SMALL = ["MODEL.ISDA.NUM_QUERIES", 10, "INPUT.MIN_SIZE_TRAIN", "(96,)", "DATASETS.TEST", "()"]


def _train_cmd(out, *extra, flags=()):
    args = [*flags, "--config-file", TINY_CONFIG, *SMALL, "OUTPUT_DIR", out, "SEED", 3, *extra]
    return [sys.executable, str(REPO / "train_net.py"), *map(str, args)]


def _env():
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def _iterations(out):
    lines = (out / "metrics.json").read_text().splitlines()
    return [json.loads(line)["iteration"] for line in lines if line.strip()]


def _load_weights_only(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_sigkill_mid_training_then_resume_reaches_the_final_iteration(tiny_data_root, tmp_path):
    """The fault-injection test: a real train_net.py is killed with SIGKILL at a random moment
    after its first checkpoint, and ``--resume`` finishes the run from the last complete one."""
    out, max_iter = tmp_path / "out", 24
    schedule = ["SOLVER.MAX_ITER", max_iter, "SOLVER.CHECKPOINT_PERIOD", 4]
    proc = subprocess.Popen(
        _train_cmd(out, *schedule),
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while not (out / "model_0000003.pth").exists() and time.time() < deadline:
            assert proc.poll() is None, "train_net.py ended before its first checkpoint"
            time.sleep(0.05)
        time.sleep(random.Random().uniform(0.0, 1.5))  # a random moment, often inside a save
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before the kill: lengthen it"
    assert not (out / "model_final.pth").exists()

    # Whatever the moment, every visible checkpoint is complete and last_checkpoint names one.
    last = (out / "last_checkpoint").read_text().strip()
    for ckpt in out.glob("model_*.pth"):
        _load_weights_only(ckpt)
    saved_iter = _load_weights_only(out / last)["iteration"]

    resumed = run_train_net(*_train_cmd(out, *schedule, flags=["--resume"])[2:])
    log = resumed.stdout + resumed.stderr
    assert re.search(rf"Starting training from iteration {saved_iter + 1}\b", log), log[-3000:]
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
    assert _load_weights_only(out / "model_final.pth")["iteration"] == max_iter - 1
    assert max(_iterations(out)) == max_iter - 1
    assert not list(out.glob(".*.tmp-*")), "temporaries of the killed write are cleaned up"


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import torch
    from isda.engine import SafeDetectionCheckpointer

    save_dir, kill_point = sys.argv[1], sys.argv[2]
    model = torch.nn.Linear(4, 3)
    ckpt = SafeDetectionCheckpointer(model, save_dir, save_to_disk=True)
    ckpt.save("model_0000004", iteration=4)

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if kill_point == "model_write":  # half of the new model file is on disk
        def partial_save(obj, f):
            f.write(b"PK\\x03\\x04 half a zip file")
            f.flush()
            die()
        torch.save = partial_save
    else:  # the new model file is complete; last_checkpoint is being replaced
        real_replace = os.replace
        def replace(src, dst):
            if dst.endswith("last_checkpoint"):
                die()
            real_replace(src, dst)
        os.replace = replace
    torch.nn.init.constant_(model.weight, 7.0)
    ckpt.save("model_0000009", iteration=9)
    """)


@pytest.mark.parametrize("kill_point", ["model_write", "last_checkpoint_write"])
def test_kill_during_checkpoint_write_never_leaves_a_corrupt_checkpoint(tmp_path, kill_point):
    proc = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, str(tmp_path), kill_point],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (tmp_path / "last_checkpoint").read_text().strip() == "model_0000004.pth"
    for ckpt in tmp_path.glob("model_*.pth"):  # visible files are always complete
        _load_weights_only(ckpt)
    assert (tmp_path / "model_0000009.pth").exists() == (kill_point != "model_write")

    model = torch.nn.Linear(4, 3)
    ckpt = SafeDetectionCheckpointer(model, str(tmp_path), save_to_disk=True)
    assert ckpt.resume_or_load("", resume=True)["iteration"] == 4
    assert not list(tmp_path.glob(".*.tmp-*"))


def test_a_failing_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """A full disk or any error while writing leaves the old files untouched and no temporary."""
    model = torch.nn.Linear(4, 3)
    ckpt = SafeDetectionCheckpointer(model, str(tmp_path), save_to_disk=True)
    ckpt.save("model_0000004", iteration=4)

    def disk_full(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        ckpt.save("model_0000009", iteration=9)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_0000004.pth"]


class _RecordingPathManager:
    """Records the (path, mode) of every open() and performs it with Detectron2's manager."""

    def __init__(self, base):
        self.base, self.opened = base, []

    def open(self, path, mode="r", **kwargs):
        self.opened.append((os.path.basename(path), mode))
        return self.base.open(path, mode, **kwargs)

    def __getattr__(self, name):
        return getattr(self.base, name)


def test_fvcore_writes_checkpoints_only_through_the_path_manager(tmp_path):
    """Pins what SafeDetectionCheckpointer relies on: fvcore opens the model file and
    last_checkpoint for writing through ``checkpointer.path_manager`` and nothing else."""
    ckpt = DetectionCheckpointer(torch.nn.Linear(4, 3), str(tmp_path), save_to_disk=True)
    ckpt.path_manager = _RecordingPathManager(ckpt.path_manager)
    ckpt.save("model_0000004", iteration=4)
    assert ckpt.path_manager.opened == [("model_0000004.pth", "wb"), ("last_checkpoint", "w")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_0000004.pth"]


def test_detectron2_reads_pth_files_through_torch_load_hook(tmp_path):
    """Pins what SafeDetectionCheckpointer relies on: DetectionCheckpointer reads every non-.pkl
    file with its ``_torch_load`` method, which is where the weights_only rule is applied."""
    path = tmp_path / "weights.pth"
    torch.save({"model": torch.nn.Linear(4, 3).state_dict()}, path)
    read = []

    class Recording(DetectionCheckpointer):
        def _torch_load(self, f):
            read.append(f)
            return super()._torch_load(f)

    Recording(torch.nn.Linear(4, 3)).load(str(path))
    assert read == [str(path)]


def test_non_finite_loss_stops_the_run_naming_the_term_and_iteration(tiny_data_root, tmp_path):
    from train_net import Trainer

    cfg = tiny_cfg(*SMALL, "OUTPUT_DIR", str(tmp_path), "SOLVER.MAX_ITER", 6, "SEED", 3)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    model = trainer.model

    def poison(module, inputs, losses):
        if trainer.iter == 3:
            losses["loss_mask_0"] = losses["loss_mask_0"] * float("nan")
        return losses

    model.criterion.register_forward_hook(poison)
    # The check runs first; the data counts come before every hook that saves or writes metrics.
    order = [type(h) for h in trainer._hooks]
    assert order[0] is FiniteLossCheck
    readers = [order.index(t) for t in (PeriodicCheckpointer, PeriodicWriter)]
    assert order.index(DataIssueLogger) < min(readers)
    with pytest.raises(FloatingPointError, match=r"iteration 3: loss_mask_0=nan"):
        trainer.train()
    # The optimizer never stepped on the NaN gradients.
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_finite_loss_check_names_every_bad_term():
    losses = {"loss_cls": torch.tensor(1.0), "loss_mask": torch.tensor(float("inf"))}
    losses["loss_cls_0"] = torch.tensor(float("-inf"))
    with pytest.raises(FloatingPointError, match=r"iteration 12: loss_cls_0=-inf, loss_mask=inf"):
        check_finite_losses(losses, 12)
    check_finite_losses({"loss_cls": torch.tensor(0.5)}, 0)


def test_criterion_and_matcher_survive_nan_and_inf_predictions():
    """The matcher sanitises its cost matrix (tests/test_matcher.py covers it alone); the whole set
    loss must not crash either, so the trainer can report the non-finite term."""
    torch.manual_seed(0)
    D, B, Q, K, E, h, w = 2, 2, 6, 3, 8, 8, 8
    logits = torch.randn(D, B, Q, K)
    logits[0, 0, 0] = float("nan")
    logits[1, 1] = float("inf")
    kernels = torch.randn(D, B, Q, E)
    kernels[1, 0, 2] = float("nan")
    mfr = torch.randn(B, E, h, w)
    mfr[1, :, 0, 0] = float("-inf")
    targets = [
        {"labels": torch.tensor([0, 2]), "masks": (torch.rand(2, h, w) > 0.5).float()},
        {"labels": torch.tensor([1]), "masks": (torch.rand(1, h, w) > 0.5).float()},
    ]
    losses = SetCriterion(HungarianMatcher(), K)(logits, kernels, mfr, targets)
    assert set(losses) == {"loss_cls", "loss_mask", "loss_cls_0", "loss_mask_0"}


def test_two_runs_with_the_same_seed_give_identical_losses(tiny_data_root, tmp_path):
    """CPU, fixed SEED, same thread count: bit-identical losses (README "Failure behaviour")."""
    outs = [tmp_path / "a", tmp_path / "b"]
    schedule = ["SOLVER.MAX_ITER", 4, "SOLVER.CHECKPOINT_PERIOD", 100]
    procs = [
        subprocess.Popen(
            _train_cmd(out, *schedule),
            cwd=REPO,
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for out in outs
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    runs = []
    for out in outs:
        metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
        runs.append([{k: v for k, v in m.items() if "loss" in k} for m in metrics])
    assert runs[0] and all(runs[0]) and runs[0] == runs[1]
