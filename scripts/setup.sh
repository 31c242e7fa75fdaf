#!/usr/bin/env bash
# Create .venv (if missing) and install mdt-ray with its pinned dependencies. Idempotent: a second
# run only checks that the pins are satisfied.
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
reqs=requirements.txt
[ "${1:-}" = "--test" ] && reqs=requirements-test.txt
stamp=".venv/.installed-$(cat requirements.txt requirements-test.txt pyproject.toml | sha256sum | cut -c1-16)-$(basename $reqs)"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing $reqs (first run: about 2-3 minutes)"
  pip_install -r "$reqs"
  pip_install --no-deps -e .
  touch "$stamp"
fi
