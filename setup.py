"""Builds the native op `isda._C` of the `isda` package (metadata: pyproject.toml).

The op compiles against the torch installed in the target environment: install with
`pip install --no-build-isolation -e .` (or without -e), after torch.
"""

import glob
import importlib.util
import os

from setuptools import setup

PKG_ROOT = os.path.join("projects", "ISDA")


# Compiler flags: the kernels rely on auto-vectorised channel loops, so optimise fully; -fopenmp
# makes at::parallel_for use threads (it is a header template, serial without it).
CXX_FLAGS = ["-O3", "-fopenmp"]
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]


def _nvcc_major(cuda_home):
    """Major version of ``cuda_home``'s nvcc, or None when it cannot be run."""
    import re
    import subprocess

    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
    if not nvcc or not os.path.exists(nvcc):
        return None
    try:
        out = subprocess.check_output([nvcc, "--version"], text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    match = re.search(r"release (\d+)\.", out)
    return int(match.group(1)) if match else None


def _cuda_build_decision():
    """(build_cuda, reason). CUDA is built when FORCE_CUDA=1, or when a GPU is visible and nvcc's
    major version equals the one torch was built with (a mismatch fails at compile or load time)."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True, "FORCE_CUDA=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return False, "torch.cuda.is_available() is False (set FORCE_CUDA=1 to build anyway)"
    torch_major = int(torch.version.cuda.split(".")[0])
    nvcc_major = _nvcc_major(CUDA_HOME)
    if nvcc_major is None:
        return False, f"no working nvcc under CUDA_HOME={CUDA_HOME}"
    if nvcc_major != torch_major:
        return False, (
            f"nvcc {nvcc_major}.x at {CUDA_HOME} does not match torch's CUDA {torch.version.cuda}"
        )
    return True, f"GPU visible and nvcc {nvcc_major}.x matches torch CUDA {torch.version.cuda}"


def _cuda_library_includes(cuda_home):
    """Header folders of the CUDA libraries that torch's headers include (cuSPARSE, cuBLAS, ...),
    after the toolkit's own. A pip-installed torch brings those libraries as ``nvidia-*`` wheels
    with their headers, and a minimal toolkit (nvcc and the runtime only) lacks them; the toolkit
    is listed first so that the headers it does have come from it, matching its nvcc."""
    spec = importlib.util.find_spec("nvidia")
    wheel_dirs = []
    for base in (spec.submodule_search_locations or []) if spec else []:
        wheel_dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    toolkit = [os.path.join(cuda_home, "include")] if cuda_home else []
    return toolkit + wheel_dirs


def get_extensions():
    """The native deformable-attention op ``isda._C``; the package works without it (reference
    path). Builds the CUDA kernels too when :func:`_cuda_build_decision` allows it."""
    csrc = os.path.join(PKG_ROOT, "isda", "csrc")
    sources = sorted(
        glob.glob(os.path.join(csrc, "*.cpp")) + glob.glob(os.path.join(csrc, "cpu", "*.cpp"))
    )
    if not sources:
        return [], {}
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cuda_sources = sorted(glob.glob(os.path.join(csrc, "cuda", "*.cu")))
    build_cuda, reason = _cuda_build_decision()
    if build_cuda and cuda_sources:
        print(f"isda._C: building CPU + CUDA kernels ({reason})")
        ext = CUDAExtension(
            "isda._C",
            sources + cuda_sources,
            include_dirs=[os.path.abspath(csrc)] + _cuda_library_includes(CUDA_HOME),
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
        )
    else:
        print(f"isda._C: skipping CUDA kernels, building CPU only ({reason})")
        ext = CppExtension(
            "isda._C",
            sources,
            include_dirs=[os.path.abspath(csrc)],
            extra_compile_args={"cxx": CXX_FLAGS},
        )
    return [ext], {"build_ext": BuildExtension}


def _require_torch():
    """Stops the build with the fix when torch is not importable, e.g. in pip's isolated build
    environment, which hides the torch the op must be compiled against."""
    if importlib.util.find_spec("torch") is None:
        raise SystemExit(
            "isda: torch is not importable in this build environment. isda._C is compiled against "
            "the torch it will run with: install torch (and Detectron2) first, then install isda "
            "with `pip install --no-build-isolation -e .`."
        )


_require_torch()
ext_modules, cmdclass = get_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
