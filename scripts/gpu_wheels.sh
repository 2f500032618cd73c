#!/usr/bin/env bash
# Run on a machine with package access, before going to a GPU machine that has torch but no
# network and no Detectron2: downloads, for CPython 3.12 on manylinux x86-64, every wheel that the
# GPU machine lacks into DEST (default .whl, which git ignores), at the versions of
# requirements.lock. Detectron2's Python code comes from the pinned sal-detectron2 file, hash-checked
# and repacked exactly as scripts/setup_env.sh does for the default stack.
#   scripts/gpu_wheels.sh [DEST]
# There, install them without network (docs/INSTALL.md):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site DEST/*.whl
#   export PYTHONPATH=/tmp/site
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${1:-$root/.whl}"
lock="$root/requirements.lock"
py="${PYTHON:-python3}"
# What Detectron2 and ISDA import that the GPU machine's image does not hold.
# All pure Python but pycocotools, which comes as the cp312 manylinux wheel.
pure=(fvcore iopath yacs termcolor omegaconf hydra-core antlr4-python3-runtime)
mkdir -p "$dest"
pins=()
for name in "${pure[@]}"; do
  pin="$(grep -i "^$name==" "$lock")" || { echo "gpu_wheels: $name is not in $lock" >&2; exit 1; }
  pins+=("$pin")
done
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
# Some are published as source only (fvcore, iopath, antlr4): pip wheel builds those here.
"$py" -m pip wheel -q --no-deps -w "$dest" "${pins[@]}"
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$dest" "$(grep -i '^pycocotools==' "$lock")"
"$py" "$root/scripts/detectron2_wheel.py" --dest "$dest/.sal" > "$dest/.sal-path"
mv "$(cat "$dest/.sal-path")" "$dest/"
rm -rf "$dest/.sal" "$dest/.sal-path"
ls -1 "$dest"
