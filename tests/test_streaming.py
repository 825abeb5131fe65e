"""The untouched source is written to GGUF from its files read lazily: byte for byte the file the loaded model
gives, no tensor converted whole to fp32, and an export-only recipe reads each weight once."""
from __future__ import annotations

import hashlib

import pytest


@pytest.mark.parametrize("qtype", ["F16", "Q8_0", "BF16"])
def test_lazy_and_loaded_model_write_the_same_bytes(stories_dir, tmp_path, monkeypatch, qtype):
    import edgetailor.exporters.gguf as g
    from edgetailor.engine.lazy import LazyModel
    from edgetailor.engine.modeling import load_model
    from edgetailor.engine.sources import resolve

    src = resolve(str(stories_dir))
    lm = load_model(src)
    monkeypatch.setattr(g, "CHUNK_ELEMENTS", 4096)          # many row chunks even on a tiny model
    g.write_gguf(lm.model, lm.tokenizer, src.path, tmp_path / "loaded.gguf", qtype)
    lazy = LazyModel(src.path)
    g.write_gguf(lazy, lm.tokenizer, src.path, tmp_path / "lazy.gguf", qtype)
    digest = [hashlib.sha256((tmp_path / f).read_bytes()).hexdigest() for f in ("loaded.gguf", "lazy.gguf")]
    assert digest[0] == digest[1]
    weights = sum(t.nbytes for t in {id(t): t for t in lazy.state_dict().values()}.values())
    assert lazy.loaded_bytes == weights            # every weight read once, none twice


def test_no_matrix_is_converted_whole_when_it_is_large(stories_dir, tmp_path, monkeypatch):
    """encode_tensor reads a large matrix a chunk of rows at a time: the biggest read is one chunk."""
    import edgetailor.exporters.gguf as g
    from edgetailor.engine.lazy import LazyModel, LazyTensor
    from edgetailor.engine.modeling import load_tokenizer
    from edgetailor.engine.sources import resolve

    src = resolve(str(stories_dir))
    reads = []
    real_rows, real_load = LazyTensor.rows, LazyTensor.load
    monkeypatch.setattr(LazyTensor, "rows", lambda self, a, b: reads.append((b - a) * self.shape[-1]) or real_rows(self, a, b))
    monkeypatch.setattr(LazyTensor, "load", lambda self: reads.append(self.numel()) or real_load(self))
    monkeypatch.setattr(g, "CHUNK_ELEMENTS", 2048)
    lazy = LazyModel(src.path)
    g.write_gguf(lazy, load_tokenizer(src), src.path, tmp_path / "x.gguf", "F16")
    largest = max(t.numel() for t in lazy.state_dict().values())
    assert largest > 4 * 2048 and max(reads) <= max(2048, max(t.numel() for n, t in lazy.state_dict().items()
                                                            if n.endswith(("q_proj.weight", "k_proj.weight"))))


def test_export_only_recipe_never_loads_the_model_for_writing(tiny_models, tmp_path):
    from edgetailor.engine.job import JobSpec, run_job

    recipe = {"name": "lazy", "steps": [{"step": "export", "params": {"format": "gguf", "types": ["F16", "Q4_K_M"],
                                                                      "verify": False}}]}
    events = []
    rec = run_job(JobSpec(recipe=recipe, source=str(tiny_models["qwen3"]), options={"threads": 2}), emit=events.append)
    assert rec.manifest["status"] == "succeeded", rec.manifest.get("error")
    assert not any(e["type"] == "log" and str(e["data"].get("message", "")).startswith("Loading") for e in events)
    assert len(rec.manifest["variants"]) == 2
    step = rec.manifest["steps"][0]        # the step's measured peak beside pre-flight's figure for it
    assert step["ram_preflight_bytes"] == rec.manifest["preflight"]["steps"][0]["ram_bytes"]
    assert 50e6 < step["ram_peak_bytes"] < 4e9
    assert 20e6 < step["ram_peak_anon_bytes"] <= step["ram_peak_bytes"]     # the part pre-flight's figure counts


def test_a_peak_of_memory_is_measured_from_where_it_was_reset():
    """What each step's record says it used: the high-water mark restarts at the step, so an earlier step's peak
    does not count."""
    import numpy as np

    from edgetailor.engine.memory import peak_rss_bytes, reset_peak_rss

    ballast = np.ones(300 * 2**20 // 8)
    high = peak_rss_bytes()
    del ballast
    assert reset_peak_rss()
    assert peak_rss_bytes() < high - 250 * 2**20


def test_the_peak_not_file_backed_leaves_out_the_pages_of_a_mapped_file(tmp_path):
    """A step's peak beside pre-flight's: memory the process allocates counts, a file it maps and reads does not
    (the GGUF llama.cpp runs to check a file, a model read lazily), although the high-water mark counts both. In a
    fresh process: in this one, garbage of earlier tests freed meanwhile would offset the allocation."""
    import subprocess
    import sys

    script = f"""
import numpy as np
from edgetailor.engine.memory import AnonPeak, peak_rss_bytes, reset_peak_rss
path = {str(tmp_path / "mapped.bin")!r}
np.ones(200 * 2**20 // 8).tofile(path)
assert reset_peak_rss()
with AnonPeak(interval=0.01) as anon:
    start = anon.peak
    mapped = np.memmap(path, dtype=np.float64, mode="r")
    assert float(mapped.sum()) == mapped.size                    # every page read
    ballast = np.ones(100 * 2**20 // 8)                      # private pages (Python's anonymous mmap is shared memory)
    del mapped
print(anon.peak - start, peak_rss_bytes() - start)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    anon, high = map(int, out.stdout.split())
    assert 90 * 2**20 < anon < 150 * 2**20, anon / 2**20
    assert high > 280 * 2**20                                       # the high-water mark saw both


def test_a_large_source_is_referenced_by_its_16_bit_gguf_not_its_fp32_copy(tiny_models, monkeypatch):
    """Above the torch limit, baseline and checks come from a 16-bit GGUF written lazily; the choice is recorded."""
    import edgetailor.engine.reference as reference
    from edgetailor.engine.job import JobSpec, run_job

    monkeypatch.setattr(reference, "TORCH_REFERENCE_MAX_BYTES", 0)
    events = []
    recipe = {"name": "big", "steps": [{"step": "export", "params": {"format": "gguf", "types": ["Q8_0"]}},
                                       {"step": "evaluate", "params": {"windows": 1, "ctx": 64}},
                                       {"step": "benchmark", "params": {"prompt_tokens": 8, "gen_tokens": 4, "repeats": 1,
                                                                        "n_ctx": 64, "decode_model": False}}]}
    rec = run_job(JobSpec(recipe=recipe, source=str(tiny_models["llama"]), options={"threads": 2}), emit=events.append)
    m = rec.manifest
    assert m["status"] == "succeeded", m.get("error")
    assert m["reference"]["format"] == "gguf" and m["reference"]["type"] in ("F16", "BF16")
    assert not any(e["type"] == "log" and str(e["data"].get("message", "")).startswith("Loading") for e in events)
    base, q8 = rec.variant("baseline"), rec.variant("base-Q8_0")
    assert base["format"] == "gguf" and base["metrics"]["perplexity"] > 1
    # benchmarked as the reference runs it: the 16-bit GGUF in llama.cpp, never the fp32 torch model
    assert base["metrics"]["decode_tps"] > 0 and q8["metrics"]["decode_tps"] > 0
    assert "16-bit GGUF" in m["preflight"]["steps"][2]["how"] and m["preflight"]["steps"][2]["mapped_bytes"] > 0
    assert 0 <= q8["metrics"]["kl"] < 0.1 and q8["metrics"]["verify_kl"] < 0.1
    assert not (rec.folder / "scratch").exists()           # the reference file went with the scratch folder


class SixteenGB:
    """psutil.virtual_memory() of a 16 GB machine with all of it free."""
    available = 16 * 1024**3


def a_16_gb_machine(monkeypatch, disk_free: float = 500e9) -> dict:
    """RAM of a 16 GB laptop and a disk with ``disk_free`` bytes free, whatever the machine running the tests
    has; returns the free-disk figure to change."""
    import shutil

    import psutil

    free = {"bytes": disk_free}
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SixteenGB)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(2e12, 2e12 - free["bytes"],
                                                                                 free["bytes"]))
    return free


def _sparse_llama_8b(folder):
    """Llama-3.1-8B's tensors as a sparse bf16 safetensors file: real headers, zeros (no disk blocks)."""
    import json
    import struct

    h, inter, layers, kv, vocab = 4096, 14336, 32, 1024, 128256
    shapes = {"model.embed_tokens.weight": [vocab, h], "lm_head.weight": [vocab, h], "model.norm.weight": [h]}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": [h, h], p + "self_attn.k_proj.weight": [kv, h],
                       p + "self_attn.v_proj.weight": [kv, h], p + "self_attn.o_proj.weight": [h, h],
                       p + "mlp.gate_proj.weight": [inter, h], p + "mlp.up_proj.weight": [inter, h],
                       p + "mlp.down_proj.weight": [h, inter], p + "input_layernorm.weight": [h],
                       p + "post_attention_layernorm.weight": [h]})
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = 2
        for d in shape:
            n *= d
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    folder.mkdir()
    with open(folder / "model.safetensors", "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        fh.truncate(8 + len(raw) + offset)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": h, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": vocab,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16"}))
    return folder


def test_an_8b_model_passes_preflight_for_gguf_export_on_a_16_gb_machine(tmp_path, monkeypatch):
    from edgetailor.engine import Recipe, preflight, resolve

    src = resolve(str(_sparse_llama_8b(tmp_path / "llama-8b")))
    a_16_gb_machine(monkeypatch)
    export = Recipe.from_dict({"name": "x", "steps": [{"step": "export", "params": {"types": ["Q4_K_M"]}}]})
    rep = preflight(src, export)
    assert rep.parameters["total"] > 8e9 and rep.fits, rep.problems
    assert rep.ram_needed_bytes < 2 * 1024**3          # runtime + the embedding's encoded bytes + slices of rows
    assert "no intermediate file" in rep.steps[0]["how"]
    assert 16e9 < rep.steps[0]["mapped_bytes"] < 17e9    # the check's 16-bit reference, mapped: said, not required
    assert not any("read from disk again" in w for w in rep.warnings), rep.warnings
    import psutil

    class TwelveGBFree:
        available = 12 * 1024**3

    monkeypatch.setattr(psutil, "virtual_memory", lambda: TwelveGBFree)
    rep = preflight(src, export)                        # with less free, it still runs, and says the check is slower
    assert rep.fits and any("read from disk again" in w for w in rep.warnings), rep.warnings
    calibrated = Recipe.from_dict({"name": "x", "steps": [
        {"step": "quant.gguf_calibrated", "params": {"types": ["Q4_K_M"], "mix": "measured"}}]})
    rep = preflight(src, calibrated)
    assert rep.fits, rep.problems                     # the block walker: one block, GPTQ's factor, the head
    (walk,) = rep.steps
    assert walk["step"] == "quant.gguf_calibrated" and walk["ram_bytes"] < 8 * 1024**3
    assert "one decoder block at a time" in walk["how"] and "block walk" in walk["parts"]
    balanced = preflight(src, Recipe.from_dict({"name": "x", "steps": [
        {"step": "export", "params": {"types": ["Q4_K_M"]}}, {"step": "evaluate"}, {"step": "benchmark"}]}))
    # no fp32 baseline in torch: the benchmark's largest need is llama.cpp's decode cost probes (float32 embeddings)
    assert balanced.fits and balanced.ram_needed_bytes < 8 * 1024**3, balanced.problems
    assert "16-bit GGUF" in balanced.steps[2]["how"]
    evaluate = preflight(src, Recipe.from_dict({"name": "x", "steps": [{"step": "evaluate"}]})).steps[0]
    assert "16-bit reference" in evaluate["how"]      # an 8B model's reference runs in llama.cpp, not torch fp32
    assert evaluate["ram_bytes"] < 1e9 and 16e9 < evaluate["mapped_bytes"] < 17e9   # its 16 GB mapped: said per step
    lowrank = Recipe.from_dict({"name": "x", "steps": [{"step": "lowrank.svd"}, {"step": "export"}]})
    rep = preflight(src, lowrank)
    assert rep.fits, rep.problems                     # activation-aware SVD one block at a time (two walks)
    svd = rep.steps[0]
    assert "one decoder block at a time" in svd["how"] and svd["ram_bytes"] < 8 * 1024**3
    assert svd["parts"]["input covariances of one block (float64)"] > 1e9      # 14336 x 14336 for down_proj
    for options in ({}, {"method": "gptq"}):         # ONNX int4, quantized as each weight is written
        onnx = preflight(src, Recipe.from_dict({"name": "x", "steps": [
            {"step": "export", "params": {"format": "onnx", "types": ["int4"], "options": options}}]}))
        assert onnx.fits and onnx.steps[0]["how"].startswith("writes the graph one decoder layer at a time")
    fit = preflight(src, Recipe.from_dict({"name": "x", "steps": [{"step": "fit", "params": {"formats": ["onnx"]}}]}))
    assert fit.steps[0]["parts"]["an ONNX candidate's export"] > 1e9 and fit.fits, fit.problems
    fit = preflight(src, Recipe.from_dict({"name": "x", "steps": [{"step": "fit", "params": {"formats": ["gguf"]}}]}))
    probes = fit.steps[0]["parts"]["llama.cpp's decode cost probes (float32, the model's shapes)"]
    assert 5e9 < probes < 8e9 and fit.fits, fit.problems        # two layers and the embeddings in float32
    shared = Recipe.from_dict({"name": "x", "steps": [{"step": "share.layers"}, {"step": "export"}]})
    rep = preflight(src, shared)
    assert not rep.fits                               # a transform that is not streamed holds the model in fp32
    assert rep.steps[1]["how"] == "holds the fp32 model"


def test_training_steps_say_what_they_hold_and_an_8b_distillation_is_refused_with_the_numbers(tmp_path,
                                                                                              monkeypatch):
    """Distillation and LoRA: weights, gradients, AdamW's moments, the teacher and the activations, per step, before
    anything runs; an 8B model is too large to distil on 16 GB, LoRA's optimizer state is a sliver of it."""
    from edgetailor.engine import Recipe, preflight, resolve

    src = resolve(str(_sparse_llama_8b(tmp_path / "llama-8b")))
    a_16_gb_machine(monkeypatch)
    rep = preflight(src, Recipe.from_dict({"name": "x", "steps": [
        {"step": "prune.magnitude"}, {"step": "distill", "params": {"steps": 10, "bf16": False}}]}))
    prune, distill = rep.steps
    assert not rep.fits and "one decoder block at a time" in prune["how"]
    assert distill["how"].startswith("trains") and "teacher" in distill["how"]
    parts = distill["parts"]
    assert parts["student (fp32)"] == parts["teacher (the source, fp32)"] > 30e9
    assert parts["AdamW moments (2 x fp32, trainable)"] == 2 * parts["gradients (fp32, trainable)"] > 40e9
    assert any("activations kept for backward (fp32)" == k for k in parts)
    lora = preflight(src, Recipe.from_dict({"name": "x", "steps": [
        {"step": "finetune.lora", "params": {"steps": 10, "rank": 8, "bf16": True}}]})).steps[0]
    assert "teacher (the source, fp32)" not in lora["parts"]          # next-token objective: no teacher
    assert lora["parts"]["AdamW moments (2 x fp32, trainable)"] < 0.01 * lora["parts"]["student (fp32)"]
    assert any("(bf16)" in k for k in lora["parts"])


def test_training_uses_bf16_where_the_cpu_computes_it():
    from edgetailor.engine.devices import cpu_has_bf16
    from edgetailor.engine.steps.distill import resolved_bf16

    assert resolved_bf16(None) is cpu_has_bf16() and resolved_bf16(False) is False and resolved_bf16(True) is True


@pytest.mark.parametrize("qtype", ["Q4_K_M", "Q2_K", "IQ4_XS", "Q5_0"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_k_quant_is_encoded_as_written_with_the_tensors_llama_quantize_writes(tiny_models, tmp_path, monkeypatch,
                                                                                  qtype, family):
    """The export writes k-quants without an intermediate file: llama.cpp's type for every tensor and llama.cpp's
    encoder, a slice of rows at a time from the lazy source; every tensor's bytes equal those llama-quantize
    writes from a lossless intermediate, and the metadata is the same."""
    import edgetailor.exporters.ggml_quant as gq
    import gguf
    from edgetailor.engine.lazy import LazyModel
    from edgetailor.engine.modeling import load_model
    from edgetailor.engine.sources import resolve
    from edgetailor.exporters import get_exporter
    from edgetailor.exporters.gguf import llama_quantize, write_gguf

    src = resolve(str(tiny_models[family]))
    lm = load_model(src)
    write_gguf(lm.model, lm.tokenizer, src.path, tmp_path / "f32.gguf", "F32")
    llama_quantize(tmp_path / "f32.gguf", tmp_path / "llama.gguf", qtype)
    monkeypatch.setattr(gq, "CHUNK_ELEMENTS", 4096)          # many slices of rows even on a tiny model
    written = []
    write = gguf.GGUFWriter.write_tensor_data
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data",
                        lambda self, arr, *a, **k: (written.append(arr.nbytes), write(self, arr, *a, **k))[1])
    lazy = LazyModel(src.path)
    get_exporter("gguf").export(lazy, lm.tokenizer, src.path, tmp_path / "ours.gguf", {"type": qtype, "threads": 2})
    probe = sum(32 * t.shape[-1] * 2 if t.ndim == 2 else 4 * t.numel() for t in lazy.state_dict().values())
    assert sum(written) <= (tmp_path / "ours.gguf").stat().st_size + probe      # no intermediate file
    theirs, ours = gguf.GGUFReader(str(tmp_path / "llama.gguf")), gguf.GGUFReader(str(tmp_path / "ours.gguf"))
    a, b = {t.name: t for t in theirs.tensors}, {t.name: t for t in ours.tensors}
    assert set(a) == set(b)
    assert len({t.tensor_type for t in a.values()}) >= 3           # a mix, with llama.cpp's fallbacks
    for name, theirs_t in a.items():
        assert theirs_t.tensor_type == b[name].tensor_type, name
        assert theirs_t.data.tobytes() == b[name].data.tobytes(), name

    def fields(r):
        return {k: [bytes(f.parts[i]) for i in f.data] for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert fields(theirs) == fields(ours)
    tensors = {id(t): t for t in lazy.state_dict().values()}.values()
    matrices, vectors = (sum(t.nbytes for t in tensors if (t.ndim == 2) == two) for two in (True, False))
    assert matrices + vectors <= lazy.loaded_bytes <= matrices + 2 * vectors   # every matrix read once (the norms
    #                                                                             also go into llama.cpp's type probe)
