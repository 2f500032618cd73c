"""make build-cuda (scripts/build_cuda.py): the architecture list is read as TORCH_CUDA_ARCH_LIST is,
and a machine without the matching nvcc gets one clear message instead of a compiler error. The
compile itself runs in CI as `make build-cuda` (.ci/run), which reads the built archs back."""

import subprocess
import sys

import pytest
import torch
from conftest import REPO, load_script

SCRIPT = REPO / "scripts" / "build_cuda.py"


def _script():
    return load_script(SCRIPT)


def test_arch_list_names_elf_and_ptx_targets():
    elf, ptx = _script().parse_archs("8.0;9.0;10.0;12.0+PTX")
    assert elf == ["sm_80", "sm_90", "sm_100", "sm_120"] and ptx == ["compute_120"]


@pytest.mark.parametrize("spec", ["", "sm_90", "9"])
def test_a_malformed_arch_list_is_refused_by_name(spec):
    script = _script()
    with pytest.raises(script.BuildError, match="--archs"):
        script.parse_archs(spec)


def test_missing_nvcc_is_one_clear_message(tmp_path):
    if torch.version.cuda is None:
        pytest.skip("a CPU-only torch is refused before nvcc is looked for")
    env = {"CUDA_HOME": str(tmp_path / "no-toolkit"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--build-dir", str(tmp_path / "build")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 1
    assert "nvcc was not found" in proc.stderr and str(tmp_path / "no-toolkit") in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "build").exists()
