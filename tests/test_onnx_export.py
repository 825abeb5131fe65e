"""ONNX export: real onnxruntime and onnxruntime-genai run every folder; fp32 computes what torch computes."""
from __future__ import annotations

import json

import numpy as np
import pytest
from edgetailor.engine import EdgeTailorError, JobSpec, resolve, run_job
from edgetailor.engine.evaluate import ReferenceLogprobs, evaluate, make_windows
from edgetailor.engine.modeling import load_model
from edgetailor.engine.runtimes import OnnxRuntime, TorchRuntime, open_runtime
from edgetailor.exporters import get_exporter

PROMPTS = ["Once upon a time, there was a little girl named Lily.",
           "The cat sat on the mat and looked at the big red ball in the garden."]


def _export(folder, out, **options):
    lm = load_model(resolve(str(folder)))
    ex = get_exporter("onnx")
    res = ex.export(lm.model, lm.tokenizer, folder, out, options)
    checked = ex.verify(out)
    return lm, res, checked


@pytest.mark.parametrize("mt", ["llama", "mistral", "qwen2", "qwen3"])
def test_fp32_matches_torch_and_kv_cache_matches_full_window(tiny_models, tmp_path, mt):
    lm, res, checked = _export(tiny_models[mt], tmp_path / "m", type="fp32")
    assert checked["loaded_by"] == "onnxruntime and onnxruntime-genai"
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer_config.json"} <= {p.name for p in res.files}
    torch_rt = TorchRuntime(lm.model)
    with OnnxRuntime(tmp_path / "m", threads=2) as rt:
        for prompt in PROMPTS:
            ids = lm.tokenizer(prompt)["input_ids"]
            full = rt.logits(ids)
            assert np.abs(full - torch_rt.logits(ids)).max() < 1e-3
            steps = [rt.prefill(ids[:5])] + [rt.decode_one(t) for t in ids[5:]]
            assert np.abs(np.stack(steps) - full[4:]).max() < 1e-4


def test_stories_heads_of_8_are_padded_and_exact(stories_dir, tmp_path):
    lm, _, _ = _export(stories_dir, tmp_path / "m", type="fp32")
    ids = lm.tokenizer(PROMPTS[0])["input_ids"]
    with OnnxRuntime(tmp_path / "m", threads=2) as rt:
        assert np.abs(rt.logits(ids) - TorchRuntime(lm.model).logits(ids)).max() < 1e-3
        out = rt.generate(ids, 8)
    import torch

    ref = lm.model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
    assert out == ref


@pytest.mark.parametrize("qtype,options", [
    ("fp16", {}), ("int8", {}),
    ("int4", {"block_size": 32, "method": "rtn"}), ("int4", {"block_size": 64, "method": "rtn"}),
    ("int4", {"block_size": 128, "method": "hqq"}),
])
def test_types_run_and_evaluate(tiny_models, tmp_path, qtype, options):
    folder = tiny_models["qwen2"]      # tied embeddings: int4 reads them from the quantized head
    lm, _res, _ = _export(folder, tmp_path / "m", type=qtype, **options)
    import onnx

    ops = {n.op_type for n in onnx.load(tmp_path / "m" / "model.onnx", load_external_data=False).graph.node}
    assert "GroupQueryAttention" in ops
    if qtype in ("int4", "int8"):          # weight-only MatMulNBits, as onnxruntime-genai's builder writes both
        proto = onnx.load(tmp_path / "m" / "model.onnx", load_external_data=False)
        assert "MatMulNBits" in ops and "MatMul" not in ops
        assert ("GatherBlockQuantized" in ops) == (options.get("method") != "hqq")
        bits = {a.i for n in proto.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"}
        assert bits == {4 if qtype == "int4" else 8}
    text = " ".join(PROMPTS * 40)
    windows = make_windows(lm.tokenizer, text, 64, 2)
    ref = ReferenceLogprobs(tmp_path / "ref")
    base = evaluate(TorchRuntime(lm.model), windows, reference=ref, record_reference=True)
    with open_runtime("onnx", tmp_path / "m", n_ctx=64, threads=2) as rt:
        r = evaluate(rt, windows, reference=ref)
    assert r.kl is not None and r.kl >= 0 and 0 <= r.top1 <= 1
    assert abs(r.perplexity / base.perplexity - 1) < (0.02 if qtype == "fp16" else 0.5)
    if qtype == "int8":         # weight-only 8-bit blocks: near lossless (int4 here: KL 0.016-0.023)
        assert r.kl < 0.002


def test_int4_rows_that_do_not_fill_blocks_are_padded(stories_dir, tmp_path):
    # stories260K: hidden 64 and intermediate 172 fill no whole 128-blocks: MatMulNBits pads the last block
    # (so block 128 is larger than block 32 here), and the graphs still run (verify) and stay under fp32
    sizes = {}
    for block in (32, 128):
        _, res, _ = _export(stories_dir, tmp_path / f"b{block}", type="int4", block_size=block)
        sizes[block] = res.info["bytes"]
        assert res.info["block_size"] == block
    _, fp32, _ = _export(stories_dir, tmp_path / "fp32", type="fp32")
    assert sizes[32] < sizes[128] < fp32.info["bytes"]


def test_gptq_is_calibrated_and_needs_text(stories_dir, tmp_path):
    with pytest.raises(EdgeTailorError, match="calibration"):
        _export(stories_dir, tmp_path / "x", type="int4", method="gptq")
    text = " ".join(PROMPTS * 20)
    _lm, res, _ = _export(stories_dir, tmp_path / "g", type="int4", method="gptq", calibration_text=text,
                         calibration_ctx=32, calibration_windows=2)
    _, _rtn, _ = _export(stories_dir, tmp_path / "r", type="int4", method="rtn")
    assert res.info["method"] == "gptq"
    a = (tmp_path / "g" / "model.onnx.data").read_bytes()
    assert a != (tmp_path / "r" / "model.onnx.data").read_bytes()


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_an_8_bit_head_is_written_read_by_the_tied_embedding_and_lowers_int4s_loss(tiny_models, tmp_path, method):
    """``head_bits: 8``: the output head as 8-bit MatMulNBits, the tied embedding reading it through an 8-bit
    GatherBlockQuantized; the folder runs in onnxruntime and its KL to the source is below the int4 head's."""
    import onnx
    from edgetailor.engine.text import read_text
    from edgetailor.engine.verification import check_windows, compare, source_logprobs

    folder = tiny_models["qwen2"]                          # tied embeddings
    kls = {}
    for bits in (4, 8):
        lm, res, _ = _export(folder, tmp_path / f"h{bits}", type="int4", method=method, head_bits=bits,
                             calibration_text=read_text(None), calibration_ctx=64, calibration_windows=4)
        assert res.info["head_bits"] == bits
        proto = onnx.load(str(tmp_path / f"h{bits}" / "model.onnx"), load_external_data=False)
        head = next(n for n in proto.graph.node if "logits" in n.output)
        gather = next(n for n in proto.graph.node if n.op_type == "GatherBlockQuantized")
        assert {a.name: a.i for a in head.attribute}["bits"] == bits == {a.name: a.i for a in gather.attribute}["bits"]
        windows = [w[:64] for w in check_windows(lm.tokenizer, read_text(None))][:2]
        with open_runtime("onnx", tmp_path / f"h{bits}", n_ctx=64) as rt:
            kls[bits] = compare(source_logprobs(lm.model, windows), rt, windows)["kl"]
    assert kls[8] < kls[4]


def test_gptq_calibration_windows_longer_than_the_models_context_are_cut_to_it(stories_dir, tmp_path):
    """A calibration length past the model's positions (the planner passes its own sequence length) is cut to the
    graph's rotary tables instead of failing in onnxruntime."""
    import json

    context = json.loads((stories_dir / "config.json").read_text())["max_position_embeddings"]
    text = " ".join(PROMPTS * 200)
    _lm, res, checked = _export(stories_dir, tmp_path / "g", type="int4", method="gptq", calibration_text=text,
                                calibration_ctx=4 * context, calibration_windows=1)
    assert res.info["method"] == "gptq" and checked


def _matmul_model(K: int, N: int, B=None, packed=None, scales=None, block: int = 32):
    """A one-op graph: y = x @ B (MatMul) or its MatMulNBits form (packed codes and scales)."""
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", K])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", N])
    if B is not None:
        inits = [numpy_helper.from_array(B.astype(np.float32), "B")]
        node = helper.make_node("MatMul", ["x", "B"], ["y"], name="mm")
    else:
        inits = [numpy_helper.from_array(packed, "B_Q4"), numpy_helper.from_array(scales, "B_scales")]
        node = helper.make_node("MatMulNBits", ["x", "B_Q4", "B_scales"], ["y"], name="mm_Q4", domain="com.microsoft",
                                K=K, N=N, bits=4, block_size=block)
    graph = helper.make_graph([node], "mm", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model


def _run(model, x):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        ["y"], {"x": x.astype(np.float32)})[0]


def test_own_gptq_writes_the_grid_it_rounds_to_and_beats_onnxruntime_rtn():
    from edgetailor.exporters.onnx_quant import gptq_weights
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    rng = np.random.default_rng(0)
    K, N, block = 96, 48, 32                  # K = 3 blocks of 32, or one padded block of 128
    mix = rng.normal(size=(K, K)) / np.sqrt(K)
    loud = 1 + 6 * (rng.random(K) < 0.06)     # a few outlier channels, as in transformers' activations
    calib = (rng.normal(size=(4096, K)) @ mix) * loud
    test = (rng.normal(size=(1024, K)) @ mix) * loud
    B = rng.normal(size=(K, N)).astype(np.float32)
    exact = test @ B
    packed, scales = gptq_weights(B, calib.T @ calib, block)
    assert packed.shape == (N, K // block, block // 2) and scales.shape == (N, K // block)
    ours = _run(_matmul_model(K, N, packed=packed, scales=scales, block=block), test)
    # onnxruntime reads the codes as written: (nibble - 8) * scale, low nibble first along K
    u = np.stack([packed & 0xF, packed >> 4], -1).reshape(N, K).astype(np.float32)
    W = (u - 8) * np.repeat(scales, block, 1)
    assert np.abs(ours - test @ W.T).max() < 1e-3 * np.abs(exact).max()
    q = mnq.MatMulNBitsQuantizer(_matmul_model(K, N, B=B), block_size=block, is_symmetric=True,
                                 algo_config=mnq.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True))
    q.process()
    rtn = _run(q.model.model, test)
    err = lambda y: float(((y - exact) ** 2).mean())       # noqa: E731
    assert err(ours) < 0.7 * err(rtn)                       # error feedback through X^T X, on held-out inputs
    plain_p, plain_s = gptq_weights(B, None, block)    # no statistics: a least-squares fit, still >= RTN
    assert err(_run(_matmul_model(K, N, packed=plain_p, scales=plain_s, block=block), test)) <= err(rtn) * 1.01
    p128, s128 = gptq_weights(B, calib.T @ calib, 128)   # K padded to one block, as onnxruntime pads
    assert p128.shape == (N, 1, 64)
    assert np.isfinite(_run(_matmul_model(K, N, packed=p128, scales=s128, block=128), test)).all()


def test_bad_options_are_refused(stories_dir, tmp_path):
    for opts, word in (({"type": "int3"}, "int3"), ({"type": "int4", "block_size": 48}, "48"),
                       ({"type": "int4", "method": "awq2"}, "awq2")):
        with pytest.raises(EdgeTailorError, match=word):
            _export(stories_dir, tmp_path / "x", **opts)


def test_genai_generates_what_the_engine_loop_generates(stories_dir, tmp_path):
    import onnxruntime_genai as og

    lm, _, _ = _export(stories_dir, tmp_path / "m", type="fp32")
    ids = lm.tokenizer(PROMPTS[0])["input_ids"]
    with OnnxRuntime(tmp_path / "m", threads=2) as rt:
        ours = rt.generate(ids, 12)
    model = og.Model(str(tmp_path / "m"))
    tok = og.Tokenizer(model)
    encoded = [int(t) for t in tok.encode(PROMPTS[0])]
    assert encoded == ids[len(ids) - len(encoded):]      # same pieces (genai leaves BOS to the app here)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 12, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array(ids, dtype=np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    assert list(gen.get_sequence(0))[len(ids):] == ours
    cfg = json.loads((tmp_path / "m" / "genai_config.json").read_text())
    assert cfg["model"]["decoder"]["num_hidden_layers"] == lm.model.config.num_hidden_layers


def test_recipe_exports_onnx_variants_that_evaluate_scores(stories_dir, tmp_path):
    recipe = {"name": "t", "steps": [
        {"step": "export", "params": {"format": "onnx", "types": ["fp32", "int4"], "options": {"block_size": 32}}},
        {"step": "evaluate", "params": {"windows": 2, "ctx": 128}}]}
    rec = run_job(JobSpec(recipe=recipe, source=str(stories_dir), runs_root=str(tmp_path)))
    m = json.loads((rec.folder / "manifest.json").read_text())
    assert m["status"] == "succeeded", m["error"]
    v = {x["name"]: x for x in m["variants"]}
    assert v["base-fp32"]["format"] == "onnx" and v["base-int4"]["params"]["block_size"] == 32
    assert abs(v["base-fp32"]["metrics"]["ppl_increase_pct"]) < 0.1 and v["base-fp32"]["metrics"]["top1"] > 0.99
    assert v["base-int4"]["metrics"]["kl"] > v["base-fp32"]["metrics"]["kl"]
    assert (rec.folder / v["base-int4"]["path"] / "genai_config.json").exists()


def test_try_it_generator_uses_the_kv_cache_loop(stories_dir, tmp_path):
    from edgetailor.engine.generate import Generator

    lm, _, _ = _export(stories_dir, tmp_path / "m", type="fp32")
    ids = lm.tokenizer(PROMPTS[0])["input_ids"]
    with OnnxRuntime(tmp_path / "m", threads=2) as rt:
        expected = rt.generate(ids, 10, lm.tokenizer.eos_token_id)
    gen = Generator(threads=2)
    out = gen.generate({"name": "v", "format": "onnx", "path": "m"}, tmp_path, str(stories_dir), PROMPTS[0], 10)
    gen.close()
    assert out.tokens == len(expected) and out.text == lm.tokenizer.decode(expected, skip_special_tokens=True)


LAZY_CASES = [("llama", {"type": "fp32"}), ("qwen2", {"type": "fp32"}), ("qwen3", {"type": "fp32"}),
              ("llama", {"type": "fp16"}), ("qwen2", {"type": "fp16"}), ("qwen3", {"type": "fp16"}),
              ("llama", {"type": "int4", "method": "rtn", "block_size": 64}),        # untied: the head has its own
              ("qwen2", {"type": "int4", "method": "gptq", "head_bits": 8}),        # tied: read from the head
              ("qwen3", {"type": "int8", "method": "gptq"}), ("qwen2", {"type": "int8"})]


@pytest.mark.parametrize("mt,options", LAZY_CASES, ids=lambda c: c if isinstance(c, str) else "-".join(map(str, c.values())))
def test_a_lazy_model_writes_the_same_onnx_weights_one_layer_at_a_time(tiny_models, tmp_path, mt, options,
                                                                       monkeypatch):
    """Every type but HQQ from the files read lazily (int4/int8 quantized as each weight is written, GPTQ's
    statistics from the walk): the same model.onnx.data, byte for byte, as from the loaded model, and the same
    logits in onnxruntime; the walker holds one decoder layer at a time and the model never loads."""
    from edgetailor.engine import modeling
    from edgetailor.engine.lazy import LazyModel
    from edgetailor.engine.text import read_text
    from edgetailor.engine.walker import BlockWalk

    lm = load_model(resolve(str(tiny_models[mt])))
    ex = get_exporter("onnx")
    if options.get("method") == "gptq":
        options = {**options, "calibration_text": read_text(None), "calibration_ctx": 64, "calibration_windows": 4}
    ex.export(lm.model, lm.tokenizer, tiny_models[mt], tmp_path / "loaded", options)
    held, real = [], BlockWalk.__iter__

    def watched(walk):
        for block in real(walk):
            held.append(sum(p.numel() for p in block.module.parameters()))
            yield block

    monkeypatch.setattr(BlockWalk, "__iter__", watched)
    monkeypatch.setattr(modeling, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(LazyModel, "materialise", lambda *a, **k: pytest.fail("the model was materialised"))
    res = ex.export(LazyModel(tiny_models[mt]), lm.tokenizer, tiny_models[mt], tmp_path / "lazy", options)
    assert res.info["written"] == "tensor by tensor from the model's files"
    assert len(held) == lm.model.config.num_hidden_layers
    assert max(held) == sum(p.numel() for p in lm.model.model.layers[0].parameters())
    data = [(tmp_path / d / "model.onnx.data").read_bytes() for d in ("loaded", "lazy")]
    assert data[0] == data[1]
    ex.verify(tmp_path / "lazy")
    ids = lm.tokenizer(PROMPTS[0])["input_ids"]
    with OnnxRuntime(tmp_path / "loaded", threads=2) as a, OnnxRuntime(tmp_path / "lazy", threads=2) as b:
        assert np.array_equal(a.logits(ids), b.logits(ids))


@pytest.mark.parametrize("bits", [4, 8])
def test_round_to_nearest_writes_onnxruntimes_own_codes(tiny_models, tmp_path, bits):
    """int4/int8 RTN, quantized as the graph is written: every MatMulNBits weight (codes and scales) is what
    onnxruntime's MatMulNBitsQuantizer writes for the same float graph, byte for byte."""
    import onnx
    from edgetailor.exporters.onnx_graph import build_graph
    from onnx import numpy_helper
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq
    from onnxruntime.quantization.quant_utils import QuantFormat

    lm, res, _ = _export(tiny_models["llama"], tmp_path / "m", type=f"int{bits}", block_size=32)
    assert res.info["quantized_by"] == "onnxruntime's MatMulNBits round-to-nearest kernels"
    algo = mnq.DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, bits=bits, quant_format=QuantFormat.QOperator,
                                            op_types_to_quantize=("MatMul",))
    q = mnq.MatMulNBitsQuantizer(build_graph(lm.model, "fp32", quantizable=True).proto, bits=bits, block_size=32,
                                 is_symmetric=True, algo_config=algo)
    q.process()
    theirs = {t.name: numpy_helper.to_array(t) for t in q.model.model.graph.initializer if t.name.endswith(
        (f"_Q{bits}", "_scales"))}
    ours = {t.name: numpy_helper.to_array(t, str(tmp_path / "m"))
            for t in onnx.load(tmp_path / "m" / "model.onnx", load_external_data=False).graph.initializer
            if t.name.endswith((f"_Q{bits}", "_scales"))}
    assert len(ours) == 2 * (5 * lm.model.config.num_hidden_layers + 1)      # qkv, o, gate, up, down; the head
    assert ours.keys() == theirs.keys()
    for name, value in ours.items():
        assert value.tobytes() == theirs[name].tobytes(), name


def test_hqq_writes_onnxruntimes_own_codes_from_the_files(tiny_models, tmp_path):
    """int4 HQQ, quantized weight by weight as the graph is written from the source's files (never loaded whole):
    codes, scales and float zero points are what onnxruntime's MatMulNBitsQuantizer writes for the whole float
    graph, byte for byte; the tied embedding stays a float table (GatherBlockQuantized reads no float zero points)."""
    import onnx
    from edgetailor.engine.lazy import LazyModel
    from edgetailor.exporters.onnx_graph import build_graph
    from onnx import numpy_helper
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    folder = tiny_models["qwen2"]                     # tied embeddings
    lm = load_model(resolve(str(folder)))
    ex = get_exporter("onnx")
    res = ex.export(LazyModel(folder), lm.tokenizer, folder, tmp_path / "m",
                    {"type": "int4", "block_size": 32, "method": "hqq"})
    assert res.info["written"] == "tensor by tensor from the model's files"
    checked = ex.verify(tmp_path / "m")
    assert checked["loaded_by"] == "onnxruntime and onnxruntime-genai"
    algo = mnq.HQQWeightOnlyQuantConfig(block_size=32, bits=4, op_types_to_quantize=("MatMul",))
    q = mnq.MatMulNBitsQuantizer(build_graph(lm.model, "fp32", quantizable=True).proto, block_size=32,
                                 is_symmetric=True, algo_config=algo)
    q.process()
    ends = ("_Q4", "_scales", "_zero_points")
    theirs = {t.name: numpy_helper.to_array(t) for t in q.model.model.graph.initializer if t.name.endswith(ends)}
    proto = onnx.load(tmp_path / "m" / "model.onnx", load_external_data=False)
    ours = {t.name: numpy_helper.to_array(t, str(tmp_path / "m")) for t in proto.graph.initializer
            if t.name.endswith(ends)}
    assert len(ours) == 3 * (5 * lm.model.config.num_hidden_layers + 1)    # qkv, o, gate, up, down; the head
    assert ours.keys() == theirs.keys()
    for name, value in ours.items():
        assert value.shape == theirs[name].shape and value.tobytes() == theirs[name].tobytes(), name
    assert {n.op_type for n in proto.graph.node} >= {"MatMulNBits", "Gather"}
    ids = lm.tokenizer(PROMPTS[0])["input_ids"]
    with OnnxRuntime(tmp_path / "m", threads=2) as rt:             # close to the float model (random weights)
        logits = rt.logits(ids)
    corr = np.corrcoef(logits.ravel(), TorchRuntime(lm.model).logits(ids).ravel())[0, 1]
    assert corr > 0.9


def test_onnx_exports_of_the_source_stream(tiny_models, tmp_path):
    """The export step: fp16 and int4 (RTN, GPTQ and HQQ) from the files (the model never loaded), each checked
    against the source like every file; pre-flight says each is written a decoder layer at a time."""
    from edgetailor.engine import Recipe, preflight

    src = resolve(str(tiny_models["llama"]))

    def recipe(types, **options):
        return {"name": "t", "steps": [{"step": "export", "params": {"format": "onnx", "types": types,
                                                                     "options": options}}]}

    for r in (recipe(["fp16", "int4", "int8"]), recipe(["int4"], method="gptq"), recipe(["int4"], method="hqq")):
        (step,) = preflight(src, Recipe.from_dict(r)).steps
        assert step["how"].startswith("writes the graph one decoder layer at a time"), step
    (gptq,) = preflight(src, Recipe.from_dict(recipe(["int4"], method="gptq"))).steps
    (rtn,) = preflight(src, Recipe.from_dict(recipe(["int4"]))).steps
    assert gptq["ram_bytes"] > rtn["ram_bytes"]           # the calibration walk and one layer's statistics
    rec = run_job(JobSpec(recipe=recipe(["fp16", "int4"], method="gptq"), source=str(tiny_models["llama"]),
                          runs_root=str(tmp_path), options={"threads": 2}))
    m = json.loads((rec.folder / "manifest.json").read_text())
    assert m["status"] == "succeeded", m["error"]
    assert [v["format"] for v in m["variants"]] == ["onnx", "onnx"]
    for v in m["variants"]:                                   # checked against the source
        assert v["metrics"]["verify_top1"] > (0.99 if v["params"]["type"] == "fp16" else 0.5), v