"""GGUF export: every file loads in real llama.cpp, computes what torch computes, and tokenizes alike."""
from __future__ import annotations

import numpy as np
import pytest
from edgetailor.engine import resolve
from edgetailor.engine.modeling import load_model
from edgetailor.engine.runtimes import LlamaCppRuntime, TorchRuntime
from edgetailor.exporters import get_exporter
from edgetailor.exporters.gguf import quant_types

TEST_STRINGS = [
    "Once upon a time, there was a little girl named Lily.",
    "Ünïcödé — “quotes” café naïve 日本語 😀 Ελληνικά",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\n\tindented\twith\ttabs",
    "spaces    and   runs\n\n\n   of whitespace   ",
    "numbers 3.14159 1,000,000 2026-11-22 0x1F",
]


def _export(folder, out, qtype):
    lm = load_model(resolve(str(folder)))
    ex = get_exporter("gguf")
    res = ex.export(lm.model, lm.tokenizer, folder, out, {"type": qtype})
    ex.verify(out)
    return lm, res


@pytest.mark.parametrize("mt", ["llama", "mistral", "qwen2", "qwen3"])
def test_f32_gguf_matches_torch_logits(tiny_models, tmp_path, mt):
    lm, _ = _export(tiny_models[mt], tmp_path / "m.gguf", "F32")
    ids = lm.tokenizer("Once upon a time there was a cat who liked to sleep in the sun.",
                       add_special_tokens=False)["input_ids"][:24]
    ref = TorchRuntime(lm.model).logits(ids)
    with LlamaCppRuntime(tmp_path / "m.gguf", n_ctx=64, threads=2) as rt:
        got = rt.logits(ids)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() < 2e-3 * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0", "Q4_K_M", "Q2_K", "IQ4_XS"])
def test_types_load_in_llama_cpp(tiny_models, tmp_path, qtype):
    out = tmp_path / f"m-{qtype}.gguf"
    lm, res = _export(tiny_models["llama"], out, qtype)
    import gguf

    r = gguf.GGUFReader(str(out))
    assert int(r.fields["general.file_type"].contents()) == int(gguf.LlamaFileType[f"MOSTLY_{qtype}"])
    assert out.stat().st_size == res.info["bytes"]


def test_all_k_and_iq_types_are_offered():
    types = quant_types()
    for t in ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q3_K_L", "Q3_K_M",
              "Q3_K_S", "Q2_K", "IQ4_XS", "IQ4_NL", "IQ3_S", "IQ3_XXS", "IQ2_XXS", "IQ1_S"):
        assert t in types, t


def test_imatrix_types_refuse_with_a_fix(tiny_models, tmp_path):
    from edgetailor.engine import EdgeTailorError

    with pytest.raises(EdgeTailorError, match="importance matrix"):
        _export(tiny_models["llama"], tmp_path / "x.gguf", "IQ2_XXS")
    assert not (tmp_path / "x.gguf").exists()


def _token_ids_agree(folder, tmp_path):
    lm, _ = _export(folder, tmp_path / "t.gguf", "F16")
    with LlamaCppRuntime(tmp_path / "t.gguf", n_ctx=64, threads=1) as rt:
        for s in TEST_STRINGS:
            assert rt.tokenize(s) == lm.tokenizer(s, add_special_tokens=False)["input_ids"], s
        # special tokens in text map to their ids when parsed as special
        bos = lm.tokenizer.bos_token
        if bos:
            assert rt.tokenize(bos + "hi", special=True)[0] == lm.tokenizer.bos_token_id


def test_sentencepiece_token_ids_identical(stories_dir, tmp_path):
    _token_ids_agree(stories_dir, tmp_path)


@pytest.mark.slow
def test_bpe_token_ids_identical_and_chat_template_kept(demo_source, tmp_path):
    _token_ids_agree(demo_source.path, tmp_path)
    import gguf

    r = gguf.GGUFReader(str(tmp_path / "t.gguf"))
    assert r.fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert "<|im_start|>" in r.fields["tokenizer.chat_template"].contents()


def test_sentencepiece_model_with_rows_not_in_blocks_falls_back(stories_dir, tmp_path):
    """stories260K's 172-wide FFN does not split into 32- or 256-blocks: those tensors stay wider."""
    lm, res = _export(stories_dir, tmp_path / "s.gguf", "Q8_0")
    assert res.info["kept_f16"] and all("ffn_down" in n for n in res.info["kept_f16"])
    _export(stories_dir, tmp_path / "s4.gguf", "Q4_K_M")
