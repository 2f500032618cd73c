#!/usr/bin/env bash
# Prepares a virtual environment at the checkout root for one of the two tested stacks, and installs
# `isda` into it in editable mode (docs/INSTALL.md):
#   default  .venv         Python 3.12, requirements.lock         (torch 2.14.1, Detectron2's Python
#                          code repacked from the pinned sal-detectron2 file by detectron2_wheel.py)
#   oldest   .venv-oldest  Python 3.10, requirements-oldest.lock  (torch 2.3.1, sal-detectron2 as
#                          published, its detectron2._C included)
# Usage: scripts/setup_env.sh [default|oldest]   (or STACK=oldest). ISDA_PYTHON=/path/to/python3.X
# picks the interpreter. Idempotent: when nothing changed since the last run it returns at once.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
stack="${1:-${STACK:-default}}"
case "$stack" in
  default) want_py=3.12; venv="$root/.venv"; lock="$root/requirements.lock" ;;
  oldest) want_py=3.10; venv="$root/.venv-oldest"; lock="$root/requirements-oldest.lock" ;;
  *) echo "setup: unknown stack '$stack' (use 'default' or 'oldest')" >&2; exit 2 ;;
esac

find_python() {  # an interpreter of version $want_py, from ISDA_PYTHON, PATH or pyenv
  local c
  for c in "${ISDA_PYTHON:-}" "$(command -v "python$want_py" 2>/dev/null || true)" \
           "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$want_py".*/bin/python"$want_py"; do
    [ -n "$c" ] && [ -x "$c" ] || continue
    if "$c" -c "import sys; sys.exit(sys.version_info[:2] != tuple(map(int, '$want_py'.split('.'))))" 2>/dev/null; then
      echo "$c"; return 0
    fi
  done
  return 1
}

stamp_of() {  # what the installed environment was built from (a missing file counts as empty)
  { cat "$lock" pyproject.toml setup.py scripts/detectron2_wheel.py scripts/sal-detectron2.sha256 \
      $(find projects/ISDA/isda/csrc -type f 2>/dev/null | sort) 2>/dev/null || true; } |
    sha256sum | cut -c1-16
}

want="$(stamp_of)"
if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/.isda-stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi

if [ ! -x "$venv/bin/python" ]; then
  py="$(find_python)" || {
    echo "setup: Python $want_py was not found (stack '$stack'). Install it (e.g. 'pyenv install $want_py') or set ISDA_PYTHON=/path/to/python$want_py." >&2
    exit 1
  }
  echo "setup: creating $venv with $py"
  "$py" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
echo "setup: installing the '$stack' stack from $(basename "$lock") (first run downloads about 3 GB; later runs take seconds)"
# The lock pins pip, setuptools and wheel too; pip goes first so that it installs the rest.
"${pip[@]}" install -q "$(grep '^pip==' "$lock")"
"${pip[@]}" install -q -r "$lock"
if [ "$stack" = default ]; then
  # Detectron2's Python code without its 3.10-only _C, from the hash-checked pinned file.
  wheel="$("$venv/bin/python" scripts/detectron2_wheel.py --dest "$venv/detectron2-wheel")"
  "${pip[@]}" install -q --no-deps --force-reinstall "$wheel"
fi
echo "setup: installing isda (editable) and building isda._C"
# PEP 660 editable install. No build isolation: isda._C must compile against the venv's torch.
# No dependency resolution: the lock is the whole environment, and `pip check` proves it holds
# every dependency pyproject.toml and Detectron2 declare.
"${pip[@]}" install -q --no-build-isolation --no-deps -e .
"${pip[@]}" check
echo "$want" > "$venv/.isda-stamp"
echo "setup: ready ($("$venv/bin/python" -c 'import sys, torch, detectron2; print("Python", sys.version.split()[0], "torch", torch.__version__, "detectron2", detectron2.__version__)'))"
