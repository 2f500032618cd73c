#!/usr/bin/env bash
# Prepares .venv at the checkout root: Python 3.10, the locked stack, and `isda` in editable mode.
# Idempotent: when nothing changed since the last run it returns in about a second.
#   ISDA_PYTHON=/path/to/python3.10  picks the interpreter explicitly.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv"
lock="$root/requirements.lock"

find_python310() {
  local c
  for c in "${ISDA_PYTHON:-}" "$(command -v python3.10 2>/dev/null || true)" \
           "$(pyenv prefix 3.10.13 2>/dev/null || true)/bin/python3.10" \
           "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.10*/bin/python3.10; do
    [ -n "$c" ] && [ -x "$c" ] || continue
    if "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 10))' 2>/dev/null; then
      echo "$c"; return 0
    fi
  done
  return 1
}

stamp_of() {  # what the installed environment was built from
  cat "$lock" pyproject.toml setup.py $(find projects/ISDA/isda/csrc -type f 2>/dev/null | sort) 2>/dev/null | sha256sum | cut -c1-16
}

want="$(stamp_of)"
if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/.isda-stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi

if [ ! -x "$venv/bin/python" ]; then
  py="$(find_python310)" || {
    echo "setup: Python 3.10 was not found. Install it (e.g. 'pyenv install 3.10.13') or set ISDA_PYTHON=/path/to/python3.10." >&2
    exit 1
  }
  echo "setup: creating $venv with $py"
  "$py" -m venv "$venv"
fi
echo "setup: installing the locked stack (first run downloads about 2.5 GB; later runs take seconds)"
"$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip==24.2 setuptools==69.5.1 wheel==0.43.0
"$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$lock"
echo "setup: installing isda (editable) and building isda._C"
# PEP 660 editable install. No build isolation: isda._C must compile against the venv's torch.
# No dependency resolution: the lock is the whole environment, and `pip check` proves it holds
# every dependency pyproject.toml declares.
"$venv/bin/python" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
"$venv/bin/python" -m pip check --disable-pip-version-check
echo "$want" > "$venv/.isda-stamp"
echo "setup: ready ($("$venv/bin/python" -c 'import torch, detectron2; print("torch", torch.__version__, "detectron2", detectron2.__version__)'))"
