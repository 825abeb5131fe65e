"""The block walker: one decoder block at a time sees exactly what a full forward sees, from a loaded model or
from the files read lazily (one block's weights in memory at a time)."""
from __future__ import annotations

import pytest
import torch
from edgetailor.engine.lazy import LazyModel
from edgetailor.engine.walker import BlockWalk


def _full_forward(folder, seqs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.inference_mode():
        out = model.model(input_ids=seqs, output_hidden_states=True, use_cache=False)
    return model, out.hidden_states     # embeddings, each block's output, the last one after the final norm


def _walk(model, seqs):
    walk = BlockWalk(model, seqs, batch_size=2)
    after = []
    for block in walk:
        block.forward()
        after.append(torch.cat(walk.hidden))
    return walk, after, torch.cat(list(walk.final_hidden()))


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "qwen3_moe", "mixtral", "granite", "smollm3", "phi3", "gemma2",
                                    "gemma", "olmo2", "starcoder2", "stablelm"])
def test_a_block_walk_sees_what_a_full_forward_sees(family, family_model, stories_dir):
    folder = stories_dir if family == "llama" else family_model(family)
    seqs = torch.randint(3, 500, (3, 40), generator=torch.Generator().manual_seed(0))
    model, hidden = _full_forward(folder, seqs)
    for source in (model, LazyModel(folder)):
        _, after, final = _walk(source, seqs)
        assert len(after) == len(hidden) - 1
        for i, h in enumerate(after[:-1]):
            torch.testing.assert_close(h, hidden[i + 1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(final, hidden[-1], rtol=1e-5, atol=1e-5)


def test_a_lazy_walk_holds_one_block_of_weights_at_a_time(family_model):
    folder = family_model("gemma3_text")
    lazy = LazyModel(folder)
    walk, _, _ = _walk(lazy, torch.randint(3, 500, (2, 32)))
    state = lazy.state_dict()
    block = sum(t.numel() * 4 for n, t in state.items() if n.startswith("model.layers.0."))
    embedding = state["model.embed_tokens.weight"].nbytes
    assert walk.peak_materialised_bytes == block             # fp32 copy of one block, never two
    # what was read: every block once, the final norm, and the embedding table once (a slice at a time)
    assert lazy.loaded_bytes <= sum(t.nbytes for n, t in state.items() if n.startswith("model.layers.")) \
        + state["model.norm.weight"].nbytes + embedding


def test_experts_kept_apart_in_the_files_are_read_under_the_modules_names_an_expert_at_a_time(family_model):
    """transformers' own checkpoint conversion names the stacked weights (Mixtral: ``block_sparse_moe`` renamed
    ``mlp``, w1 and w3 stacked into ``gate_up_proj``); reading one expert reads that expert's tensors only."""
    from transformers import AutoModelForCausalLM

    folder = family_model("mixtral")
    lazy = LazyModel(folder)
    loaded = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).state_dict()
    state = lazy.state_dict()
    assert list(state) == list(loaded)
    for name, t in state.items():
        assert torch.equal(t.load().float(), loaded[name]), name
    stacked = state["model.layers.1.mlp.experts.gate_up_proj"]
    before = lazy.loaded_bytes
    torch.testing.assert_close(stacked.rows(2, 3)[0].float(), loaded["model.layers.1.mlp.experts.gate_up_proj"][2])
    assert lazy.loaded_bytes - before == stacked.nbytes // stacked.shape[0]


@pytest.mark.parametrize("mode", ["llama.cpp", "measured"])
def test_calibrated_gguf_from_the_files_is_the_file_from_the_loaded_model(mode, tiny_models, tmp_path):
    """qwen2 with a tied head: the lazy walk (one block read at a time) writes the same bytes, in both mixes."""
    from edgetailor.engine import text
    from edgetailor.engine.calibration import token_sequences
    from edgetailor.exporters.gguf_calibrated import export_calibrated, export_to_target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tiny_models["qwen2"]
    tok = AutoTokenizer.from_pretrained(str(folder))
    seqs = token_sequences(tok, text.read_text(None), 96, 4)
    loaded = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    files = []
    for i, model in enumerate([loaded, LazyModel(folder)]):
        out = tmp_path / f"{i}.gguf"
        if mode == "measured":
            export_to_target(model, tok, folder, out, None, seqs, "gptq", like="Q4_K_M")
        else:
            export_calibrated(model, tok, folder, out, "Q4_K_M", seqs, "gptq")
        files.append(out.read_bytes())
    assert files[0] == files[1]


def test_a_walk_reports_blocks_with_a_time_estimate_and_cancels_within_a_block(stories_dir):
    from edgetailor.engine.errors import RunCancelled

    seqs = torch.randint(3, 500, (4, 32))
    seen = []
    for block in BlockWalk(LazyModel(stories_dir), seqs, batch_size=1, progress=lambda f, m: seen.append((f, m))):
        block.forward()
    n = len(seen)
    assert [f for f, _ in seen] == [(i + 1) / n for i in range(n)]
    assert all(m.startswith(f"block {i + 1}/{n}, about ") and m.endswith(" s left") for i, (_, m) in enumerate(seen))
    batches = []
    walk = BlockWalk(LazyModel(stories_dir), seqs, batch_size=1, cancelled=lambda: len(batches) >= 2)
    blocks = iter(walk)
    block = next(blocks)               # (the walk holds the block's weights while its generator is alive)
    with pytest.raises(RunCancelled):
        with torch.nn.modules.module.register_module_forward_hook(lambda *a: batches.append(1)):
            block.forward()
    assert len(batches) < 4 * 10          # stopped after two batches' modules, not at the block's end


@pytest.mark.parametrize("family", ["granite", "gemma2", "gemma3_text"])
def test_walked_logprobs_are_the_models_own_for_families_that_scale_or_cap_their_logits(family, family_model):
    """Granite divides its logits by logits_scaling, Gemma 2/3 soft-cap them: the walked head does the same."""
    from edgetailor.engine.calibration import final_logprobs
    from transformers import AutoModelForCausalLM

    folder = family_model(family)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    seqs = torch.randint(3, 200, (2, 24))
    with torch.inference_mode():
        want = torch.log_softmax(model(input_ids=seqs).logits.float(), -1).reshape(-1, model.config.vocab_size)
    got = final_logprobs(LazyModel(folder), seqs)
    assert torch.allclose(got, want, atol=1e-4), float((got - want).abs().max())
