"""llama.cpp's own block encoder (``ggml_quantize_chunk`` in libggml-base, the function ``llama-quantize`` calls),
called on slices of rows as they are read from the source: a k-quant file is written tensor by tensor with
llama.cpp's bytes, without the F16/BF16 intermediate file and without a float32 copy of a whole tensor.

llama.cpp's quantizer converts a whole tensor to float32 before encoding it (a 128k-vocabulary embedding:
1 GB), and its input is an intermediate file the size of the model; here the same encoder sees at most
``CHUNK_ELEMENTS`` weights at a time. The per-tensor types are llama.cpp's (``gguf_calibrated.llama_cpp_types``),
so the file is the one ``llama-quantize`` writes from a lossless intermediate, tensor data byte for byte.
"""
from __future__ import annotations

import ctypes
import functools
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

#: weights encoded per call (32 MB of float32)
CHUNK_ELEMENTS = 1 << 23


@functools.lru_cache(maxsize=1)
def _lib():
    import llama_cpp

    folder = Path(llama_cpp.__file__).resolve().parent / "lib"
    lib = ctypes.CDLL(str(next(p for p in sorted(folder.glob("libggml-base.*")) if p.is_file())))
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.restype = None
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    return lib


def ggml_type(name: str) -> int:
    import gguf

    return int(gguf.GGMLQuantizationType[name])


def row_bytes(name: str, cols: int) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]]
    return cols // block * size


def encodable(name: str, cols: int) -> bool:
    """Whether llama.cpp's encoder writes rows of ``cols`` weights as ``name`` without an importance matrix."""
    import gguf

    try:
        t = gguf.GGMLQuantizationType[name]
    except KeyError:
        return False
    block = gguf.GGML_QUANT_SIZES[t][0]
    return block > 1 and cols % block == 0 and not _lib().ggml_quantize_requires_imatrix(int(t))


def encode_rows(name: str, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``rows`` (float32, rows x cols) as ggml blocks of type ``name``: uint8 (rows, row_bytes)."""
    lib = _lib()
    t = ggml_type(name)
    lib.ggml_quantize_init(t)
    x = np.ascontiguousarray(rows, dtype=np.float32)
    n, cols = x.shape
    out = np.empty((n, row_bytes(name, cols)), dtype=np.uint8) if out is None else out
    assert out.flags.c_contiguous and out.shape == (n, row_bytes(name, cols))
    written = lib.ggml_quantize_chunk(t, x.ctypes.data, out.ctypes.data, 0, n, cols, None)
    assert written == out.nbytes, (written, out.nbytes)
    return out


def encode_matrix(name: str, n_rows: int, cols: int, read_rows, threads: int = 1) -> np.ndarray:
    """A whole tensor's blocks, ``read_rows(a, b)`` (float32 rows a..b) called a slice at a time; slices are
    encoded on ``threads`` threads (ctypes lets go of the GIL during the call)."""
    out = np.empty((n_rows, row_bytes(name, cols)), dtype=np.uint8)
    slices = max(1, -(-n_rows * cols // CHUNK_ELEMENTS))
    slices = -(-slices // threads) * threads if threads > 1 else slices     # as many per thread: none waits
    step = max(1, -(-n_rows // slices))
    starts = range(0, n_rows, step)

    def one(a: int) -> None:
        b = min(n_rows, a + step)
        encode_rows(name, read_rows(a, b), out[a:b])

    if threads > 1 and len(starts) > 1:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, starts))
    else:
        for a in starts:
            one(a)
    return out


def _row_reader(src):
    """float32 rows a..b of a ``gguf_calibrated.Source`` in llama.cpp's layout, read from the source as asked
    (q/k, whose rows llama.cpp reorders by head, are read whole: they are a layer's smallest matrices)."""
    if src.spec.permute_qk and src.hf_name.endswith(("q_proj.weight", "k_proj.weight")):
        whole = src.matrix()
        return lambda a, b: whole[a:b]
    t = src.tensor

    def read(a: int, b: int) -> np.ndarray:
        part = t.rows(a, b) if hasattr(t, "rows") else t[a:b]
        return part.detach().to("cpu").float().numpy()
    return read


def write_llama_cpp_mix(model, tokenizer, tokenizer_dir, out: Path, qtype: str, threads: int | None = None,
                        progress=None, cancelled=None) -> dict:
    """``out`` as the GGUF ``llama-quantize`` writes for the file type ``qtype`` (llama.cpp's type for every
    tensor, llama.cpp's encoder), each tensor encoded a slice of rows at a time as it is written."""
    import tempfile

    import gguf
    import torch

    from .gguf import EncodedTensor, write_gguf
    from .gguf_calibrated import llama_cpp_types, tensor_sources

    threads = int(threads or torch.get_num_threads())
    with tempfile.TemporaryDirectory(prefix="edgetailor-gguf-", dir=Path(out).parent) as tmp:
        if progress:
            progress(0.0, f"llama.cpp's {qtype} type mix")
        types = llama_cpp_types(model, tokenizer, tokenizer_dir, qtype, Path(tmp))
    encoded = encoded_experts(model, types, threads)
    for name, src in tensor_sources(model).items():
        t = types.get(name, "F16")
        rows, cols = src.shape
        if t in ("F16", "F32"):     # llama.cpp's choice where no block type fits the rows
            dt = np.dtype(np.float16 if t == "F16" else np.float32)
            encoded[name] = EncodedTensor(src.shape, dt, None, lambda src=src, dt=dt: src.matrix().astype(dt))
            continue
        if not encodable(t, cols):
            raise AssertionError(f"{name}: llama.cpp chose {t} for rows of {cols}")
        encoded[name] = EncodedTensor((rows, row_bytes(t, cols)), np.dtype(np.uint8), gguf.GGMLQuantizationType[t],
                                      lambda src=src, t=t, rows=rows, cols=cols:
                                      encode_matrix(t, rows, cols, _row_reader(src), threads))
    info = write_gguf(model, tokenizer, tokenizer_dir, out, qtype, tensor_types=encoded,
                      progress=(lambda f, m: progress(0.05 + 0.95 * f, m)) if progress else None, cancelled=cancelled)
    info.update(type=qtype, quantized_by="llama.cpp's encoder (ggml_quantize_chunk), llama.cpp's types",
                tensor_types=types)
    return info


def encoded_experts(model, types: dict[str, str], threads: int) -> dict:
    """Every stacked experts tensor in llama.cpp's type for it, encoded an expert at a time as it is written."""
    import gguf

    from .gguf import EncodedTensor, expert_tensors

    encoded = {}
    for name, experts in expert_tensors(model).items():
        t = types.get(name, "F16")
        n, rows, cols = experts.shape
        if t in ("F16", "F32"):     # llama.cpp's choice where no block type fits the rows
            shape, dtype, raw = (n, rows, cols), np.dtype(np.float16 if t == "F16" else np.float32), None
        elif encodable(t, cols):
            shape, dtype, raw = (n, rows, row_bytes(t, cols)), np.dtype(np.uint8), gguf.GGMLQuantizationType[t]
        else:
            raise AssertionError(f"{name}: llama.cpp chose {t} for rows of {cols}")

        def load(experts=experts, t=t, shape=shape, dtype=dtype):
            out = np.empty(shape, dtype=dtype)

            def one(e: int) -> None:      # experts side by side, one per thread (the encoder lets go of the GIL)
                matrix = experts.expert(e).detach().to("cpu").float().numpy()
                if dtype == np.uint8:
                    encode_rows(t, matrix, out[e])
                else:
                    out[e] = matrix.astype(dtype)
            with ThreadPoolExecutor(max(1, threads)) as pool:
                list(pool.map(one, range(shape[0])))
            return out
        encoded[name] = EncodedTensor(shape, dtype, raw, load)
    return encoded
