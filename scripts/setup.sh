#!/usr/bin/env bash
# Set up mlx_voxtral in ./.venv on a fresh machine (Linux or macOS).
#
#   bash scripts/setup.sh          # the package and its runtime dependencies
#   bash scripts/setup.sh --dev    # plus the test stack (pytest, transformers, torch CPU)
set -euo pipefail
cd "$(dirname "$0")/.."

dev=0
[ "${1:-}" = "--dev" ] && dev=1

if [ "$(uname -s)" = "Linux" ] && command -v apt-get >/dev/null 2>&1; then
  # libopenblas0-pthread: the fast BLAS mlx_voxtral puts under MLX's CPU backend.
  # ffmpeg/libsndfile1: audio decoding. espeak-ng/sox: speech synthesis for the tests.
  # chromium/chromium-driver: the live page's test in a real headless browser.
  packages="libopenblas0-pthread libsndfile1 ffmpeg"
  [ "$dev" = 1 ] && packages="$packages espeak-ng sox chromium chromium-driver"
  missing=""
  for p in $packages; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
  if [ -n "$missing" ]; then
    SUDO=""; [ "$(id -u)" != "0" ] && SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq $missing >/dev/null
  fi
elif [ "$(uname -s)" = "Darwin" ] && [ "$dev" = 1 ] && command -v brew >/dev/null 2>&1; then
  brew list espeak-ng >/dev/null 2>&1 || brew install espeak-ng sox
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "$dev" = 1 ]; then
  # The CPU build of torch 2.13 (the reference implementation runs on it in the tests).
  .venv/bin/python -m pip install -q "torch==2.13.0" -e ".[dev,serve]"
else
  .venv/bin/python -m pip install -q -e ".[serve]"
fi
echo "mlx_voxtral is installed in $(pwd)/.venv"
