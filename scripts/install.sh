#!/usr/bin/env bash
# Sets up a fresh machine: CPU torch first (pinned, so pip never pulls CUDA wheels), then the
# pinned stack (requirements.txt: engine + app) and this package in editable mode with its [app]
# extra (--no-deps: requirements.txt already holds every pin; pyproject.toml only gives ranges).
# `--dev` adds the test and lint tools (requirements-dev.txt) and Debian's chromium for the
# browser tests.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
dev=0
[ "${1:-}" = "--dev" ] && dev=1

"$py" -m pip install -q torch==2.13.0
"$py" -m pip install -q -r requirements.txt
"$py" -m pip install -q --no-deps -e ".[app]"
if [ "$dev" = 1 ]; then
  "$py" -m pip install -q -r requirements-dev.txt
  if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
      echo "note: chromium is missing; browser tests will be skipped (apt-get install chromium)" >&2
    fi
  fi
fi
