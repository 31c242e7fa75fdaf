#!/usr/bin/env bash
# Create .venv (if missing) and install mdt-ray with its pinned dependencies. Idempotent: a second
# run only checks that the pins are satisfied.
#   PYTHON=python3.11        the interpreter .venv is made from
#   TORCH_INDEX_URL=URL      install the pinned torch from this index first (pip's --index-url),
#                            e.g. https://download.pytorch.org/whl/cpu for the CPU build; unset,
#                            torch comes from pip's configured indexes like everything else
#                            (PyPI's Linux build of the pin is the CUDA one)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
# pip's warnings about unreachable extra package indexes are noise: show the rest, fail on failure.
pip_install() {
  local log rc=0
  log=$(mktemp)
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@" >"$log" 2>&1 || rc=$?
  grep -v "^WARNING: Location" "$log" >&2 || true
  rm -f "$log"
  [ "$rc" -eq 0 ] || { echo "[setup] pip install $* failed" >&2; exit "$rc"; }
}
torch_pin=$(grep -E '^torch==' requirements.txt)
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  torch_stamp=".venv/.torch-$(printf '%s %s' "$torch_pin" "$TORCH_INDEX_URL" | sha256sum | cut -c1-16)"
  if [ ! -f "$torch_stamp" ]; then
    echo "[setup] installing $torch_pin from $TORCH_INDEX_URL"
    # A torch already installed satisfies the pin whatever its build and pip would keep it: to
    # switch builds (CPU <-> CUDA) it goes first; the new build then brings what it lacks (CUDA's
    # nvidia-* wheels) and keeps the rest.
    .venv/bin/python -m pip uninstall --quiet --yes torch >/dev/null 2>&1 || true
    pip_install --index-url "$TORCH_INDEX_URL" "$torch_pin"
    touch "$torch_stamp"
  fi
fi
reqs=requirements.txt
[ "${1:-}" = "--test" ] && reqs=requirements-test.txt
stamp=".venv/.installed-$(cat requirements.txt requirements-test.txt pyproject.toml | sha256sum | cut -c1-16)-$(basename $reqs)"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing $reqs (first run: minutes, see README \"Installing\")"
  pip_install -r "$reqs"
  pip_install --no-deps -e .
  touch "$stamp"
fi
