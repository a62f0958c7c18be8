#!/usr/bin/env bash
# Set up a fresh machine for textdiff: Tesseract OCR (for spelling evaluation) and a venv with the package.
# Idempotent: re-running reuses what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v tesseract >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tesseract-ocr >/dev/null
    else
        echo "setup_env: tesseract not found; install the tesseract-ocr package (spelling evaluation needs it)" >&2
    fi
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]' 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -c "import textdiff, torch, deepspeed, webdataset, open_clip" >/dev/null 2>&1 \
    || { echo "setup_env: the install failed; see pip's output above" >&2; exit 1; }
