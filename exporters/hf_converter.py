"""llama.cpp's own Hugging Face -> GGUF converter, for the families EdgeTailor's writer does not cover.

Why reuse it: ``convert_hf_to_gguf.py`` maps and transforms HF tensors for about a hundred families (Gemma's
norm offset, Phi-3's fused QKV, Granite's multipliers, experts stacked per layer, ...) lazily, one tensor at
a time from the memory-mapped safetensors, and llama.cpp's maintainers keep it in step with llama.cpp's
graphs. Writing that per family again would be a copy to keep up by hand; EdgeTailor's own writer stays for
the Llama/Qwen families, where the calibrated quantizer writes its own blocks into it.

Where it comes from: the llama-cpp-python source distribution that the set-up builds llama.cpp from, so the
converter, its gguf-py and the llama.cpp that loads the file are one version. ``packaging/setup.sh`` runs
``python -m edgetailor.exporters.hf_converter install``, which copies the script, its ``conversion``
package and its ``gguf-py`` into ``<venv>/share/edgetailor/llama.cpp-convert/<version>/``. Nothing is
downloaded at run time.

How it runs: in a child process (its gguf-py must not replace the ``gguf`` package in this process; a cancel
kills it; its memory goes back when it exits).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ..engine.errors import EdgeTailorError, RunCancelled

SCRIPT = "convert_hf_to_gguf.py"
# File types the converter writes itself (--outtype); every other type goes through llama.cpp's quantizer.
OUTTYPES = {"F32": "f32", "F16": "f16", "BF16": "bf16", "Q8_0": "q8_0"}
SETUP_FIX = "Run `bash packaging/setup.sh` again: it installs llama.cpp's converter beside llama-cpp-python."


def llama_cpp_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        return None


def install_root() -> Path:
    return Path(sys.prefix) / "share" / "edgetailor" / "llama.cpp-convert"


def converter_dir() -> Path | None:
    """The folder holding the converter that matches the installed llama.cpp, if it is installed."""
    env = os.environ.get("EDGETAILOR_LLAMA_CONVERTER")
    candidates = [Path(env)] if env else []
    ver = llama_cpp_version()
    if ver:
        candidates.append(install_root() / ver)
    for c in candidates:
        if (c / SCRIPT).is_file() and (c / "gguf-py").is_dir():
            return c
    return None


def convert(folder: Path, out: Path, qtype: str, *, progress: Callable[[float, str], None] | None = None,
            cancelled: Callable[[], bool] | None = None) -> dict:
    """Convert the HF folder to a GGUF file of type F32/F16/BF16/Q8_0 with llama.cpp's converter."""
    root = converter_dir()
    if root is None:
        raise EdgeTailorError("llama.cpp's converter is not installed, and this model family needs it for GGUF.",
                              SETUP_FIX)
    outtype = OUTTYPES[qtype]
    env = {k: v for k, v in os.environ.items() if k not in ("NO_LOCAL_GGUF", "PYTHONPATH")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(root / SCRIPT), str(folder), "--outfile", str(out), "--outtype", outtype]
    t0 = time.perf_counter()
    if progress:
        progress(0.1, "llama.cpp's converter writes the tensors")
    with tempfile.TemporaryFile() as fh:        # its log: nothing written beside the output
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(root))
        try:
            while proc.poll() is None:
                if cancelled and cancelled():
                    proc.kill()
                    proc.wait()
                    out.unlink(missing_ok=True)
                    raise RunCancelled()
                time.sleep(0.2)
        except BaseException:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            raise
        fh.seek(0)
        text = fh.read().decode("utf-8", "replace")
    if proc.returncode != 0 or not out.exists():
        out.unlink(missing_ok=True)
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        tail = " | ".join(lines[-3:])[-600:]
        raise EdgeTailorError(f"llama.cpp's converter could not convert this model (exit {proc.returncode}): {tail}",
                              "This family or one of its settings may be newer than this llama.cpp; "
                              "export to ONNX, or update llama-cpp-python and run packaging/setup.sh.")
    tensors = len(re.findall(r"^INFO:hf-to-gguf:\S+,\s", text, flags=re.M))
    return {"converted_by": "llama.cpp convert_hf_to_gguf.py", "convert_seconds": round(time.perf_counter() - t0, 3),
            "tensors": tensors}


# --- installation (run by packaging/setup.sh) ----------------------------------------------------------
def _sdist_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgetailor" / "sdist"


def find_or_fetch_sdist(version: str) -> Path:
    """The llama-cpp-python sdist of ``version`` from the set-up's cache, downloaded with pip if missing."""
    cache = _sdist_cache()
    cache.mkdir(parents=True, exist_ok=True)
    sdist = cache / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={version}", "-d", str(cache)], check=True)
    if not sdist.exists():
        raise SystemExit(f"pip did not produce {sdist}")
    return sdist


def _converter_members(tf: tarfile.TarFile, version: str) -> list[tarfile.TarInfo]:
    """The converter script, its ``conversion`` package and its ``gguf-py`` among the sdist's files."""
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    wanted = (prefix + SCRIPT, prefix + "conversion/", prefix + "gguf-py/")
    return [m for m in tf.getmembers() if m.name.startswith(wanted) and (m.isfile() or m.isdir())]


def _extract(tf: tarfile.TarFile, member: tarfile.TarInfo, path: Path) -> None:
    """One regular file or folder of the sdist (by hand, not ``extractall(filter=...)``: Python 3.11.2, Debian
    12's, has no filters; the members are plain files and folders, and their names are checked here)."""
    if ".." in Path(member.name).parts or Path(member.name).is_absolute():
        raise SystemExit(f"the sdist holds an unsafe path: {member.name}")
    if member.isdir():
        path.mkdir(parents=True, exist_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.extractfile(member) as src, open(path, "wb") as dst:
        shutil.copyfileobj(src, dst)


def install(sdist: Path | None = None) -> Path:
    """Copy the converter, its ``conversion`` package and its ``gguf-py`` out of the sdist (atomically)."""
    version = llama_cpp_version()
    if version is None:
        raise SystemExit("llama-cpp-python is not installed")
    target = install_root() / version
    if (target / SCRIPT).is_file() and (target / "gguf-py").is_dir():
        return target
    sdist = sdist or find_or_fetch_sdist(version)
    tmp = target.with_name(target.name + f".part-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    with tarfile.open(sdist) as tf:
        for m in _converter_members(tf, version):
            _extract(tf, m, tmp / m.name[len(prefix):])
    if not (tmp / SCRIPT).is_file():
        shutil.rmtree(tmp, ignore_errors=True)
        raise SystemExit(f"{sdist} has no {prefix + SCRIPT}")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def trim(sdist: Path, folder: Path) -> Path:
    """A copy of ``sdist`` (same name) holding only what ``install`` takes from it: what a packaged build ships."""
    version = sdist.name.removeprefix("llama_cpp_python-").removesuffix(".tar.gz")
    out = folder / sdist.name
    tmp = out.with_name(out.name + ".part")
    with tarfile.open(sdist) as src, tarfile.open(tmp, "w:gz") as dst:
        for m in _converter_members(src, version):
            dst.addfile(m, src.extractfile(m) if m.isfile() else None)
    os.replace(tmp, out)
    return out


if __name__ == "__main__":
    if sys.argv[1:2] == ["install"]:
        print(f"llama.cpp's converter installed in {install(Path(sys.argv[2]) if len(sys.argv) > 2 else None)}")
    elif sys.argv[1:2] == ["trim"] and len(sys.argv) == 4:
        print(f"the converter's files: {trim(Path(sys.argv[2]), Path(sys.argv[3]))}")
    else:
        print(f"usage: python -m {__spec__.name} install [SDIST] | trim SDIST FOLDER", file=sys.stderr)
        raise SystemExit(2)
