"""EdgeTailor's own GGUF blocks: bit-compatible with ggml, better with importance statistics, run by llama.cpp."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from edgetailor.exporters import gguf_blocks


def _correlated(rng, n, cols):
    """Inputs with very different channel scales and strong correlations, like real activations."""
    base = rng.standard_normal((n, cols // 4)).astype(np.float32)
    mix = rng.standard_normal((cols // 4, cols)).astype(np.float32)
    return (base @ mix + 0.3 * rng.standard_normal((n, cols)).astype(np.float32)) * rng.uniform(0.05, 3, cols).astype(np.float32)


@pytest.mark.parametrize("name", sorted(gguf_blocks.TYPES))
def test_blocks_decode_with_ggufs_dequantizer_exactly(name):
    import gguf

    rng = np.random.default_rng(1)
    W = (rng.standard_normal((8, 512)) * rng.uniform(0.01, 0.2, (8, 1))).astype(np.float32)
    W[0, :40] = 0                                                     # an all-zero block must work too
    imp = rng.uniform(0.1, 5, 512).astype(np.float32)
    data, ours = gguf_blocks.quantize_matrix(name, W, imp)
    assert data.shape == (8, 512 // gguf_blocks.TYPES[name].block * gguf_blocks.TYPES[name].bytes)
    theirs = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[name])
    np.testing.assert_array_equal(theirs, ours)
    rel = np.abs(ours - W).mean() / np.abs(W).mean()
    assert rel < {"Q2_K": 0.45, "Q3_K": 0.25}.get(name, 0.15)


@pytest.mark.parametrize("name", ["Q4_0", "Q4_K", "Q3_K", "Q5_1"])
def test_importance_lowers_weighted_error_and_gptq_lowers_output_error(name):
    rng = np.random.default_rng(2)
    X = _correlated(rng, 2048, 256)
    W = rng.standard_normal((64, 256)).astype(np.float32) * 0.05
    H = X.T @ X
    imp = np.diag(H) / len(X)
    plain = gguf_blocks.quantize_matrix(name, W)[1]
    weighted = gguf_blocks.quantize_matrix(name, W, imp)[1]
    gptq = gguf_blocks.quantize_matrix(name, W, imp, H)[1]

    def werr(D):
        return float((((D - W) ** 2) * imp).sum())

    def out_err(D):
        return float((((D - W) @ X.T) ** 2).mean())

    assert werr(weighted) < 0.97 * werr(plain)
    assert out_err(gptq) < 0.9 * out_err(weighted)


def _reference_gptq(bt, W, imp, H, damp):
    """GPTQ as written in the paper's pseudo-code: every column's error fed to all later columns at once."""
    W = torch.from_numpy(W.copy())
    H = torch.from_numpy(H).double()
    H.diagonal().add_(damp * float(H.diagonal().mean()))
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    Q = torch.zeros_like(W)
    for c0 in range(0, W.shape[1], bt.block):
        p = gguf_blocks.fit_params(bt, W[:, c0:c0 + bt.block], torch.from_numpy(imp[c0:c0 + bt.block]) + 1e-6 * float(imp.mean()) + 1e-30)
        sc, mn = p.scale.repeat_interleave(bt.group, 1), p.minv.repeat_interleave(bt.group, 1)
        for j in range(bt.block):
            col = c0 + j
            q = gguf_blocks.round_q(bt, W[:, col], sc[:, j], mn[:, j])
            Q[:, col] = gguf_blocks.dequant(bt, q, sc[:, j], mn[:, j])
            e = (W[:, col] - Q[:, col]) / U[col, col]
            W[:, col + 1:] -= e[:, None] * U[col, col + 1:][None, :]
    return Q.numpy()


@pytest.mark.parametrize("name", ["Q4_K", "IQ4_NL", "Q2_K"])
def test_rows_of_several_experts_are_quantized_at_once_each_by_its_own_inputs(name):
    """A measured mix prices every expert's rows in one call (an importance per row): the same blocks as quantizing
    each expert's rows with its own importance."""
    rng = np.random.default_rng(1)
    W = rng.normal(0, 0.05, (8, 256)).astype(np.float32)
    a, b = rng.gamma(1.0, 1.0, 256), rng.gamma(2.0, 0.5, 256)
    together = gguf_blocks.quantize_matrix(name, W, np.stack([a] * 4 + [b] * 4))[1]
    alone = np.concatenate([gguf_blocks.quantize_matrix(name, W[:4], a)[1], gguf_blocks.quantize_matrix(name, W[4:], b)[1]])
    assert np.allclose(together, alone, atol=1e-7)


@pytest.mark.parametrize("name", ["Q4_K", "Q6_K", "Q5_0", "IQ4_NL"])
def test_gptq_with_sub_blocks_and_a_shared_factor_matches_the_plain_algorithm(name):
    """The writer's GPTQ (contiguous rows, 32-column sub-blocks, one product per block, the original weights'
    errors fed forward through the Hessian's own Cholesky factor, reusable across matrices) is the textbook
    algorithm (errors through the inverse Hessian's factor)."""
    from edgetailor.exporters.gguf_calibrated import add_gram_upper

    rng = np.random.default_rng(5)
    X = _correlated(rng, 1024, 512)
    W = rng.standard_normal((48, 512)).astype(np.float32) * 0.05
    wide = torch.from_numpy(rng.standard_normal((300, 1100)).astype(np.float32))
    acc = torch.zeros(1100, 1100)
    for part in wide.split(100):
        add_gram_upper(acc, part, strips=3)          # row strips, each from its diagonal on
    full = (wide.double().T @ wide.double()).numpy()
    np.testing.assert_allclose(np.triu(acc.numpy()), np.triu(full), atol=1e-5 * np.abs(full).max())
    H = X.astype(np.float64).T @ X
    imp = (np.diag(H) / len(X)).astype(np.float32)
    V, dead = gguf_blocks.hessian_factor(np.triu(H), 0.1)       # only the upper triangle is read
    Hd = H + 0.1 * np.diag(H).mean() * np.eye(512)
    assert torch.equal(V, V.triu()) and torch.equal(V.diagonal(), torch.ones(512)) and not dead.any()
    D = np.linalg.inv(V.double().numpy()) @ Hd @ np.linalg.inv(V.double().numpy()).T      # H = V D V^T, D diagonal
    np.testing.assert_allclose(D - np.diag(np.diag(D)), 0, atol=1e-5 * np.abs(D).max())
    bt = gguf_blocks.TYPES[name]
    ours = gguf_blocks.quantize_blocks(bt, W, imp, (V, dead))[2].numpy()
    again = gguf_blocks.quantize_blocks(bt, W, imp, H, 0.1)[2].numpy()
    np.testing.assert_array_equal(ours, again)
    ref = _reference_gptq(bt, W, imp, H, 0.1)

    def out_err(D):
        return float((((D - W) @ X.T) ** 2).mean())

    assert out_err(ours) == pytest.approx(out_err(ref), rel=0.01)
    assert np.mean(ours == ref) > 0.98


def test_the_factor_is_computed_in_place_a_panel_at_a_time():
    """``cholesky_in_place`` (panels narrower than the matrix) is LAPACK's Cholesky factor, written over its input;
    the upper triangle is neither read nor left behind."""
    rng = np.random.default_rng(3)
    X = torch.from_numpy(rng.standard_normal((400, 300)))
    H = X.T @ X + torch.eye(300)
    A = H.tril() + torch.full_like(H, 7.0).triu(1)          # garbage above the diagonal: must not be read
    out = gguf_blocks.cholesky_in_place(A, block=64)
    assert out.data_ptr() == A.data_ptr()
    torch.testing.assert_close(A, torch.linalg.cholesky(H), rtol=1e-10, atol=1e-10)


def test_imatrix_statistics_equal_a_direct_computation(tiny_models):
    from edgetailor.engine import imatrix
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32)
    ids = torch.randint(3, 500, (3, 40))
    stats = imatrix.collect(model, ids, hessians=True, batch_size=2)
    with torch.no_grad():
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids)).reshape(-1, 64).double()
    for mod in ("q_proj", "k_proj", "v_proj"):
        name = f"model.layers.0.self_attn.{mod}"
        torch.testing.assert_close(stats.second_moment(name), (x ** 2).mean(0))
        torch.testing.assert_close(stats.hessian(name), x.T @ x / len(x), rtol=1e-5, atol=1e-6)
    assert stats.input_of["model.layers.0.self_attn.k_proj"] == "model.layers.0.self_attn.q_proj"
    assert stats.count["lm_head"] == ids.numel()
    with torch.no_grad():      # the head's statistics come from the final norm, without computing logits
        h = model.model(input_ids=ids).last_hidden_state.reshape(-1, 64).double()
    torch.testing.assert_close(stats.second_moment("lm_head"), (h ** 2).mean(0))


def _blockwise(model, seqs, types, method, tmp_path):
    from edgetailor.exporters.gguf_calibrated import BlockSink, quantize_blockwise

    sink = BlockSink(tmp_path / f"{method}.bin")
    stats = quantize_blockwise(model, seqs, types, sink, method, batch_size=2)
    return {n: e.load() for n, e in sink.encoded().items()}, stats


def test_gptq_leaves_attention_inputs_weighted_only(tiny_models, tmp_path):
    from edgetailor.exporters.gguf_calibrated import tensor_sources
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32)
    seqs = torch.randint(3, 500, (4, 64))
    types = {n: "Q4_0" for n in tensor_sources(model)}
    gptq, _ = _blockwise(model, seqs, types, "gptq", tmp_path)
    weighted, _ = _blockwise(model, seqs, types, "imatrix", tmp_path)
    for n in ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight"):
        np.testing.assert_array_equal(gptq[n], weighted[n])
    for n in ("blk.0.attn_output.weight", "blk.0.ffn_up.weight", "blk.0.ffn_down.weight"):
        assert not np.array_equal(gptq[n], weighted[n])


def test_block_by_block_statistics_equal_a_whole_model_pass(tiny_models, tmp_path):
    """Walking the model one block at a time sees the activations a whole-model pass sees, head included,
    and leaves the model's weights as they were."""
    from edgetailor.engine import imatrix
    from edgetailor.exporters.gguf_calibrated import tensor_sources
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seqs = torch.randint(3, 500, (5, 48))
    whole = imatrix.collect(model, seqs, hessians=False, batch_size=2)
    types = {n: "Q4_0" for n in tensor_sources(model)}
    _, walked = _blockwise(model, seqs, types, "gptq", tmp_path)
    assert set(walked.sum_sq) == set(whole.sum_sq) and "lm_head" in walked.sum_sq
    for name in whole.sum_sq:
        torch.testing.assert_close(walked.second_moment(name), whole.second_moment(name), rtol=1e-4, atol=1e-7)
        assert walked.count[name] == whole.count[name] == seqs.numel()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def _unpermute(w, n_head):
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _runs_like_torch_with_its_decoded_weights(model, tok, path):
    """torch with the weights gguf-py decodes from the file's blocks gives the logits llama.cpp computes."""
    import gguf
    from edgetailor.engine.runtimes import LlamaCppRuntime
    from gguf import MODEL_ARCH, get_tensor_name_map

    mine = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    sd = model.state_dict()
    names = get_tensor_name_map(MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    with torch.no_grad():
        for hf_name, p in sd.items():
            g = names.get_name(hf_name, try_suffixes=(".weight",))
            if p.ndim != 2 or g not in mine:
                continue
            t = mine[g]
            w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(p.shape)
            if hf_name.endswith("q_proj.weight"):
                w = _unpermute(w, model.config.num_attention_heads)
            elif hf_name.endswith("k_proj.weight"):
                w = _unpermute(w, model.config.num_key_value_heads)
            p.copy_(torch.from_numpy(np.ascontiguousarray(w)))
    ids = tok("Once upon a time there was a little girl", add_special_tokens=True)["input_ids"]
    with torch.no_grad():
        expect = model(torch.tensor([ids])).logits[0].numpy()
    rt = LlamaCppRuntime(path, n_ctx=64, threads=2)
    try:
        got = rt.logits(ids)
    finally:
        rt.close()
    assert np.abs(got - expect).max() < 0.05 * np.abs(expect).max()


def test_iq4_nl_blocks_run_in_llama_cpp_and_beat_q4_0_at_its_size(tiny_models, tmp_path):
    """IQ4_NL (Q4_0's 18 bytes per 32 weights, a non-uniform grid): llama.cpp runs our blocks as torch does,
    and the same importance statistics give a smaller weighted error than Q4_0's uniform grid."""
    from edgetailor.exporters.gguf_calibrated import export_calibrated, tensor_sources
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tiny_models["llama"]
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src)
    rng = np.random.default_rng(3)
    W = rng.standard_normal((64, 256)).astype(np.float32) * 0.05
    imp = rng.uniform(0.1, 5, 256).astype(np.float32)
    err = {t: float((((gguf_blocks.quantize_matrix(t, W, imp)[1] - W) ** 2) * imp).sum()) for t in ("Q4_0", "IQ4_NL")}
    assert err["IQ4_NL"] < 0.9 * err["Q4_0"]
    types = {n: "IQ4_NL" if n.startswith("blk.") else "Q8_0" for n in tensor_sources(model)}
    out = tmp_path / "iq4nl.gguf"
    export_calibrated(model, tok, src, out, "IQ4_NL", torch.randint(3, 500, (4, 64)), "gptq", types=types)
    _runs_like_torch_with_its_decoded_weights(model, tok, out)


def test_calibrated_file_has_llama_cpps_types_and_runs_like_torch(tiny_models, tmp_path):
    import gguf
    from edgetailor.exporters.gguf import llama_quantize, write_gguf
    from edgetailor.exporters.gguf_calibrated import export_calibrated
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tiny_models["llama"]
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src)
    ours = tmp_path / "ours.gguf"
    export_calibrated(model, tok, src, ours, "Q4_K_M", torch.randint(3, 500, (4, 64)), "gptq")
    write_gguf(model, tok, src, tmp_path / "f32.gguf", "F32")
    llama_quantize(tmp_path / "f32.gguf", tmp_path / "llama.gguf", "Q4_K_M")
    mine = {t.name: t for t in gguf.GGUFReader(str(ours)).tensors}
    ref = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "llama.gguf")).tensors}
    assert {n: t.tensor_type.name for n, t in mine.items()} == ref
    assert {"Q4_K", "Q6_K", "Q5_0"} <= set(ref.values())
    assert sum(int(t.n_bytes) for t in mine.values()) == sum(
        int(t.n_bytes) for t in gguf.GGUFReader(str(tmp_path / "llama.gguf")).tensors)
    assert ours.stat().st_size <= (tmp_path / "llama.gguf").stat().st_size

    _runs_like_torch_with_its_decoded_weights(model, tok, ours)


def test_recipe_runs_imatrix_then_calibrated_export(tiny_models, tmp_path):
    from edgetailor.engine.job import JobSpec, run_job

    recipe = {"name": "calibrated", "steps": [
        {"step": "imatrix", "params": {"seq_len": 128, "max_sequences": 6}},
        {"step": "quant.gguf_calibrated", "params": {"types": ["Q3_K_M"]}},
        {"step": "quant.gguf_calibrated", "params": {"target_mb": 0.15, "method": "imatrix"}},
        {"step": "quant.gguf_calibrated", "params": {"types": ["Q4_K_M"], "mix": "measured"}},
        {"step": "evaluate", "params": {"windows": 2, "ctx": 128}}]}
    record = run_job(JobSpec(recipe=recipe, source=str(tiny_models["llama"]), options={"threads": 2}))
    assert record.manifest["status"] == "succeeded", record.manifest
    assert (record.folder / "artifacts" / "imatrix.safetensors").exists()
    import gguf

    llama_imatrix = gguf.GGUFReader(str(record.folder / "artifacts" / "imatrix-llama.cpp.gguf"))
    names = {t.name for t in llama_imatrix.tensors}
    assert "blk.0.attn_q.weight.in_sum2" in names and "blk.1.ffn_down.weight.counts" in names
    assert len(names) == 2 * (2 * 7 + 1)               # every linear of the 2 layers and the untied output head
    v = record.variant("base-Q3_K_M-gptq")
    assert v["format"] == "gguf" and v["metrics"]["perplexity"] > 1
    mixed = record.variant("base-0.15MB-imatrix")
    assert abs(mixed["metrics"]["size_bytes"] / 0.15e6 - 1) < 0.02 and mixed["metrics"]["perplexity"] > 1
    measured = record.variant("base-Q4_K_M-gptq-measured")
    assert measured["params"]["mix"] == "measured" and measured["params"]["type"] == "mixed like Q4_K_M"
    assert measured["metrics"]["perplexity"] > 1


def test_calibrated_export_alone_saves_the_statistics_it_used(tiny_models):
    from edgetailor.engine.imatrix import ImportanceStats
    from edgetailor.engine.job import JobSpec, run_job

    recipe = {"name": "alone", "steps": [
        {"step": "quant.gguf_calibrated", "params": {"types": ["Q4_K_M"], "seq_len": 64, "max_sequences": 3}}]}
    record = run_job(JobSpec(recipe=recipe, source=str(tiny_models["llama"]), options={"threads": 2}))
    assert record.manifest["status"] == "succeeded", record.manifest
    stats = ImportanceStats.load(record.folder / "artifacts" / "imatrix.safetensors")
    assert stats.tokens == 3 * 64 and "lm_head" in stats.sum_sq and not stats.has_hessians()
    assert record.variant("base-Q4_K_M-gptq")["params"]["calibration_tokens"] == 3 * 64


@pytest.mark.parametrize("target_mb", [0.13, 0.18])
def test_mixed_precision_lands_within_2_percent_of_the_target(tiny_models, tmp_path, target_mb):
    from edgetailor.engine.errors import EdgeTailorError
    from edgetailor.exporters.gguf import verify_gguf
    from edgetailor.exporters.gguf_calibrated import export_to_target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tiny_models["mistral"]
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src)
    seqs = torch.randint(3, 500, (4, 64))
    out = tmp_path / "mixed.gguf"
    info = export_to_target(model, tok, src, out, int(target_mb * 1e6), seqs)
    assert abs(out.stat().st_size / (target_mb * 1e6) - 1) < 0.02
    assert len(set(info["tensor_types"].values())) > 1           # really mixed
    assert verify_gguf(out)["loaded_by"] == "llama.cpp"
    with pytest.raises(EdgeTailorError, match="larger than the largest"):
        export_to_target(model, tok, src, tmp_path / "too-big.gguf", int(1e6), seqs)


def test_measured_mix_is_never_larger_than_llama_cpps_file_and_runs(tiny_models, tmp_path):
    from edgetailor.exporters.gguf import llama_quantize, write_gguf
    from edgetailor.exporters.gguf_calibrated import export_to_target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tiny_models["llama"]
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src)
    write_gguf(model, tok, src, tmp_path / "f32.gguf", "F32")
    for like in ("Q4_K_M", "Q2_K"):
        llama_quantize(tmp_path / "f32.gguf", tmp_path / f"llama-{like}.gguf", like)
        out = tmp_path / f"ours-{like}.gguf"
        info = export_to_target(model, tok, src, out, None, torch.randint(3, 500, (4, 64)), like=like)
        size, theirs = out.stat().st_size, (tmp_path / f"llama-{like}.gguf").stat().st_size
        assert 0.97 * theirs < size <= theirs, (like, size, theirs)
        assert info["type"] == f"mixed like {like}"
    _runs_like_torch_with_its_decoded_weights(model, tok, out)


def test_planner_samples_rows_by_weight_so_a_few_heavy_rows_are_not_missed():
    """The output head's loss weight sits on the rows of the tokens the text uses: a sample of 64 of 49152 rows
    must still estimate the weighted error sum; evenly spaced rows would see none of the heavy ones."""
    from edgetailor.exporters.gguf_plan import sample_rows

    rng = np.random.default_rng(4)
    weights = np.full(49152, 1e-4)
    heavy = rng.choice(49152, 300, replace=False)
    weights[heavy] = rng.uniform(0.5, 3, 300)
    err = rng.uniform(0.5, 1.5, 49152)                   # each row's squared error under some type
    exact = float(weights @ err)
    rows, factor = sample_rows(weights, 64)
    assert abs(float(factor @ err[rows]) / exact - 1) < 0.1
    even = np.linspace(0, 49151, 64).astype(int)
    assert abs(float(weights[even] @ err[even]) * 49152 / 64 / exact - 1) > 0.5
    small_rows, small_factor = sample_rows(weights[:50], 64)           # fewer rows than the sample: all, exactly
    assert list(small_rows) == list(range(50)) and np.allclose(small_factor, weights[:50])


def test_sensitivity_is_the_loss_gradient_at_each_output_and_the_inputs_moments(tiny_models):
    from edgetailor.engine.sensitivity import measure_sensitivity
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32)
    seqs = torch.randint(3, 500, (2, 32))
    sens = measure_sensitivity(model, seqs, seq_len=16)          # four pieces of 16 tokens
    assert sens.tokens == 64 and all(p.grad is None and p.requires_grad for p in model.parameters())
    name = "model.layers.1.mlp.down_proj"
    mod = model.get_submodule(name)
    grads, inputs = [], []
    def keep(module, args, out):
        inputs.append(args[0].detach())
        out.retain_grad()
        grads.append(out)

    h = mod.register_forward_hook(keep)
    for ids in seqs.reshape(4, 16):
        out = model(input_ids=ids[None]).logits[0, :-1]
        torch.nn.functional.cross_entropy(out, ids[1:], reduction="sum").backward()
    h.remove()
    model.zero_grad(set_to_none=True)
    g2 = torch.cat([o.grad.reshape(-1, o.shape[-1]) for o in grads]).double().pow(2).mean(0)
    x2 = torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs]).double().pow(2).mean(0)
    torch.testing.assert_close(sens.output_grad_sq[name], g2, rtol=1e-4, atol=1e-12)
    torch.testing.assert_close(sens.input_sq[name], x2, rtol=1e-5, atol=1e-9)
    assert sens.output_grad_sq["lm_head"].shape == (model.config.vocab_size,)
    # the same pass from the files read lazily (one block's weights at a time): the same statistics
    from edgetailor.engine.lazy import LazyModel

    lazy = measure_sensitivity(LazyModel(tiny_models["llama"]), seqs, seq_len=16)
    for name in sens.output_grad_sq:
        torch.testing.assert_close(lazy.output_grad_sq[name], sens.output_grad_sq[name], rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(lazy.input_sq[name], sens.input_sq[name], rtol=1e-6, atol=1e-12)


def _with_outlier_channels(model, factor=30.0):
    """The same function with a few input channels carried at large scale (as trained LLMs have)."""
    with torch.no_grad():
        for layer in model.model.layers:
            ch = torch.tensor([3, 17, 40])
            layer.input_layernorm.weight[ch] *= factor
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                lin.weight[:, ch] /= factor
            layer.mlp.up_proj.weight[ch] *= factor
            layer.mlp.down_proj.weight[:, ch] /= factor
    return model


def test_awq_scaling_keeps_the_function_and_lowers_quantization_error(tiny_models):
    import copy

    from edgetailor.engine import imatrix
    from edgetailor.engine.steps.awq import AwqConfig, apply_awq, fake_quantize
    from transformers import AutoModelForCausalLM

    model = _with_outlier_channels(AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32))
    ids = torch.randint(3, 500, (4, 64))
    stats = imatrix.collect(model, ids, hessians=True)
    scaled = copy.deepcopy(model)
    records = apply_awq(scaled, stats, AwqConfig(bits=3, group_size=32))
    assert len(records) == 3 * model.config.num_hidden_layers
    assert any(r["alpha"] > 0 for r in records)
    assert all(r["error_after"] <= r["error_before"] for r in records)

    test_ids = torch.randint(3, 500, (2, 48))
    with torch.no_grad():
        ref = model(test_ids).logits
        torch.testing.assert_close(scaled(test_ids).logits, ref, rtol=1e-4, atol=1e-4)   # an equivalent model

        def quantized_error(m):
            q = copy.deepcopy(m)
            for name, lin in imatrix.linear_layers(q).items():
                if name != "lm_head":
                    lin.weight.copy_(fake_quantize(lin.weight, 3, 32))
            return float((q(test_ids).logits - ref).square().mean())

        assert quantized_error(scaled) < 0.8 * quantized_error(model)

    # the statistics were rescaled with the model: they equal a fresh collection on the scaled model
    fresh = imatrix.collect(scaled, ids, hessians=True)
    for name in ("model.layers.1.self_attn.k_proj", "model.layers.0.mlp.down_proj"):
        torch.testing.assert_close(stats.hessian(name), fresh.hessian(name), rtol=1e-3, atol=1e-5)


def test_recipe_awq_then_llama_cpp_quantizer(tiny_models):
    from edgetailor.engine.job import JobSpec, run_job

    recipe = {"name": "awq", "steps": [
        {"step": "imatrix", "params": {"seq_len": 64, "max_sequences": 4}},
        {"step": "awq.scale", "params": {"bits": 4}},
        {"step": "export", "params": {"format": "gguf", "types": ["Q4_K_M"]}},
        {"step": "quant.gguf_calibrated", "params": {"types": ["Q4_K_M"]}},
        {"step": "evaluate", "params": {"windows": 2, "ctx": 128}}]}
    record = run_job(JobSpec(recipe=recipe, source=str(tiny_models["qwen2"]), options={"threads": 2}))
    assert record.manifest["status"] == "succeeded", record.manifest
    variants = [v for v in record.manifest["variants"] if v["name"] != "baseline"]
    assert len(variants) == 2 and all("awq4" in v["steps"] for v in variants)
    assert all(v["metrics"]["perplexity"] > 1 for v in variants)


def test_released_weights_leave_resident_memory_and_keep_their_values(tmp_path):
    """What the block-by-block writer does to a block it is done with: a file-mapped weight (as transformers
    maps safetensors) leaves the process's resident memory, and reads back the same."""
    import sys

    import psutil
    from edgetailor.engine.memory import release_pages

    if not sys.platform.startswith("linux"):
        pytest.skip("madvise(MADV_PAGEOUT) is Linux's")
    path = tmp_path / "weights.bin"
    np.random.default_rng(0).standard_normal(16 * 2**20 // 4, dtype=np.float32).tofile(path)   # 16 MB
    w = torch.from_numpy(np.memmap(path, dtype=np.float32, mode="c"))
    total = float(w.sum())                                      # every page read: resident
    proc = psutil.Process()
    before = proc.memory_info().rss
    release_pages([w])
    after = proc.memory_info().rss
    assert before - after > 12 * 2**20, (before, after)
    assert float(w.sum()) == total


def test_gguf_writer_streams_tensors_instead_of_holding_the_file(tiny_models, tmp_path):
    """Tensors are converted and written one at a time: the writer's peak allocation stays far below the
    tensor data it writes (it used to hold every converted tensor until the end)."""
    import tracemalloc

    import gguf
    from edgetailor.exporters.gguf import write_gguf
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = tiny_models["llama"]                 # its small SentencePiece vocabulary; wider, deeper layers
    cfg = AutoConfig.from_pretrained(src)
    cfg.update(dict(hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=4,
                    num_key_value_heads=4, head_dim=64))
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src)
    out = tmp_path / "f32.gguf"
    tracemalloc.start()
    try:
        write_gguf(model, tok, src, out, "F32")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    tensors = gguf.GGUFReader(str(out)).tensors
    data = sum(int(t.n_bytes) for t in tensors)
    largest = max(int(t.n_bytes) for t in tensors)
    assert data > 10 * 2**20 and peak < data / 4, (peak, data, largest)


@pytest.mark.parametrize("method", ["gptq", "imatrix"])
def test_a_file_written_with_tensors_encoded_for_an_earlier_file_is_the_same_file(tiny_models, tmp_path, method):
    """The planner's candidates share encoded tensors (``EncodedCache``): a tensor's bytes depend on its weights,
    type, method and the source's activations only, so a file written partly from the cache is byte for byte
    the file written from scratch, and the cached tensors' fits are not run again."""
    from edgetailor.exporters.gguf_calibrated import EncodedCache, export_calibrated, tensor_sources
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tiny_models["llama"]
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src)
    seqs = torch.randint(3, 500, (4, 64), generator=torch.Generator().manual_seed(0))
    names = sorted(tensor_sources(model))
    first = {n: "Q5_0" for n in names}           # 32-element blocks: every tiny matrix takes them
    second = {n: ("Q8_0" if i % 2 else "Q5_0") for i, n in enumerate(names)}
    export_calibrated(model, tok, src, tmp_path / "alone.gguf", "Q4_K_M", seqs, method, types=second)
    cache = EncodedCache(tmp_path / "cache")
    export_calibrated(model, tok, src, tmp_path / "first.gguf", "Q4_K_M", seqs, method, types=first, cache=cache)
    assert cache.hits == 0 and len(list(cache.folder.iterdir())) == len(names)
    export_calibrated(model, tok, src, tmp_path / "second.gguf", "Q4_K_M", seqs, method, types=second, cache=cache)
    assert cache.hits == sum(t == "Q5_0" for t in second.values())
    assert (tmp_path / "second.gguf").read_bytes() == (tmp_path / "alone.gguf").read_bytes()


def test_the_walk_stops_after_the_last_block_with_a_tensor_not_encoded_before(tiny_models, tmp_path):
    """A later file's blocks past the last one with a new tensor are not walked (their tensors are all in the
    cache); a file whose every tensor is cached is written without walking at all. The bytes stay the same."""
    from edgetailor.exporters.gguf_calibrated import EncodedCache, export_calibrated, tensor_sources
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tiny_models["llama"]
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src)
    seqs = torch.randint(3, 500, (4, 64), generator=torch.Generator().manual_seed(0))
    names = sorted(tensor_sources(model))
    first = {n: "Q5_0" for n in names}
    block0 = {n: ("Q8_0" if n.startswith("blk.0.attn_q") else t) for n, t in first.items()}
    cache = EncodedCache(tmp_path / "cache")
    export_calibrated(model, tok, src, tmp_path / "first.gguf", "Q4_K_M", seqs, "gptq", types=first, cache=cache)
    export_calibrated(model, tok, src, tmp_path / "block0-alone.gguf", "Q4_K_M", seqs, "gptq", types=block0)
    ran = []
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
    for types, out, walked in ((first, "again.gguf", set()), (block0, "block0.gguf", {0})):
        ran.clear()
        export_calibrated(model, tok, src, tmp_path / out, "Q4_K_M", seqs, "gptq", types=types, cache=cache)
        assert set(ran) == walked and len(model.model.layers) > 1
    assert (tmp_path / "again.gguf").read_bytes() == (tmp_path / "first.gguf").read_bytes()
    assert (tmp_path / "block0.gguf").read_bytes() == (tmp_path / "block0-alone.gguf").read_bytes()
