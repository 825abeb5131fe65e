"""Keeping a long pass over a model's weights small in memory (Linux; elsewhere these do nothing).

* ``release_pages(tensors)``: tells the kernel the process is done reading these tensors for now
  (``madvise(MADV_PAGEOUT)``). Weights that transformers maps from a safetensors file are dropped from the
  process's resident memory and read back from the file if touched again, values unchanged; llama.cpp's
  quantizer unmaps each weight after use for the same reason. Memory that is not file-backed stays (or,
  with swap, may be swapped): it is a hint, never a change of contents.
* ``trim_heap()``: hands freed heap memory back to the OS (glibc keeps what large temporaries leave).
"""
from __future__ import annotations

import ctypes
import mmap
import sys
from collections.abc import Iterable

MADV_PAGEOUT = 21          # Linux 5.4+; older kernels answer EINVAL and nothing happens
_libc = None


def _c():
    global _libc
    if _libc is None:
        _libc = False
        if sys.platform.startswith("linux"):
            try:
                lib = ctypes.CDLL("libc.so.6", use_errno=True)
                lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                _libc = lib
            except (OSError, AttributeError):
                pass
    return _libc


def release_pages(tensors: Iterable) -> None:
    """Drop the whole pages these CPU tensors occupy from resident memory (their contents are kept)."""
    lib = _c()
    if not lib:
        return
    page = mmap.PAGESIZE
    for t in tensors:
        if getattr(t, "is_lazy", False) or t.device.type != "cpu" or t.numel() == 0:     # lazy: nothing held
            continue
        start = t.data_ptr()
        lo = (start + page - 1) // page * page
        hi = (start + t.numel() * t.element_size()) // page * page
        if hi > lo:
            lib.madvise(lo, hi - lo, MADV_PAGEOUT)


def trim_heap() -> None:
    """Give freed heap memory back to the OS (without it the resident size keeps every past peak)."""
    lib = _c()
    if lib:
        lib.malloc_trim(0)


def reset_peak_rss() -> bool:
    """Start this process's resident high-water mark afresh (Linux: ``/proc/self/clear_refs``), so
    ``peak_rss_bytes`` measures what comes after; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    """This process's resident high-water mark (``VmHWM``: anonymous and file-backed pages, as ``time -v`` and
    ``ps`` count them) since it started or since ``reset_peak_rss``; None where /proc does not say."""
    return _status_bytes("VmHWM")


def _status_bytes(field: str) -> int | None:
    """A size ``field`` of ``/proc/self/status`` in bytes; None where /proc does not say."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class AnonPeak:
    """The highest resident size of this process that is not file-backed (``RssAnon``, sampled every
    ``interval`` seconds by a thread while the block runs): what pre-flight's RAM counts, where the high-water
    mark (``peak_rss_bytes``) also counts the pages of files the process maps (a model read lazily, the GGUF
    llama.cpp runs to check a file), which the kernel drops and reads again under pressure. ``peak`` is None where
    /proc does not say."""

    def __init__(self, interval: float = 0.05):
        import threading

        self.interval, self.peak = interval, rss_anon_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True, name="anon-peak")

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            now = rss_anon_bytes()
            if now is not None:
                self.peak = max(self.peak or 0, now)

    def __enter__(self) -> "AnonPeak":
        if self.peak is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        now = rss_anon_bytes()
        if now is not None and self.peak is not None:
            self.peak = max(self.peak, now)


def rss_anon_bytes() -> int | None:
    """This process's resident memory that is not file-backed (``RssAnon``); None where /proc does not say."""
    return _status_bytes("RssAnon")
