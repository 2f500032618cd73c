"""`python -m isda.check` as a user runs it: it passes on this installation, its --json report lists
every implementation it checked, and a wrong native CPU result (the fault hook) makes it fail."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

from isda.layers.msda_dispatch import available_impls


def _check(tmp_path, **env):
    report = tmp_path / "check.json"
    proc = subprocess.run(
        [sys.executable, "-m", "isda.check", "--json", str(report)],
        cwd=REPO,
        env=dict(os.environ, OMP_NUM_THREADS="1", **env),
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc, json.loads(report.read_text())


def test_check_passes_and_reports_every_implementation(tmp_path):
    proc, report = _check(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "installation OK" in proc.stdout
    names = [c["name"] for c in report["cases"]]
    for impl in available_impls("cpu"):
        for dtype in ("float32", "float64"):
            assert any(n.startswith(f"{impl} cpu {dtype} encoder") for n in names), names
    assert "tiny model inference cpu" in names
    assert all(c["ok"] for c in report["cases"])
    env = report["environment"]
    assert env["torch"] and env["python"] and "op_library" in env


def test_a_wrong_native_result_makes_the_check_fail(tmp_path):
    if "cpu" not in available_impls("cpu"):
        pytest.skip("no native CPU kernel built")
    proc, report = _check(tmp_path, ISDA_CHECK_FAULT="corrupt-cpu")
    assert proc.returncode == 1
    failed = [c["name"] for c in report["cases"] if not c["ok"]]
    assert failed and all(n.startswith("cpu cpu") for n in failed)
    assert "FAIL" in proc.stdout
