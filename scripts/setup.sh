#!/usr/bin/env bash
# One-command setup on a fresh machine: a virtual environment in .venv with every dependency.
# torch is pinned to 2.13.0 so that pip takes the CPU wheel (an unpinned torch pulls a multi-GB CUDA build).
# Idempotent: re-running it only installs what changed. Chromium (for the web page's browser test) comes from Debian.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
TORCH_VERSION="${T5QA_TORCH_VERSION:-2.13.0}"

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=".venv/.t5qa-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet "torch==${TORCH_VERSION}"
  .venv/bin/python -m pip install --quiet -e ".[dev]"
  rm -f .venv/.t5qa-setup-*
  touch "$stamp"
fi

# A real browser for the web page's test (Debian's chromium). Skipped quietly where apt is unavailable;
# the browser test then skips with that reason.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "setup: could not install chromium; the browser test will be skipped" >&2
  else
    echo "setup: chromium not found; install it (apt-get install chromium) to run the browser test" >&2
  fi
fi
echo "setup: done. Activate with: source .venv/bin/activate"
