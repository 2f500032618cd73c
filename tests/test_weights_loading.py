"""Weights load safely and completely everywhere (isda.weights): every bad file against every entry
point, the command lines as a user runs them and Detectron2's own DefaultPredictor in-process. A
pickle that runs code never runs (its marker file never appears), inference refuses incomplete
weights, each bad file gets one line naming it and no traceback, training from a backbone-only
file still starts, and .safetensors round-trips to identical outputs."""

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model

from conftest import REPO, TINY_CONFIG, run_train_net, tiny_cfg
from isda import weights as isda_weights
from isda.weights import (
    BadWeightsFileError,
    IncompleteWeightsError,
    UnsafePickleError,
    WeightsError,
    read_checkpoint,
    save_safetensors,
)

# Entry point -> its command line before "MODEL.WEIGHTS <file>".
CLIS = {
    "demo": [str(REPO / "demo.py"), "--config-file", str(TINY_CONFIG), "--input", "{image}"]
    + ["--output", "{out}"],
    "export": [str(REPO / "tools" / "export_model.py"), "--config-file", str(TINY_CONFIG)]
    + ["--format", "onnx", "--output", "{out}", "--size", "64", "64"],
    "eval-only": [str(REPO / "train_net.py"), "--config-file", str(TINY_CONFIG), "--eval-only"]
    + ["OUTPUT_DIR", "{out}"],
}
# Bad file -> the words its one-line error must contain.
BAD_FILES = {
    "evil.pth": "refused",
    "evil.pkl": "refused",
    "empty.pth": "is empty",
    "directory.pth": "is a directory",
    "truncated.pth": "not a readable torch checkpoint",
    "garbage.pth": "not a readable torch checkpoint",
    "no_tensors.pth": "none of this model's tensors",
    "half.pth": "unloaded",
    "other_classes.pth": "another NUM_CLASSES",
    "backbone_only.pth": "backbone-only",
}
MARKER = "code_ran"


class _Payload:
    """Unpickling this runs code: it creates the file ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _model_state(*opts):
    return build_model(tiny_cfg(*opts)).state_dict()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The good file, every bad file of BAD_FILES, and the marker path, in one folder."""
    d = tmp_path_factory.mktemp("weights")
    marker = str(d / MARKER)
    torch.manual_seed(0)
    state = _model_state()
    torch.save({"model": state}, d / "good.pth")
    torch.save({"model": state, "extra": _Payload(marker)}, d / "evil.pth")
    with open(d / "evil.pkl", "wb") as f:
        pickle.dump({"model": {"a": np.zeros(2)}, "__author__": "x", "x": _Payload(marker)}, f)
    (d / "empty.pth").write_bytes(b"")
    (d / "directory.pth").mkdir()
    data = (d / "good.pth").read_bytes()
    (d / "truncated.pth").write_bytes(data[: len(data) // 2])
    (d / "garbage.pth").write_text("these are not weights\n")
    torch.save({"model": {}}, d / "no_tensors.pth")
    keys = sorted(state)
    torch.save({"model": {k: state[k] for k in keys[::2]}}, d / "half.pth")
    other = _model_state("MODEL.ISDA.NUM_CLASSES", 7)
    torch.save({"model": other}, d / "other_classes.pth")
    backbone = {k: v for k, v in state.items() if k.startswith("backbone.")}
    torch.save({"model": backbone}, d / "backbone_only.pth")
    return d


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    import cv2

    path = tmp_path_factory.mktemp("image") / "a.png"
    cv2.imwrite(str(path), np.random.default_rng(0).integers(0, 255, (64, 80, 3), np.uint8))
    return str(path)


def _run_cli(name, weights, image, out):
    args = [a.format(image=image, out=out) for a in CLIS[name]]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, *args, "MODEL.WEIGHTS", str(weights)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("cli", sorted(CLIS))
@pytest.mark.parametrize("bad", sorted(BAD_FILES))
def test_every_cli_refuses_every_bad_file_in_one_line(files, image, tmp_path, cli, bad):
    proc = _run_cli(cli, files / bad, image, tmp_path / "out")
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    errors = [line for line in log.splitlines() if str(files / bad) in line]
    assert any(BAD_FILES[bad] in line for line in errors), log[-3000:]
    assert not (files / MARKER).exists()


@pytest.mark.parametrize("cli", sorted(CLIS))
def test_every_cli_runs_on_the_good_file(files, image, tmp_path, cli, tiny_data_root):
    proc = _run_cli(cli, files / "good.pth", image, tmp_path / "out")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]


@pytest.mark.parametrize("bad", sorted(set(BAD_FILES) - {"directory.pth"}))
def test_detectron2_default_predictor_refuses_every_bad_file(files, bad):
    """Detectron2's own class, not a subclass: an app's usual path."""
    cfg = tiny_cfg("MODEL.WEIGHTS", str(files / bad))
    with pytest.raises(WeightsError, match=BAD_FILES[bad]) as err:
        DefaultPredictor(cfg)
    assert str(files / bad) in str(err.value)
    assert not (files / MARKER).exists()


def test_default_predictor_loads_the_good_file_completely(files):
    predictor = DefaultPredictor(tiny_cfg("MODEL.WEIGHTS", str(files / "good.pth")))
    saved = torch.load(files / "good.pth", weights_only=True)["model"]
    for k, v in predictor.model.state_dict().items():
        assert torch.equal(v, saved[k]), k


def test_errors_are_typed_for_apps(files):
    with pytest.raises(UnsafePickleError):
        read_checkpoint(str(files / "evil.pth"))
    with pytest.raises(UnsafePickleError):
        read_checkpoint(str(files / "evil.pkl"))
    with pytest.raises(BadWeightsFileError):
        read_checkpoint(str(files / "truncated.pth"))
    with pytest.raises(IncompleteWeightsError):
        DefaultPredictor(tiny_cfg("MODEL.WEIGHTS", str(files / "half.pth")))
    assert not (files / MARKER).exists()


def test_model_zoo_pkl_of_numpy_arrays_loads_through_the_restricted_unpickler(tmp_path):
    state = {k: v.numpy() for k, v in _model_state().items()}
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        path = tmp_path / f"zoo_{protocol}.pkl"
        with open(path, "wb") as f:
            pickle.dump({"model": state, "__author__": "Detectron2 Model Zoo"}, f, protocol)
        predictor = DefaultPredictor(tiny_cfg("MODEL.WEIGHTS", str(path)))
        for k, v in predictor.model.state_dict().items():
            assert np.array_equal(v.numpy(), state[k]), k


def test_trusted_pickles_load_only_with_the_opt_in(files, tmp_path, monkeypatch):
    marker = files / MARKER
    with pytest.raises(UnsafePickleError, match="--unsafe-pickle"):
        read_checkpoint(str(files / "evil.pth"))
    assert not marker.exists()
    monkeypatch.setenv(isda_weights.UNSAFE_PICKLE_ENV, "1")
    read_checkpoint(str(files / "evil.pth"))
    assert marker.exists()
    marker.unlink()


def test_inference_opt_out_admits_incomplete_weights(files):
    cfg = tiny_cfg("MODEL.WEIGHTS", str(files / "half.pth"))
    cfg.MODEL.ISDA.ALLOW_INCOMPLETE_WEIGHTS = True
    DefaultPredictor(cfg)  # no error: the documented opt-out


def test_a_backbone_only_checkpoint_still_starts_training(files, tiny_data_root, tmp_path):
    proc = run_train_net(
        "--config-file",
        TINY_CONFIG,
        "MODEL.WEIGHTS",
        files / "backbone_only.pth",
        "SOLVER.MAX_ITER",
        2,
        "TEST.EVAL_PERIOD",
        0,
        "OUTPUT_DIR",
        tmp_path,
    )
    assert (tmp_path / "model_final.pth").is_file(), proc.stdout[-2000:]


def _to_safetensors(source, out):
    """tools/checkpoint_cli.py to-safetensors SOURCE OUT, checked against the tiny config."""
    cli = REPO / "tools" / "checkpoint_cli.py"
    return subprocess.run(
        [sys.executable, str(cli), "to-safetensors", str(source), str(out)]
        + ["--config-file", str(TINY_CONFIG)],
        capture_output=True,
        text=True,
    )


def test_safetensors_round_trip_gives_identical_outputs(files, tmp_path):
    out = tmp_path / "model.safetensors"
    proc = _to_safetensors(files / "good.pth", out)
    assert proc.returncode == 0, proc.stderr
    image = np.random.default_rng(1).integers(0, 255, (64, 80, 3), np.uint8)
    outputs = []
    for weights in (files / "good.pth", out):
        predictor = DefaultPredictor(tiny_cfg("MODEL.WEIGHTS", str(weights)))
        outputs.append(predictor(image)["instances"])
    a, b = outputs
    assert torch.equal(a.scores, b.scores) and torch.equal(a.pred_masks, b.pred_masks)
    assert torch.equal(a.pred_classes, b.pred_classes)


def test_safetensors_writer_refuses_weights_incomplete_for_the_config(files, tmp_path):
    out = tmp_path / "half.safetensors"
    proc = _to_safetensors(files / "half.pth", out)
    assert proc.returncode == 2 and str(files / "half.pth") in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_safetensors_writes_whole_tensors_of_shared_storage(tmp_path):
    base = torch.arange(12.0)
    path = tmp_path / "views.safetensors"
    save_safetensors({"a": base[:6].view(2, 3), "b": base[6:]}, str(path))
    loaded = read_checkpoint(str(path))["model"]
    assert torch.equal(loaded["a"], base[:6].view(2, 3)) and torch.equal(loaded["b"], base[6:])


@pytest.mark.skipif(
    isda_weights._torch_release() >= (2, 6), reason="weights_only is a boundary on torch >= 2.6"
)
def test_old_torch_warns_that_weights_only_is_not_a_security_boundary(files, monkeypatch):
    monkeypatch.setattr(isda_weights, "_warned_old_torch", False)
    with pytest.warns(UserWarning, match="CVE-2025-32434"):
        read_checkpoint(str(files / "good.pth"))
