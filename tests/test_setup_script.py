"""Installation: scripts/setup_env.sh finds each stack's Python or says clearly that it is missing,
and a second run is a no-op; Detectron2's pinned file is refused unless its hash matches, and is
repacked as a pure wheel without _C; `pip install --no-build-isolation -e .` into an environment
that already has torch and Detectron2 adds only isda."""

import hashlib
import json
import os
import zipfile
from base64 import urlsafe_b64encode
import shutil
import site
import subprocess
import sys

from pathlib import Path

import pytest

from conftest import REPO, load_script

SCRIPT = REPO / "scripts" / "setup_env.sh"


WHEEL_SCRIPT = REPO / "scripts" / "detectron2_wheel.py"
# Stack name -> its virtual environment, as scripts/setup_env.sh makes them.
STACK_VENVS = {"default": REPO / ".venv", "oldest": REPO / ".venv-oldest"}


def _running_stack():
    """The stack whose venv runs this test, or None outside the venvs of make test."""
    for stack, venv in STACK_VENVS.items():
        if Path(sys.prefix).resolve() == venv.resolve() and (venv / ".isda-stamp").is_file():
            return stack
    return None


@pytest.mark.parametrize("stack,python", [("default", "3.12"), ("oldest", "3.10")])
def test_missing_python_fails_with_a_clear_message(tmp_path, stack, python):
    (tmp_path / "scripts").mkdir()
    shutil.copy(SCRIPT, tmp_path / "scripts")
    for name in ("requirements.lock", "requirements-oldest.lock", "pyproject.toml", "setup.py"):
        shutil.copy(REPO / name, tmp_path)
    env = {"HOME": str(tmp_path), "PYENV_ROOT": str(tmp_path / "none"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        ["bash", str(tmp_path / "scripts" / "setup_env.sh"), stack],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert f"Python {python} was not found (stack '{stack}')" in proc.stderr
    assert "ISDA_PYTHON" in proc.stderr
    assert not any(tmp_path.glob(".venv*"))


def test_second_run_on_a_ready_environment_does_nothing():
    stack = _running_stack()
    if stack is None:
        pytest.skip("runs only inside a venv that make test prepares")
    proc = subprocess.run(
        ["bash", str(SCRIPT), stack], capture_output=True, text=True, env=os.environ
    )
    assert proc.returncode == 0
    assert proc.stdout == "" and "installing" not in proc.stderr


def _pinned_wheel() -> Path:
    """The sal-detectron2 file that setup downloaded for the default stack."""
    found = sorted((REPO / ".venv" / "detectron2-wheel").glob("*-cp310-none-any.whl"))
    if not found:
        pytest.skip("the default stack's setup has not downloaded sal-detectron2 here")
    return found[0]


def _refused(wheel: Path, dest: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(WHEEL_SCRIPT), "--wheel", str(wheel), "--dest", str(dest)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert str(wheel) in proc.stderr and "does not match the pinned" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(dest.glob("*py3-none-any.whl"))
    return proc


def test_a_download_that_is_not_the_pinned_file_is_refused(tmp_path):
    fake = tmp_path / "sal_detectron2-0.7.2-cp310-none-any.whl"
    fake.write_bytes(b"<html>proxy error</html>")
    _refused(fake, tmp_path / "out")


def test_a_corrupted_download_is_refused(tmp_path):
    data = bytearray(_pinned_wheel().read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    broken = tmp_path / "sal_detectron2-0.7.2-cp310-none-any.whl"
    broken.write_bytes(bytes(data))
    _refused(broken, tmp_path / "out")


def test_the_pinned_file_becomes_a_pure_wheel_without_its_extension(tmp_path):
    source = _pinned_wheel()
    script = load_script(WHEEL_SCRIPT)
    pure = Path(script.pure_wheel(str(tmp_path), str(source)))
    assert pure.name == "sal_detectron2-0.7.2-py3-none-any.whl"
    with zipfile.ZipFile(source) as z:
        original = set(z.namelist())
    with zipfile.ZipFile(pure) as z:
        names = set(z.namelist())
        wheel = z.read("sal_detectron2-0.7.2.dist-info/WHEEL").decode()
        metadata = z.read("sal_detectron2-0.7.2.dist-info/METADATA").decode()
        record = z.read("sal_detectron2-0.7.2.dist-info/RECORD").decode().splitlines()
        contents = {n: z.read(n) for n in names}
    assert original - names == {n for n in original if n.startswith("detectron2/_C")}
    assert "Tag: py3-none-any" in wheel and "Root-Is-Purelib: true" in wheel
    assert "\n\n" not in wheel  # a blank line would end the header block before the tag
    assert "numpy<2" not in metadata and "Requires-Dist: pycocotools" in metadata
    # RECORD lists every file with its hash and size, as installers check it.
    rows = {r.split(",")[0]: r.split(",")[1:] for r in record}
    assert set(rows) == names
    for name, data in contents.items():
        if name.endswith("RECORD"):
            continue
        digest = urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        assert rows[name] == [f"sha256={digest}", str(len(data))], name


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
