"""scripts/setup_env.sh: finds Python 3.10 or says clearly that it is missing; a second run is a no-op."""

import os
import shutil
import subprocess

import pytest

from conftest import REPO

SCRIPT = REPO / "scripts" / "setup_env.sh"


def test_missing_python310_fails_with_a_clear_message(tmp_path):
    (tmp_path / "scripts").mkdir()
    shutil.copy(SCRIPT, tmp_path / "scripts")
    for name in ("requirements.lock", "setup.py"):
        shutil.copy(REPO / name, tmp_path)
    env = {"HOME": str(tmp_path), "PYENV_ROOT": str(tmp_path / "none"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        ["bash", str(tmp_path / "scripts" / "setup_env.sh")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert "Python 3.10 was not found" in proc.stderr and "ISDA_PYTHON" in proc.stderr
    assert not (tmp_path / ".venv").exists()


def test_second_run_on_a_ready_environment_does_nothing():
    if not (REPO / ".venv" / ".isda-stamp").is_file():
        pytest.skip("runs only inside the .venv that make test prepares")
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=os.environ)
    assert proc.returncode == 0
    assert proc.stdout == "" and "installing" not in proc.stderr
