"""Installation: scripts/setup_env.sh finds Python 3.10 or says clearly that it is missing, and a
second run is a no-op; `pip install --no-build-isolation -e .` into an environment that already has
torch and Detectron2 adds only isda."""

import json
import os
import shutil
import site
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPT = REPO / "scripts" / "setup_env.sh"


def test_missing_python310_fails_with_a_clear_message(tmp_path):
    (tmp_path / "scripts").mkdir()
    shutil.copy(SCRIPT, tmp_path / "scripts")
    for name in ("requirements.lock", "pyproject.toml", "setup.py"):
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


def _venv_on_top_of_this_environment(path):
    """A venv without packages of its own that sees this interpreter's site-packages (torch,
    Detectron2, pip, setuptools) as installed, like a user's environment."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    (purelib,) = (path / "lib").glob("python*/site-packages")
    (purelib / "host_environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return path / "bin" / "python"


def _source_tree(dst):
    """What an install reads: the build files and the package sources (no built op)."""
    dst.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, dst)
    ignore = shutil.ignore_patterns("*.so", "__pycache__", "*.egg-info")
    shutil.copytree(REPO / "projects", dst / "projects", ignore=ignore)
    return dst


def test_install_into_an_environment_with_torch_and_detectron2_adds_only_isda(tmp_path):
    """Resolution only (--dry-run, --no-index: nothing may be downloaded). The build of isda._C on
    this path is what scripts/setup_env.sh runs on every fresh checkout (make test)."""
    python = _venv_on_top_of_this_environment(tmp_path / "venv")
    src = _source_tree(tmp_path / "src")
    report = tmp_path / "report.json"
    cmd = [str(python), "-m", "pip", "install", "--dry-run", "--no-index", "--no-build-isolation"]
    cmd += ["--disable-pip-version-check", "--report", str(report), "-e", str(src)]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_REQUIRE_VIRTUALENV")}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    installs = json.loads(report.read_text())["install"]
    assert [item["metadata"]["name"] for item in installs] == ["isda"]
    assert "Requirement already satisfied: torch" in proc.stdout
