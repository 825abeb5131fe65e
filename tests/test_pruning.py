"""Pruning steps: unstructured (magnitude, Wanda), 2:4, width (heads/MLP/hidden) and depth; every result
exports to GGUF and runs in llama.cpp."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import REPO
from edgetailor.engine.calibration import block_influence, decoder_layers, mean_loss, token_sequences
from edgetailor.engine.context import JobOptions, RunContext
from edgetailor.engine.registry import get_step
from edgetailor.engine.runs import RunRecord
from edgetailor.engine.sources import resolve
from edgetailor.engine.text import read_text

ALT_TEXT = REPO / "assets" / "text" / "calibration_alt.txt"   # held out from the calibration text


def make_ctx(tmp_path, source) -> RunContext:
    record = RunRecord.create(tmp_path / "runs", {"name": "t", "steps": []}, str(source), {})
    return RunContext(record, resolve(str(source)), JobOptions(threads=2), emit=lambda e: None)


def run_step(ctx, name: str, **params):
    info = get_step(name)
    ctx.step_name = name
    ctx.record.manifest["steps"].append({"name": name, "params": params})
    info.run(ctx, info.parse(params))
    return ctx.record.manifest["steps"][-1].get("report", {})


def block_weights(model):
    return {n: m.weight.detach().clone() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in n}


def gguf_logits(model, tokenizer, tokenizer_dir, tmp_path, tokens):
    from edgetailor.engine.runtimes import LlamaCppRuntime
    from edgetailor.exporters import get_exporter

    out = tmp_path / "m.gguf"
    exporter = get_exporter("gguf")
    exporter.export(model, tokenizer, tokenizer_dir, out, {"type": "F32"})
    assert exporter.verify(out)["loaded_by"] == "llama.cpp"
    with LlamaCppRuntime(out, n_ctx=64, threads=2) as rt:
        return rt.logits(tokens)


def onnx_logits(model, tokenizer, tokenizer_dir, tmp_path, tokens):
    from edgetailor.engine.runtimes import OnnxRuntime
    from edgetailor.exporters import get_exporter

    out = tmp_path / "m-onnx"
    exporter = get_exporter("onnx")
    exporter.export(model, tokenizer, tokenizer_dir, out, {"type": "fp32"})
    assert exporter.verify(out)
    with OnnxRuntime(out, n_ctx=64, threads=2) as rt:
        return rt.logits(tokens)


def assert_close_logits(got, ref):
    """llama.cpp's F32 graph agrees with torch to float rounding (a wrong shape or mapping is off by >> 1)."""
    assert np.abs(got - ref).max() < 5e-3 * max(1.0, np.abs(ref).max())
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.9


def test_magnitude_sparsity_exact_and_2_4_pattern(tmp_path, stories_dir):
    ctx = make_ctx(tmp_path, stories_dir)
    report = run_step(ctx, "prune.magnitude", sparsity=0.5)
    for name, w in block_weights(ctx.model).items():
        zeros_per_row = (w == 0).sum(1)
        assert (zeros_per_row == w.shape[1] // 2).all(), name
    assert report["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert ctx.applied == ["mag50"]

    ctx = make_ctx(tmp_path, stories_dir)
    report = run_step(ctx, "prune.magnitude", pattern="2:4")
    for name, w in block_weights(ctx.model).items():
        groups = w.reshape(w.shape[0], -1, 4)
        assert ((groups != 0).sum(-1) <= 2).all(), name
    assert set(report["sparsity_by_type"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_wanda_uses_activations_and_beats_magnitude(tmp_path, stories_dir):
    mag = make_ctx(tmp_path, stories_dir)
    run_step(mag, "prune.magnitude", sparsity=0.5)
    wanda = make_ctx(tmp_path, stories_dir)
    run_step(wanda, "prune.wanda", sparsity=0.5, calibration_sequences=16, seq_len=128)
    mw, ww = block_weights(mag.model), block_weights(wanda.model)
    differing = sum(int(((mw[n] == 0) != (ww[n] == 0)).sum()) for n in mw)
    assert differing > 0.05 * sum(w.numel() for w in mw.values())      # the activations changed the choice
    for w in ww.values():
        assert ((w == 0).sum(1) == w.shape[1] // 2).all()                 # still 50% of every row
    held_out = token_sequences(mag.tokenizer, read_text(ALT_TEXT), 128, 16)
    assert mean_loss(wanda.model, held_out) < mean_loss(mag.model, held_out)

    wanda24 = make_ctx(tmp_path, stories_dir)
    run_step(wanda24, "prune.wanda", pattern="2:4", calibration_sequences=8, seq_len=128)
    for w in block_weights(wanda24.model).values():
        assert ((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all()
    # unstructured sparsity keeps the shapes: the pruned model exports and runs in llama.cpp like the original
    tokens = held_out[0, :32].tolist()
    ref = wanda24.model(input_ids=held_out[:1, :32]).logits[0].detach().numpy()
    got = gguf_logits(wanda24.model, wanda24.tokenizer, stories_dir, tmp_path, tokens)
    assert_close_logits(got, ref)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_width_pruning_gives_a_valid_model_that_exports(tmp_path, tiny_models, kind):
    from transformers import AutoModelForCausalLM

    src = tiny_models[kind]
    ctx = make_ctx(tmp_path, src)
    report = run_step(ctx, "prune.width", heads_keep=0.5, mlp_keep=0.5, hidden_keep=0.5, round_to=16,
                      calibration_sequences=4, seq_len=64)
    cfg = ctx.model.config
    # 4 heads in 2 KV groups -> 1 query head per group; MLP 256 -> 128; hidden 64 -> 32; head_dim kept at 16
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (2, 2, 16)
    assert (cfg.intermediate_size, cfg.hidden_size) == (128, 32)
    assert report["non_embedding_removed"] > 0.5
    assert ctx.applied == ["width-h2-kv2-ffn128-d32"]
    ctx.model.save_pretrained(tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    ids = torch.tensor([[1, 5, 9, 20, 33, 7, 2, 11, 40, 3, 8, 13]])
    ref = ctx.model(input_ids=ids).logits[0].detach().numpy()
    assert np.allclose(reloaded(input_ids=ids).logits[0].detach().numpy(), ref, atol=1e-5)
    assert_close_logits(gguf_logits(ctx.model, ctx.tokenizer, src, tmp_path, ids[0].tolist()), ref)
    assert_close_logits(onnx_logits(ctx.model, ctx.tokenizer, src, tmp_path, ids[0].tolist()), ref)


def test_width_pruning_keeps_the_most_active_mlp_channels(tmp_path, stories_dir):
    from edgetailor.engine.calibration import linear_input_stats

    ctx = make_ctx(tmp_path, stories_dir)
    original = ctx.model
    seqs = token_sequences(ctx.tokenizer, ctx.calibration_text(), 64, 4)
    norms = linear_input_stats(original, seqs, lambda n: n == "model.layers.0.mlp.down_proj")
    top = torch.sort(torch.topk(norms["model.layers.0.mlp.down_proj"].sum_sq, 96).indices).values
    run_step(ctx, "prune.width", mlp_keep=0.5, round_to=32, calibration_sequences=4, seq_len=64)
    kept = ctx.model.model.layers[0].mlp.down_proj.weight
    assert kept.shape == (64, 96)
    assert torch.equal(kept, original.model.layers[0].mlp.down_proj.weight[:, top])



def test_a_width_kept_whole_is_not_rounded_away(tmp_path, stories_dir):
    """round_to applies to the axes being cut: 64 hidden channels rounded to 48s were 48, so MLP pruning alone cut
    the hidden width too (the planner's narrower demo models, 576 hidden rounded to 256s, crashed on it)."""
    ctx = make_ctx(tmp_path, stories_dir)
    run_step(ctx, "prune.width", mlp_keep=0.5, round_to=48, calibration_sequences=4, seq_len=64)
    assert ctx.model.config.hidden_size == 64 and ctx.model.config.intermediate_size == 96

def test_depth_pruning_removes_the_least_influential_block(tmp_path, stories_dir):
    ctx = make_ctx(tmp_path, stories_dir)
    original = ctx.model
    seqs = token_sequences(ctx.tokenizer, ctx.calibration_text(), 128, 8)
    influence = block_influence(original, seqs)
    weakest = int(np.argmin(influence))
    report = run_step(ctx, "prune.depth", blocks=1, calibration_sequences=8, seq_len=128)
    assert report["removed_blocks"] == [weakest]
    assert ctx.model.config.num_hidden_layers == len(influence) - 1 == len(decoder_layers(ctx.model))
    kept = [i for i in range(len(influence)) if i != weakest]
    for new, old in enumerate(kept):
        assert torch.equal(ctx.model.model.layers[new].mlp.up_proj.weight, original.model.layers[old].mlp.up_proj.weight)
    ids = seqs[:1, :24]
    ref = ctx.model(input_ids=ids).logits[0].detach().numpy()
    assert_close_logits(gguf_logits(ctx.model, ctx.tokenizer, stories_dir, tmp_path, ids[0].tolist()), ref)
    assert_close_logits(onnx_logits(ctx.model, ctx.tokenizer, stories_dir, tmp_path, ids[0].tolist()), ref)


def test_depth_pruning_by_perplexity_ranks_by_loss_rise(tmp_path, stories_dir):
    ctx = make_ctx(tmp_path, stories_dir)
    report = run_step(ctx, "prune.depth", blocks=2, method="perplexity", calibration_sequences=4, seq_len=128)
    scores = report["scores"]
    assert report["removed_blocks"] == sorted(np.argsort(scores)[:2].tolist())
    assert ctx.model.config.num_hidden_layers == len(scores) - 2


def test_bad_prune_parameters_fail_clearly():
    from edgetailor.engine.errors import EdgeTailorError

    with pytest.raises(EdgeTailorError, match="pattern"):
        get_step("prune.wanda").parse({"pattern": "4:2"})
    with pytest.raises(EdgeTailorError, match="sparsity"):
        get_step("prune.magnitude").parse({"sparsity": 1.5})
    with pytest.raises(EdgeTailorError, match="blocks"):
        get_step("prune.depth").parse({})
