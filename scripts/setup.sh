#!/usr/bin/env bash
# Create .venv with the CPU torch and biomedseg (plus extras), and the Debian data/tools it needs.
# Usage: scripts/setup.sh [extras]     e.g. scripts/setup.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-worker}"
APT_PACKAGES=(mricron-data)
if [ "$EXTRAS" = "test" ]; then APT_PACKAGES+=(dicom3tools teem-apps nifti-bin); fi
# Qt (PySide6) offscreen for the panel tests and scripts/render_panel.py: GL/EGL, fonts, xkb, glib, dbus.
if [ "$EXTRAS" = "test" ]; then
  APT_PACKAGES+=(libgl1 libegl1 libfontconfig1 libxkbcommon0 libglib2.0-0 libdbus-1-3 fonts-dejavu-core)
fi

missing=()
for p in "${APT_PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "installing Debian packages: ${missing[*]}" >&2
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >&2
fi

PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v '^WARNING: Location' >&2 || true
# The CPU build of torch first, so no dependency pulls the multi-GB CUDA build.
python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0 2>&1 | grep -v '^WARNING: Location' >&2 || true
python -c "import torch" 2>/dev/null || { echo "torch could not be installed" >&2; exit 1; }
pip install -q -e ".[${EXTRAS}]" 2>&1 | grep -v '^WARNING: Location' >&2 || true
if [ "$EXTRAS" = "test" ]; then
  # The CLIP BPE vocabulary the BiomedParse tokenizer tests read ships in this wheel; its
  # dependencies (torchvision, timm) are not wanted, and it is never imported.
  pip install -q --no-deps open_clip_torch 2>&1 | grep -v '^WARNING: Location' >&2 || true
fi
python -c "import biomedseg" || { echo "biomedseg could not be installed" >&2; exit 1; }
