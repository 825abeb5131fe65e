#!/usr/bin/env bash
# Start the app under Xvfb, drive it through its main screens and save PNGs into docs/screenshots/.
#   bash packaging/screenshots.sh [--model demo] [--dark] [--scale 2]     (options go to packaging/screenshots.py)
set -euo pipefail
cd "$(dirname "$0")/.."
# Xvfb, and the X libraries Qt's xcb platform plugin loads (libxcb-cursor0 since Qt 6.5).
PKGS="xvfb xauth libxcb-cursor0 libxkbcommon-x11-0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 \
libxcb-render-util0 libxcb-shape0 libxcb-xinerama0 libxcb-xkb1"
if ! command -v xvfb-run >/dev/null || ! ldconfig -p | grep -q libxcb-cursor.so.0; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $PKGS >/dev/null
  else
    echo "missing: Xvfb or Qt's X libraries (Debian/Ubuntu: sudo apt-get install $PKGS)" >&2
    exit 2
  fi
fi
QT_QPA_PLATFORM=xcb xvfb-run -a -s "-screen 0 3400x2100x24" .venv/bin/python packaging/screenshots.py "$@"
