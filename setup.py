"""Installs the `isda` package from projects/ISDA and builds its native op `isda._C`."""
import glob
import os

from setuptools import find_packages, setup

PKG_ROOT = os.path.join("projects", "ISDA")


def get_extensions():
    """The native deformable-attention op; the package works without it (reference path)."""
    csrc = os.path.join(PKG_ROOT, "isda", "csrc")
    sources = sorted(glob.glob(os.path.join(csrc, "*.cpp")) + glob.glob(os.path.join(csrc, "cpu", "*.cpp")))
    if not sources:
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext = CppExtension("isda._C", sources, include_dirs=[os.path.abspath(csrc)])
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = get_extensions()

setup(
    name="isda",
    version="0.1.0",
    description="ISDA: position-aware instance segmentation with deformable attention, for Detectron2",
    package_dir={"": PKG_ROOT},
    packages=find_packages(PKG_ROOT),
    python_requires=">=3.10",
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
