#!/usr/bin/env bash
# The main job: brain segmentation of a real T1 MRI (Colin27) with the offline default model,
# written as a Slicer segmentation (.seg.nrrd) plus a PNG preview.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh worker
. .venv/bin/activate
biomedseg segment /usr/share/mricron/templates/ch2.nii.gz --model deepbet --prompt brain \
  -o out/ch2_brain.seg.nrrd --preview out/ch2_brain.png --overwrite
