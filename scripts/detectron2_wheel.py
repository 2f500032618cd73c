#!/usr/bin/env python
"""Detectron2's Python code as a pure wheel, from the pinned ``sal-detectron2`` file.

Detectron2 is not published on the package index under its own name. ``sal-detectron2==0.7.2`` is
Detectron2's main branch (version 0.7.2) as a wheel. Its file name says ``cp310-none-any`` but its
WHEEL metadata says ``cp310-cp310-linux_x86_64``, and it carries a ``detectron2/_C`` built for
CPython 3.10 + torch 2.3.1 + CUDA 12.1, which cannot load on any other stack. Its Python code is
version-neutral. So, for the default stack, this script:

1. downloads exactly that file (``pip download``), or takes it from ``--wheel``;
2. refuses it unless its sha256 equals the one kept in ``scripts/sal-detectron2.sha256``;
3. writes ``sal_detectron2-0.7.2-py3-none-any.whl`` without ``_C``: WHEEL says ``py3-none-any``
   and ``Root-Is-Purelib: true``, METADATA drops the ``numpy<2`` pin (the suite passes on numpy 2
   with Detectron2's Python code, docs/INSTALL.md), and RECORD lists the new hashes.

Without ``_C``, COCO evaluation uses pycocotools (Detectron2's own fallback), and ISDA needs
nothing else from it.

    python scripts/detectron2_wheel.py --dest DIR      # prints the path of the pure wheel
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
HASH_FILE = os.path.join(HERE, "sal-detectron2.sha256")
NAME, VERSION = "sal-detectron2", "0.7.2"
SOURCE_NAME = "sal_detectron2-0.7.2-cp310-none-any.whl"
PURE_NAME = "sal_detectron2-0.7.2-py3-none-any.whl"
DIST_INFO = "sal_detectron2-0.7.2.dist-info"
# Pins of the published metadata that the pure wheel drops, with the reason in the module docstring.
DROPPED_REQUIREMENTS = ("Requires-Dist: numpy<2",)


class WheelError(RuntimeError):
    """The downloaded file is not the pinned one, or not the wheel it should be."""


def expected_sha256() -> str:
    """The pinned file's sha256, from ``scripts/sal-detectron2.sha256`` (``<hex>  <file name>``)."""
    with open(HASH_FILE) as f:
        digest, name = f.read().split()
    if name != SOURCE_NAME:
        raise WheelError(f"{HASH_FILE} pins {name}, expected {SOURCE_NAME}")
    return digest


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_hash(path: str) -> None:
    """Raises :class:`WheelError` naming the file when its sha256 is not the pinned one."""
    want, got = expected_sha256(), sha256_of(path)
    if got != want:
        raise WheelError(
            f"{path}: sha256 {got} does not match the pinned {want} ({HASH_FILE}). The download "
            "is corrupt or is not the published sal-detectron2 0.7.2; delete it and run the "
            "setup again. Nothing was installed."
        )


def download(dest: str) -> str:
    """``pip download`` of the pinned file into ``dest``; returns its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", "3.10", "--disable-pip-version-check", "-q", "-d", dest]
    subprocess.run(cmd + [f"{NAME}=={VERSION}"], check=True)
    path = os.path.join(dest, SOURCE_NAME)
    if not os.path.isfile(path):
        raise WheelError(f"pip download did not produce {path}")
    return path


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def _rewrite(name: str, data: bytes) -> bytes:
    """The pure wheel's version of one dist-info file."""
    text = data.decode()
    if name == f"{DIST_INFO}/WHEEL":
        # Blank lines go too: one ends the header block, and pip would not read the new tag.
        lines = [
            ln
            for ln in text.splitlines()
            if ln.strip() and not ln.startswith(("Tag:", "Root-Is-Purelib:"))
        ]
        text = "\n".join(lines + ["Root-Is-Purelib: true", "Tag: py3-none-any"]) + "\n"
    elif name == f"{DIST_INFO}/METADATA":
        text = "".join(
            ln for ln in text.splitlines(True) if ln.rstrip() not in DROPPED_REQUIREMENTS
        )
    return text.encode()


def _is_extension(name: str) -> bool:
    return name.startswith("detectron2/_C") and name.endswith(".so")


def repack(source: str, dest_dir: str) -> str:
    """Writes the pure wheel of ``source`` (already hash-checked) into ``dest_dir``."""
    out = os.path.join(dest_dir, PURE_NAME)
    record_name = f"{DIST_INFO}/RECORD"
    records = []
    fd, tmp = tempfile.mkstemp(dir=dest_dir, suffix=".part")
    os.close(fd)
    try:
        with (
            zipfile.ZipFile(source) as zin,
            zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout,
        ):
            names = zin.namelist()
            if not any(_is_extension(n) for n in names) or record_name not in names:
                raise WheelError(f"{source}: not the expected sal-detectron2 wheel layout")
            for name in names:
                if _is_extension(name) or name == record_name:
                    continue
                data = zin.read(name)
                if name.startswith(f"{DIST_INFO}/"):
                    data = _rewrite(name, data)
                zout.writestr(name, data)
                records.append(_record_line(name, data))
            zout.writestr(record_name, "\n".join(records + [f"{record_name},,"]) + "\n")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


def pure_wheel(dest: str, wheel: str | None = None) -> str:
    """Downloads (unless ``wheel`` is given), checks and repacks; returns the pure wheel's path."""
    os.makedirs(dest, exist_ok=True)
    source = wheel or download(dest)
    check_hash(source)
    return repack(source, dest)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dest", required=True, metavar="DIR", help="folder for both wheels")
    p.add_argument("--wheel", metavar="FILE", help=f"use this {SOURCE_NAME} instead of downloading")
    args = p.parse_args(argv)
    try:
        print(pure_wheel(args.dest, args.wheel))
    except (WheelError, OSError, zipfile.BadZipFile) as e:
        print(f"detectron2_wheel: {e}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as e:
        print(f"detectron2_wheel: pip download of {NAME}=={VERSION} failed ({e})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
