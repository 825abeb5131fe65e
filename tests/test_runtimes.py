"""One runtime shape: every registered runtime's cached decoding gives what its whole-window logits give, the
same greedy tokens come out of torch, llama.cpp, onnxruntime and onnxruntime-genai for one model, and nothing
outside ``engine/runtimes`` constructs an inference engine."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from edgetailor.engine import EdgeTailorError, resolve
from edgetailor.engine.modeling import load_model
from edgetailor.engine.runtimes import EarlyExitRuntime, Runtime, TorchRuntime, open_runtime, runtime_names
from edgetailor.exporters import get_exporter

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Once upon a time, there was a little girl named Lily. She"


@pytest.fixture(scope="module")
def stories_files(stories_dir, tmp_path_factory):
    """stories260K in torch, as an F32 GGUF and as an fp32 ONNX folder, each checked by its exporter."""
    out = tmp_path_factory.mktemp("runtimes")
    lm = load_model(resolve(str(stories_dir)))
    for fmt, name, opts in (("gguf", "m.gguf", {"type": "F32"}), ("onnx", "onnx", {"type": "fp32"})):
        ex = get_exporter(fmt)
        ex.export(lm.model, lm.tokenizer, stories_dir, out / name, opts)
        ex.verify(out / name)
    return lm, {"gguf": out / "m.gguf", "onnx": out / "onnx"}


def _open(lm, files, runtime: str) -> Runtime:
    fmt = {"torch": "torch", "llama.cpp": "gguf", "onnxruntime": "onnx", "onnxruntime-genai": "onnx"}[runtime]
    in_memory = {"model": lm.model} if fmt == "torch" else {}
    return open_runtime(fmt, files.get(fmt), runtime=runtime, n_ctx=64, threads=2, **in_memory)


@pytest.mark.parametrize("runtime", ["torch", "llama.cpp", "onnxruntime", "onnxruntime-genai"])
def test_cached_decoding_gives_the_whole_window_logits(stories_files, runtime):
    lm, files = stories_files
    ids = lm.tokenizer(PROMPT)["input_ids"]
    with _open(lm, files, runtime) as rt:
        assert rt.name == runtime and "recompute" not in rt.kv_cache
        full = rt.logits(ids)
        steps = np.stack([rt.prefill(ids[:6])] + [rt.decode_one(t) for t in ids[6:]])
    assert full.shape == (len(ids), lm.model.config.vocab_size)
    tolerance = 1e-2 if runtime == "llama.cpp" else 1e-3     # llama.cpp's one-token kernels sum in another order
    assert np.abs(steps - full[5:]).max() < tolerance
    assert (steps.argmax(-1) == full[5:].argmax(-1)).all()


@pytest.mark.parametrize("runtime", ["torch", "llama.cpp", "onnxruntime", "onnxruntime-genai"])
def test_scored_rows_are_the_whole_window_logits_rows(stories_files, runtime):
    """The evaluator asks for the scored half of a window only: the same rows the whole window gives; llama.cpp
    computes no others (its context has no logits for an unasked position)."""
    lm, files = stories_files
    ids = lm.tokenizer(PROMPT * 3)["input_ids"][:48]
    with _open(lm, files, runtime) as rt:
        full = rt.logits(ids)
        rows = rt.logits_rows(ids, 24, 47)
        if runtime == "llama.cpp":
            assert not rt.llm._ctx.get_logits_ith(10) and rt.llm._ctx.get_logits_ith(30)
        again = rt.logits(ids)
    assert rows.shape == (23, lm.model.config.vocab_size)
    assert np.abs(rows - full[24:47]).max() < 1e-4
    assert np.array_equal(again, full)          # the runtime is left as it was: whole windows still right


def test_every_runtime_generates_the_same_greedy_tokens(stories_files):
    lm, files = stories_files
    ids = lm.tokenizer(PROMPT)["input_ids"]
    out = {}
    for runtime in ("torch", "llama.cpp", "onnxruntime", "onnxruntime-genai"):
        with _open(lm, files, runtime) as rt:
            streamed = []
            out[runtime] = rt.generate(ids, 12, on_token=streamed.append)
            assert streamed == out[runtime]
    assert len(out["torch"]) == 12
    assert all(tokens == out["torch"] for tokens in out.values()), out


def test_generation_stops_at_a_stop_token_and_at_the_context(stories_files):
    lm, files = stories_files
    ids = lm.tokenizer(PROMPT)["input_ids"]
    with open_runtime("gguf", files["gguf"], n_ctx=len(ids) + 4, threads=2, all_logits=False) as rt:
        free = rt.generate(ids, 8)
        assert len(free) == 5           # prompt + 4 in the cache, the fifth token returned, not decoded
        assert rt.generate(ids, 8, stop=free[1]) == free[:2]
        with pytest.raises(ValueError, match="decoding"):
            rt.logits(ids)


def test_early_exit_runtime_at_threshold_one_is_the_model(stories_files, tmp_path):
    from edgetailor.engine.steps.early_exit import fit_heads, save_heads

    lm, _ = stories_files
    ids = lm.tokenizer(PROMPT)["input_ids"]
    seqs = lm.tokenizer([PROMPT * 3], return_tensors="pt")["input_ids"][:, :48]
    save_heads(fit_heads(lm.model, seqs, [2], distill_steps=0), tmp_path / "h.safetensors", {})
    with open_runtime("torch-early-exit", tmp_path / "h.safetensors", model=lm.model, threshold=1.0) as rt:
        assert isinstance(rt, EarlyExitRuntime)
        steps = np.stack([rt.prefill(ids[:6])] + [rt.decode_one(t) for t in ids[6:]])
        assert set(rt.blocks_run) == {lm.model.config.num_hidden_layers}
    np.testing.assert_allclose(steps, TorchRuntime(lm.model).logits(ids)[5:], atol=1e-4)
    with pytest.raises(EdgeTailorError, match="beside the model"):
        open_runtime("torch-early-exit", tmp_path / "h.safetensors")


def test_unknown_formats_and_runtimes_are_named():
    assert runtime_names("onnx") == ["onnxruntime", "onnxruntime-genai"]
    with pytest.raises(EdgeTailorError, match="format 'tflite'(.|\\n)*Known formats: gguf, onnx"):
        open_runtime("tflite", "x")
    with pytest.raises(EdgeTailorError, match="named 'llama.cpp'"):
        open_runtime("onnx", "x", runtime="llama.cpp")


def test_nothing_outside_the_runtimes_constructs_an_inference_engine():
    """llama.cpp contexts, onnxruntime sessions and genai models are made in engine/runtimes only (the ONNX
    exporter's calibration pass runs its own throwaway graph, not a variant; the bundle's README shows users
    the genai calls)."""
    pattern = re.compile(r"\bLlama\(|InferenceSession\(|og\.Model\(|og\.Generator\(")
    found = []
    for folder in ("app", "ui", "engine", "exporters", "bench"):
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith("engine/runtimes/"):
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line) and "calib.onnx" not in line and not line.lstrip().startswith(("#", '"', 'f"')):
                    found.append(f"{rel}:{n}: {line.strip()}")
    assert not found, found
