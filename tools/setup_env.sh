#!/usr/bin/env bash
# Set up a fresh machine for textdiff: Debian packages (Tesseract OCR, scene-text assets) and a venv with the package.
# Idempotent: re-running reuses what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
# Debian packages: Tesseract OCR (spelling evaluation) and the fonts, photographs and word list of the
# scene-text test set (textdiff/data/scene_text.py; about 88 MB to download, 126 MB installed).
SCENE_TEXT_PACKAGES="wamerican lomiri-wallpapers-16.04 mate-backgrounds fonts-dejavu-core fonts-dejavu-extra
    fonts-liberation2 fonts-freefont-ttf fonts-urw-base35 fonts-crosextra-carlito fonts-crosextra-caladea
    fonts-roboto-unhinted fonts-roboto-slab fonts-open-sans fonts-lato fonts-ebgaramond fonts-cantarell fonts-comfortaa"
missing=""
command -v tesseract >/dev/null 2>&1 || missing="tesseract-ocr"
if command -v dpkg-query >/dev/null 2>&1; then
    for package in $SCENE_TEXT_PACKAGES; do
        case "$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null || true)" in
            *" ok installed") ;;
            *) missing="$missing $package" ;;
        esac
    done
fi
if [ -n "$missing" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
    else
        echo "setup_env: missing Debian packages:$missing; install them as root (tesseract-ocr for spelling" \
            "evaluation, the others for textdiff.data.scene_text)" >&2
    fi
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]' 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -c "import textdiff, torch, deepspeed, webdataset, open_clip" >/dev/null 2>&1 \
    || { echo "setup_env: the install failed; see pip's output above" >&2; exit 1; }
