"""Reference llama.cpp tools for EdgeTailor benchmarks.

The benchmarks in ``bench/`` compare EdgeTailor side by side with llama.cpp's
own tools. This module gets those tools from the *same* llama.cpp source that
the installed ``llama-cpp-python`` package was built from, builds them, and
runs them. It needs only the standard library (Python 3.11+).

How it works
------------
1. **Fetch**: ``python -m pip download --no-binary :all: --no-deps
   llama-cpp-python==<version> -d <cache>/sdist``. ``<version>`` comes from
   ``importlib.metadata.version('llama-cpp-python')``. If that package is not
   installed, the newest sdist already in the cache is used, and pip downloads
   the latest release only when the cache holds none (or ``refresh=True``).
   ``$EDGETAILOR_LLAMA_CPP_VERSION`` overrides the version.
2. **Unpack** to ``<cache>/src/<sdist-dir>``. The llama.cpp source is at
   ``vendor/llama.cpp`` inside it.
3. **Build** with CMake (Release, ``GGML_NATIVE=ON``,
   ``BUILD_SHARED_LIBS=OFF``, ``LLAMA_CURL=OFF``, ``LLAMA_OPENSSL=OFF``, no
   tests, examples or server). Only the targets ``llama-perplexity``,
   ``llama-imatrix`` and ``llama-quantize`` are built, into
   ``<cache>/build/<version>/bin``. With ``BUILD_SHARED_LIBS=OFF``, libllama
   and libggml are linked statically. The binaries still use the system's
   libc, libstdc++ and libgomp. If every binary is already there, nothing is
   rebuilt. A file lock lets concurrent callers share one build.

``<cache>`` is ``$EDGETAILOR_BENCH_CACHE`` if set, else
``~/.cache/edgetailor-bench``. It is always outside the repository.

Caveats
-------
* **Logging patch.** llama.cpp's common logger prints from a worker thread
  and never flushes at exit (ggml-org/llama.cpp#22142). When output goes to
  a pipe, the tools often lose their last lines, including
  ``Final estimate: PPL = ...``. Before building, we append a small atexit
  flush to ``common/log.cpp`` (see ``_LOG_FLUSH_PATCH``). It changes logging
  only. The build stamp records ``PATCH_LEVEL``, so builds from before the
  patch are rebuilt (incrementally).
* ``GGML_NATIVE=ON`` builds for the host CPU (``-march=native``). Don't share
  a cache between machines with different CPUs, or the binaries may crash
  with SIGILL. Use ``force=True`` or delete ``<cache>/build/<version>`` to
  rebuild.
* The converter ``vendor/llama.cpp/convert_hf_to_gguf.py`` has to use its own
  ``gguf-py``, not the ``gguf`` package from PyPI, which may be older or newer.
  :func:`run_convert` puts that ``gguf-py`` first on ``PYTHONPATH`` and removes
  ``NO_LOCAL_GGUF``. The converter also needs torch, numpy, sentencepiece,
  transformers, safetensors, plus tqdm, pyyaml and requests for ``gguf-py``.
  Newer converters also import the ``conversion`` package next to the script.
* In this llama.cpp, ``llama-imatrix`` writes the **GGUF** imatrix format by
  default, whatever the file name (it only warns if the name doesn't end in
  ``.gguf``). Pass ``output_format='dat'`` for the legacy format.
  ``llama-quantize --imatrix`` reads both.

Python API
----------
``ensure_tools() -> dict``
    Keys ``perplexity``, ``imatrix``, ``quantize`` (binary Paths),
    ``convert_hf_to_gguf`` (Path to the converter script), ``gguf_py`` (Path
    to its gguf-py, which must be on PYTHONPATH), ``llama_cpp_dir``,
    ``version``.
``run_convert(hf_dir, out_path, outtype='f16') -> seconds``
``run_quantize(src, dst, type_name, imatrix=None, threads=2) -> seconds``
``run_imatrix(model, text_file, out, ctx=512, chunks=100, threads=2) -> seconds``
``run_perplexity(model, text_file, ctx=512, chunks=100, threads=2) -> (ppl, seconds)``

The ``run_*`` helpers raise :class:`ToolError` (which includes the end of the
tool's output) when a tool fails. With ``log_path=...`` they also write the
full output to that file.

CLI
---
``python bench/reference_tools.py [--version X] [--force] [--jobs N]``
builds everything (if needed) and prints the paths as JSON on stdout. Progress
goes to stderr.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

__all__ = [
    "TARGETS",
    "ToolError",
    "cache_dir",
    "ensure_tools",
    "installed_version",
    "parse_final_ppl",
    "run_convert",
    "run_imatrix",
    "run_perplexity",
    "run_quantize",
]

#: Key in the ensure_tools() dict -> CMake target / executable name.
TARGETS: dict[str, str] = {
    "perplexity": "llama-perplexity",
    "imatrix": "llama-imatrix",
    "quantize": "llama-quantize",
}

PACKAGE = "llama-cpp-python"

#: CMake cache options for the reference build. An option that a given
#: llama.cpp version doesn't know only causes a CMake warning. In recent
#: llama.cpp, LLAMA_CURL is deprecated and ignored; HTTPS comes from
#: LLAMA_OPENSSL, which we also turn off since the tools never download.
CMAKE_OPTIONS: dict[str, str] = {
    "CMAKE_BUILD_TYPE": "Release",
    "LLAMA_CURL": "OFF",
    "LLAMA_OPENSSL": "OFF",
    "GGML_NATIVE": "ON",
    "LLAMA_BUILD_TESTS": "OFF",
    "LLAMA_BUILD_EXAMPLES": "OFF",
    "LLAMA_BUILD_SERVER": "OFF",
    "LLAMA_BUILD_APP": "OFF",
    "BUILD_SHARED_LIBS": "OFF",
    # as packaging/setup.sh builds llama-cpp-python: llama.cpp's AMX kernels die with SIGILL (tilezero) on
    # Intel Xeons with AMX under some hypervisors; the AVX-512 kernels run everywhere AVX-512 does
    "CMAKE_C_FLAGS": "-U__AMX_INT8__ -U__AMX_TILE__ -U__AMX_BF16__",
    "CMAKE_CXX_FLAGS": "-U__AMX_INT8__ -U__AMX_TILE__ -U__AMX_BF16__",
}

#: Bump when the source patches below change, so cached builds get rebuilt.
PATCH_LEVEL = 1

_PATCH_MARKER = "// edgetailor-bench: flush async logger at exit"

#: Appended to common/log.cpp. llama.cpp's common logger prints from a worker
#: thread and leaks its singleton on purpose (ggml-org/llama.cpp#22142). So
#: whatever is still queued when a tool returns from main() can be lost. With
#: stdout/stderr on a pipe this often drops the last lines, including
#: ``Final estimate: PPL = ...``. The patch registers an atexit handler that
#: stops the worker, which first drains the queue. It only touches logging,
#: not the numbers. ``common_log_main()`` is called before ``atexit`` so that
#: in older versions, where the logger is a static object with a destructor,
#: our handler runs before that destructor.
_LOG_FLUSH_PATCH = (
    _PATCH_MARKER
    + """
namespace {
struct edgetailor_log_flush_at_exit {
    edgetailor_log_flush_at_exit() {
        common_log_main();
        std::atexit([]() { common_log_pause(common_log_main()); });
    }
} edgetailor_log_flush_at_exit_instance;
}
"""
)

_FINAL_PPL_RE = re.compile(
    r"Final estimate:\s*PPL\s*=\s*([0-9.eE+-]+|nan|inf)\s*\+/-\s*([0-9.eE+-]+|nan|inf)"
)


class ToolError(RuntimeError):
    """A reference tool (or the build) failed. ``output`` holds its log."""

    def __init__(self, message: str, output: str = ""):
        tail = "\n".join(output.splitlines()[-40:])
        super().__init__(f"{message}\n--- last lines of output ---\n{tail}" if tail else message)
        self.output = output


def _log(msg: str) -> None:
    print(f"[reference_tools] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Locations
# --------------------------------------------------------------------------


def cache_dir() -> Path:
    """The cache root: ``$EDGETAILOR_BENCH_CACHE`` or ``~/.cache/edgetailor-bench``."""
    env = os.environ.get("EDGETAILOR_BENCH_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "edgetailor-bench"
    return root.resolve()


def installed_version() -> str | None:
    """Version of the installed llama-cpp-python, or None if it isn't installed."""
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None


@contextlib.contextmanager
def _locked(cache: Path):
    """Lock the cache so that concurrent callers don't build at the same time."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --------------------------------------------------------------------------
# Fetch + unpack
# --------------------------------------------------------------------------

_SDIST_RE = re.compile(r"^llama[-_]cpp[-_]python-(?P<ver>.+)\.tar\.gz$")


def _version_key(ver: str) -> tuple:
    """Rough PEP 440 sort key (numeric parts first). Good enough for x.y.z."""
    parts = re.split(r"[.+-]", ver)
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)


def _cached_sdists(sdist_dir: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    if sdist_dir.is_dir():
        for p in sdist_dir.iterdir():
            m = _SDIST_RE.match(p.name)
            if m:
                out[m.group("ver")] = p
    return out


def fetch_sdist(version: str | None = None, refresh: bool = False) -> tuple[Path, str]:
    """Return ``(sdist_path, version)``, downloading the sdist with pip if needed.

    ``version=None`` means: ``$EDGETAILOR_LLAMA_CPP_VERSION``, else the
    installed llama-cpp-python, else the newest cached sdist, else the latest
    release on the index. With ``refresh=True`` and no pinned version, pip is
    asked for the latest release even if an sdist is cached.
    """
    sdist_dir = cache_dir() / "sdist"
    sdist_dir.mkdir(parents=True, exist_ok=True)
    version = version or os.environ.get("EDGETAILOR_LLAMA_CPP_VERSION") or installed_version()

    cached = _cached_sdists(sdist_dir)
    if version and version in cached:
        return cached[version], version
    if not version and cached and not refresh:
        best = max(cached, key=_version_key)
        return cached[best], best

    spec = f"{PACKAGE}=={version}" if version else PACKAGE
    _log(f"downloading sdist {spec} ...")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-binary",
        ":all:",
        "--no-deps",
        spec,
        "-d",
        str(sdist_dir),
    ]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    if proc.returncode != 0:
        raise ToolError(f"pip download failed: {' '.join(cmd)}", proc.stdout)

    after = _cached_sdists(sdist_dir)
    if version:
        if version not in after:
            raise ToolError(f"pip download did not produce an sdist for {version}", proc.stdout)
        return after[version], version
    # Latest: pip prints "Saved <path>" or "File was already downloaded <path>".
    m = re.search(r"(?:Saved|File was already downloaded)\s+(\S+\.tar\.gz)", proc.stdout)
    if m:
        mm = _SDIST_RE.match(Path(m.group(1)).name)
        if mm:
            return sdist_dir / Path(m.group(1)).name, mm.group("ver")
    new = set(after) - set(cached)
    if not new:
        raise ToolError("could not determine which sdist pip downloaded", proc.stdout)
    best = max(new, key=_version_key)
    return after[best], best


def unpack_sdist(sdist: Path, version: str) -> Path:
    """Unpack the sdist (once) and return its ``vendor/llama.cpp`` directory."""
    src_root = cache_dir() / "src"
    dest = src_root / f"llama_cpp_python-{version}"
    llama_dir = dest / "vendor" / "llama.cpp"
    if (llama_dir / "CMakeLists.txt").is_file():
        return llama_dir

    _log(f"unpacking {sdist.name} ...")
    src_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=src_root))
    try:
        with tarfile.open(sdist) as tf:
            tf.extractall(tmp, filter="data")
        tops = [p for p in tmp.iterdir() if p.is_dir()]
        if len(tops) != 1:
            raise ToolError(f"unexpected sdist layout in {sdist}: {[p.name for p in tops]}")
        if dest.exists():
            shutil.rmtree(dest)
        tops[0].rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    if not (llama_dir / "CMakeLists.txt").is_file():
        raise ToolError(f"{sdist} has no vendor/llama.cpp/CMakeLists.txt")
    return llama_dir


# --------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------


def apply_patches(llama_dir: Path) -> None:
    """Apply our build-only patches to the unpacked source (idempotent). See _LOG_FLUSH_PATCH."""
    log_cpp = llama_dir / "common" / "log.cpp"
    if not log_cpp.is_file():
        _log(f"warning: {log_cpp} not found; not applying the log-flush patch")
        return
    text = log_cpp.read_text()
    if _PATCH_MARKER in text:
        return
    if "common_log_main" not in text or "common_log_pause" not in text:
        _log("warning: common/log.cpp has no common_log_main/common_log_pause; not patching")
        return
    if "<cstdlib>" not in text:
        text = "#include <cstdlib>\n" + text
    log_cpp.write_text(text.rstrip("\n") + "\n\n" + _LOG_FLUSH_PATCH)


def _binaries(build_dir: Path) -> dict[str, Path]:
    return {key: build_dir / "bin" / name for key, name in TARGETS.items()}


def _all_built(bins: dict[str, Path]) -> bool:
    return all(p.is_file() and os.access(p, os.X_OK) for p in bins.values())


def _check_targets(llama_dir: Path) -> None:
    """Fail early if this llama.cpp doesn't define the targets we want."""
    found: set[str] = set()
    for sub in ("tools", "examples"):
        for cml in (llama_dir / sub).glob("*/CMakeLists.txt"):
            text = cml.read_text(errors="replace")
            for name in TARGETS.values():
                if re.search(rf"set\s*\(\s*TARGET\s+{re.escape(name)}\s*\)", text):
                    found.add(name)
    missing = set(TARGETS.values()) - found
    if missing:
        raise ToolError(f"CMake targets {sorted(missing)} not found under {llama_dir}/tools or /examples")


def _run_logged(cmd: list[str], log_fh, cwd: Path | None = None) -> None:
    log_fh.write(f"\n$ {' '.join(cmd)}\n")
    log_fh.flush()
    proc = subprocess.run(cmd, cwd=cwd, stdout=log_fh, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        log_fh.flush()
        text = Path(log_fh.name).read_text(errors="replace")
        raise ToolError(f"command failed ({proc.returncode}): {' '.join(cmd)}", text)


def build_tools(llama_dir: Path, version: str, jobs: int = 2, force: bool = False) -> dict[str, Path]:
    """Configure and build the reference targets. Returns key -> binary path."""
    build_dir = cache_dir() / "build" / version
    bins = _binaries(build_dir)
    stamp = build_dir / "edgetailor-build.json"
    if _all_built(bins) and not force and stamp.is_file():
        try:
            built = json.loads(stamp.read_text())
            if built.get("patch_level") == PATCH_LEVEL and built.get("cmake_options") == CMAKE_OPTIONS:
                return bins
        except (OSError, ValueError):
            pass
    # Otherwise (re)build. If binaries exist from an older patch level, this
    # is incremental: only common/log.cpp is recompiled and the tools relinked.
    if shutil.which("cmake") is None:
        raise ToolError("cmake not found on PATH")
    _check_targets(llama_dir)
    apply_patches(llama_dir)

    build_dir.mkdir(parents=True, exist_ok=True)
    log_path = build_dir / "edgetailor-build.log"
    cmake_opts = [f"-D{k}={v}" for k, v in CMAKE_OPTIONS.items()]
    extra = os.environ.get("EDGETAILOR_BENCH_CMAKE_ARGS", "").split()
    # Keep the generator of an existing build dir; otherwise prefer Ninja.
    gen = []
    if not (build_dir / "CMakeCache.txt").exists() and shutil.which("ninja"):
        gen = ["-G", "Ninja"]

    _log(
        f"building {', '.join(TARGETS.values())} for llama-cpp-python {version} "
        f"in {build_dir} (-j{jobs}); log: {log_path}"
    )
    t0 = time.perf_counter()
    with open(log_path, "a") as log_fh:
        _run_logged(["cmake", "-S", str(llama_dir), "-B", str(build_dir), *gen, *cmake_opts, *extra], log_fh)
        _run_logged(
            [
                "cmake",
                "--build",
                str(build_dir),
                "--config",
                "Release",
                "--target",
                *TARGETS.values(),
                f"-j{jobs}",
            ],
            log_fh,
        )
    elapsed = time.perf_counter() - t0

    if not _all_built(bins):
        raise ToolError(
            f"build finished but binaries are missing: {bins}", log_path.read_text(errors="replace")
        )
    stamp.write_text(
        json.dumps(
            {
                "version": version,
                "patch_level": PATCH_LEVEL,
                "llama_cpp_dir": str(llama_dir),
                "cmake_options": CMAKE_OPTIONS,
                "extra_cmake_args": extra,
                "jobs": jobs,
                "build_seconds": round(elapsed, 1),
            },
            indent=2,
        )
    )
    _log(f"build done in {elapsed:.0f} s")
    return bins


def ensure_tools(
    version: str | None = None, jobs: int = 2, force: bool = False, refresh: bool = False
) -> dict:
    """Fetch, unpack and build the reference tools if needed, and return their paths.

    Returns a dict with keys ``perplexity``, ``imatrix``, ``quantize`` (Paths
    to the binaries), ``convert_hf_to_gguf`` (Path to the converter script),
    ``gguf_py`` (Path to the matching gguf-py, which must be on PYTHONPATH when
    the converter runs), ``llama_cpp_dir`` (Path) and ``version`` (str, the
    llama-cpp-python version).
    """
    cache = cache_dir()
    with _locked(cache):
        sdist, ver = fetch_sdist(version, refresh=refresh)
        llama_dir = unpack_sdist(sdist, ver)
        bins = build_tools(llama_dir, ver, jobs=jobs, force=force)
    tools: dict = dict(bins)
    tools["convert_hf_to_gguf"] = llama_dir / "convert_hf_to_gguf.py"
    tools["gguf_py"] = llama_dir / "gguf-py"
    tools["llama_cpp_dir"] = llama_dir
    tools["version"] = ver
    for key in ("convert_hf_to_gguf", "gguf_py"):
        if not tools[key].exists():
            raise ToolError(f"{tools[key]} missing from the llama.cpp source")
    return tools


# --------------------------------------------------------------------------
# Running the tools
# --------------------------------------------------------------------------

_tools_memo: dict | None = None


def _tools() -> dict:
    global _tools_memo
    if _tools_memo is None:
        _tools_memo = ensure_tools()
    return _tools_memo


def _run_tool(
    cmd: list,
    *,
    env: dict | None = None,
    log_path: str | os.PathLike | None = None,
    cwd: str | os.PathLike | None = None,
) -> tuple[str, float]:
    """Run a command, capturing stdout and stderr together. Returns (output, seconds)."""
    cmd = [str(c) for c in cmd]
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        env=env,
        cwd=cwd,
        check=False,
    )
    elapsed = time.perf_counter() - t0
    if log_path is not None:
        Path(log_path).write_text(f"$ {' '.join(cmd)}\n{proc.stdout}")
    if proc.returncode != 0:
        raise ToolError(f"command failed ({proc.returncode}): {' '.join(cmd)}", proc.stdout)
    return proc.stdout, elapsed


def converter_env(tools: dict | None = None) -> dict:
    """Environment for convert_hf_to_gguf.py: its own gguf-py first on PYTHONPATH."""
    tools = tools or _tools()
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)
    parts = [str(tools["gguf_py"])]
    if env.get("PYTHONPATH"):
        parts.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(parts)
    return env


def run_convert(
    hf_dir,
    out_path,
    outtype: str = "f16",
    *,
    python: str | None = None,
    extra_args: list | None = None,
    log_path=None,
) -> float:
    """Convert a Hugging Face model directory to GGUF with llama.cpp's converter.

    Runs ``<python> convert_hf_to_gguf.py <hf_dir> --outfile <out_path>
    --outtype <outtype>`` with the converter's own gguf-py on PYTHONPATH.
    ``python`` defaults to ``sys.executable``, which needs torch, numpy,
    sentencepiece, transformers, safetensors, tqdm, pyyaml and requests.
    ``outtype`` is one of f32, f16, bf16, q8_0, tq1_0, tq2_0, auto.
    Returns the wall-clock seconds.
    """
    tools = _tools()
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        python or sys.executable,
        tools["convert_hf_to_gguf"],
        hf_dir,
        "--outfile",
        out_path,
        "--outtype",
        outtype,
        *(extra_args or []),
    ]
    _, secs = _run_tool(cmd, env=converter_env(tools), log_path=log_path)
    return secs


def run_quantize(
    src, dst, type_name: str, imatrix=None, threads: int = 2, *, extra_args: list | None = None, log_path=None
) -> float:
    """``llama-quantize [--imatrix F] [extra_args] src dst TYPE threads``. Returns seconds.

    ``type_name`` is a llama.cpp ftype name such as ``Q4_K_M``, ``Q8_0`` or
    ``IQ2_XS`` (see ``llama-quantize --help``). The imatrix may be GGUF or
    legacy .dat. Options must come before the positional arguments.
    """
    opts = ["--imatrix", imatrix] if imatrix is not None else []
    cmd = [_tools()["quantize"], *opts, *(extra_args or []), src, dst, type_name, threads]
    _, secs = _run_tool(cmd, log_path=log_path)
    return secs


def run_imatrix(
    model,
    text_file,
    out,
    ctx: int = 512,
    chunks: int = 100,
    threads: int = 2,
    *,
    output_format: str | None = None,
    extra_args: list | None = None,
    log_path=None,
) -> float:
    """``llama-imatrix -m model -f text -o out -c ctx --chunks N -t threads``. Returns seconds.

    This llama.cpp writes a GGUF imatrix by default, even when ``out`` doesn't
    end in ``.gguf``. Use ``output_format='dat'`` for the legacy format (or
    ``'gguf'`` to make it explicit). By default it also computes the
    perplexity of the calibration text; pass ``extra_args=['--no-ppl']`` to skip
    that.
    """
    cmd = [
        _tools()["imatrix"],
        "-m",
        model,
        "-f",
        text_file,
        "-o",
        out,
        "-c",
        ctx,
        "--chunks",
        chunks,
        "-t",
        threads,
    ]
    if output_format is not None:
        cmd += ["--output-format", output_format]
    cmd += list(extra_args or [])
    _, secs = _run_tool(cmd, log_path=log_path)
    return secs


_CHUNK_RE = re.compile(r"\[(\d+)\]([0-9.eE+-]+|nan|inf),")
_N_CHUNKS_RE = re.compile(r"calculating perplexity over (\d+) chunks")


def parse_final_ppl(output: str) -> tuple[float, float]:
    """Get ``(ppl, stderr)`` from llama-perplexity's ``Final estimate: PPL = X +/- Y``.

    Fallback for unpatched builds that lost the last log line: the running value
    after the last chunk, ``[N]X,``, is the same number. It is used only when
    ``N`` matches the announced chunk count. The error term is then ``nan``.
    """
    matches = _FINAL_PPL_RE.findall(output)
    if matches:
        ppl, err = matches[-1]
        return float(ppl), float(err)
    chunks = _CHUNK_RE.findall(output)
    announced = _N_CHUNKS_RE.findall(output)
    if chunks and announced and int(chunks[-1][0]) == int(announced[-1]):
        return float(chunks[-1][1]), float("nan")
    raise ToolError("no 'Final estimate: PPL = X +/- Y' line in llama-perplexity output", output)


def run_perplexity(
    model,
    text_file,
    ctx: int = 512,
    chunks: int = 100,
    threads: int = 2,
    *,
    extra_args: list | None = None,
    log_path=None,
) -> tuple[float, float]:
    """``llama-perplexity -m model -f text -c ctx --chunks N -t threads``.

    Returns ``(ppl, seconds)``. The text must have at least ``2*ctx`` tokens.
    Like the llama.cpp tool, only the second half of each ``ctx`` window is
    scored. The ``+/-`` term is available from :func:`parse_final_ppl` when
    ``log_path`` is used.
    """
    cmd = [
        _tools()["perplexity"],
        "-m",
        model,
        "-f",
        text_file,
        "-c",
        ctx,
        "--chunks",
        chunks,
        "-t",
        threads,
        *(extra_args or []),
    ]
    out, secs = _run_tool(cmd, log_path=log_path)
    ppl, _ = parse_final_ppl(out)
    return ppl, secs


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " Prints the paths as JSON.")
    ap.add_argument("--version", help="llama-cpp-python version (default: installed, else cached/latest)")
    ap.add_argument("--jobs", "-j", type=int, default=2, help="parallel build jobs (default 2)")
    ap.add_argument("--force", action="store_true", help="rebuild even if binaries exist")
    ap.add_argument(
        "--refresh",
        action="store_true",
        help="with no pinned version, ask pip for the latest release instead of using the cache",
    )
    args = ap.parse_args(argv)

    try:
        tools = ensure_tools(args.version, jobs=args.jobs, force=args.force, refresh=args.refresh)
    except ToolError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({k: str(v) for k, v in tools.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
