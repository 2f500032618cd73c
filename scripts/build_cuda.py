#!/usr/bin/env python
"""Compiles ``isda._C`` with its CUDA kernels for a list of GPU architectures, without a GPU
(``make build-cuda``), and reads the compiled architectures back from the library.

    python scripts/build_cuda.py --archs "8.0;9.0;10.0;12.0+PTX" --build-dir build/cuda

The build goes to ``BUILD_DIR`` (``lib/`` holds the library, ``build.log`` the compiler's output);
the environment's installed ``isda`` is not touched. It fails, with one message, when nvcc is
missing under ``CUDA_HOME``, when its CUDA major differs from torch's, when the compiler prints a
warning, or when the library lacks one of the requested architectures (``cuobjdump``, from the
``nvidia-cuda-cuobjdump`` wheel or the toolkit).
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Compiler output lines that are warnings (gcc, nvcc, ptxas, cudafe).
WARNING = re.compile(r"warning", re.IGNORECASE)


class BuildError(RuntimeError):
    """The CUDA build cannot run here, failed, or does not hold what was asked for."""


def parse_archs(spec: str):
    """``"8.0;9.0;12.0+PTX"`` -> (["sm_80", "sm_90", "sm_120"], ["compute_120"])."""
    elf, ptx = [], []
    for item in filter(None, re.split(r"[;\s]+", spec)):
        match = re.fullmatch(r"(\d+)\.(\d+)(\+PTX)?", item)
        if not match:
            raise BuildError(f"--archs: {item!r} is not of the form 9.0 or 12.0+PTX")
        code = match.group(1) + match.group(2)
        elf.append(f"sm_{code}")
        if match.group(3):
            ptx.append(f"compute_{code}")
    if not elf:
        raise BuildError("--archs names no architecture")
    return elf, ptx


def _is_toolkit(path) -> bool:
    return bool(path) and all(
        os.path.isfile(os.path.join(path, *part))
        for part in (("bin", "nvcc"), ("include", "cuda.h"))
    )


def find_cuda_home():
    """The toolkit to build with: ``CUDA_HOME`` (or ``CUDA_PATH``) when set, else the first real
    toolkit (nvcc and headers) among /usr/local/cuda and torch's guess. torch guesses from the
    ``nvcc`` on PATH, which is a wrapper script outside the toolkit on some machines."""
    from torch.utils.cpp_extension import CUDA_HOME

    explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if explicit:
        return explicit
    return next((p for p in ("/usr/local/cuda", CUDA_HOME) if _is_toolkit(p)), CUDA_HOME)


def check_toolkit(cuda_home):
    """(nvcc path, CUDA version); raises when nvcc is missing or its major is not torch's."""
    import torch

    if torch.version.cuda is None:
        raise BuildError(
            f"torch {torch.__version__} is a CPU-only build: it has no CUDA to build for"
        )
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
    if not nvcc or not os.path.isfile(nvcc):
        raise BuildError(
            f"nvcc was not found (CUDA_HOME={cuda_home}). Install the CUDA {torch.version.cuda} "
            "toolkit and set CUDA_HOME to it."
        )
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    match = re.search(r"release (\d+)\.(\d+)", out)
    if not match:
        raise BuildError(f"{nvcc} --version did not say its release:\n{out}")
    if match.group(1) != torch.version.cuda.split(".")[0]:
        raise BuildError(
            f"{nvcc} is CUDA {match.group(1)}.{match.group(2)}, torch {torch.__version__} is built "
            f"with CUDA {torch.version.cuda}: the majors must match. Point CUDA_HOME at a CUDA "
            f"{torch.version.cuda.split('.')[0]}.x toolkit."
        )
    return nvcc, f"{match.group(1)}.{match.group(2)}"


def compile_library(archs: str, build_dir: str, cuda_home: str) -> str:
    """Runs setup.py build_ext into ``build_dir``; returns the library's path."""
    log_path = os.path.join(build_dir, "build.log")
    shutil.rmtree(os.path.join(build_dir, "lib"), ignore_errors=True)
    os.makedirs(build_dir, exist_ok=True)
    env = dict(os.environ, FORCE_CUDA="1", TORCH_CUDA_ARCH_LIST=archs, CUDA_HOME=cuda_home)
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    cmd = [sys.executable, "setup.py", "build_ext", "--build-temp", os.path.join(build_dir, "temp")]
    cmd += ["--build-lib", os.path.join(build_dir, "lib")]
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        with open(log_path) as f:
            tail = "".join(f.readlines()[-30:])
        raise BuildError(f"the CUDA build failed (full log: {log_path}):\n{tail}")
    (library,) = glob.glob(os.path.join(build_dir, "lib", "isda", "_C*.so"))
    return library


def compiler_warnings(build_dir: str):
    """The warning lines of the compiler's output in ``build_dir/build.log``."""
    with open(os.path.join(build_dir, "build.log")) as f:
        return [line.rstrip() for line in f if WARNING.search(line)]


def build(archs: str, build_dir: str) -> dict:
    """Checks the toolkit, compiles, and checks the result; returns what was built."""
    want_elf, want_ptx = parse_archs(archs)
    cuda_home = find_cuda_home()
    nvcc, cuda = check_toolkit(cuda_home)
    print(f"build-cuda: nvcc {cuda} ({nvcc}), archs {archs} -> {build_dir}", flush=True)
    start = time.monotonic()
    library = compile_library(archs, build_dir, cuda_home)
    seconds = time.monotonic() - start
    warnings = compiler_warnings(build_dir)
    if warnings:
        raise BuildError(
            f"the compiler printed {len(warnings)} warning(s):\n" + "\n".join(warnings)
        )
    from isda.check import compiled_cuda_archs

    archs = compiled_cuda_archs(library, cuda_home)
    if archs is None:
        raise BuildError("cuobjdump was not found: pip install nvidia-cuda-cuobjdump")
    missing = sorted(set(want_elf + want_ptx) - set(archs))
    if missing:
        raise BuildError(f"{library} lacks {', '.join(missing)} (it has {', '.join(archs)})")
    elf = [a for a in archs if a.startswith("sm_")]
    ptx = [a for a in archs if a.startswith("compute_")]
    return {"library": library, "elf": elf, "ptx": ptx, "seconds": seconds}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--archs", default="8.0;9.0;10.0;12.0+PTX", help="TORCH_CUDA_ARCH_LIST form")
    p.add_argument("--build-dir", default=os.path.join(ROOT, "build", "cuda"), metavar="DIR")
    args = p.parse_args(argv)
    try:
        result = build(args.archs, os.path.abspath(args.build_dir))
    except BuildError as e:
        print(f"build-cuda: {e}", file=sys.stderr)
        return 1
    print(
        f"build-cuda: {result['library']} in {result['seconds']:.0f} s, no compiler warnings; "
        f"ELF {' '.join(result['elf'])}; PTX {' '.join(result['ptx']) or 'none'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
