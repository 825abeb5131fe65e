#!/usr/bin/env bash
# Start the app under Xvfb, drive it through its main screens and save PNGs into docs/screenshots/.
#   bash packaging/screenshots.sh [--model demo] [--dark]     (options go to packaging/screenshots.py)
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v xvfb-run >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq xvfb xauth >/dev/null
  else
    echo "xvfb-run is missing (Debian/Ubuntu: sudo apt-get install xvfb xauth)" >&2
    exit 2
  fi
fi
QT_QPA_PLATFORM=xcb xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python packaging/screenshots.py "$@"
