"""Early exit (early_exit.heads) on the real stories260K model: exact decoding with a KV cache."""
from __future__ import annotations

import pytest
import torch
from edgetailor.engine import text
from edgetailor.engine.calibration import token_sequences
from edgetailor.engine.modeling import load_model
from edgetailor.engine.runtimes import EarlyExitRuntime
from edgetailor.engine.sources import resolve
from edgetailor.engine.steps.early_exit import EarlyExitModel, fit_heads, load_heads, save_heads


@pytest.fixture(scope="module")
def exits(stories_dir):
    torch.set_num_threads(2)
    lm = load_model(resolve(str(stories_dir)))
    seqs = token_sequences(lm.tokenizer, text.read_text(None), 128, 16)
    heads = fit_heads(lm.model, seqs, [2, 3], distill_steps=10)
    return lm.model, heads, seqs


def test_threshold_one_gives_the_full_model_and_lower_thresholds_exit_more(exits):
    model, heads, seqs = exits
    ee = EarlyExitModel(model, heads)
    ids = seqs[1, :96]
    with torch.no_grad():
        full = model(input_ids=ids[None], use_cache=False).logits[0]
    logits, exit_at = ee.forward(ids, 1.0)
    assert torch.allclose(logits, full, atol=1e-5) and bool((exit_at == 5).all())
    shares = []
    for threshold in (0.95, 0.7, 0.4, 0.2):
        rt = EarlyExitRuntime(ee, threshold)
        rt.logits(ids.tolist())
        shares.append(sum(rt.exit_shares().values()))
    assert shares == sorted(shares) and shares[-1] > shares[0] and shares[-1] > 0.2


def test_decoding_with_a_kv_cache_matches_the_whole_sequence_pass(exits):
    model, heads, seqs = exits
    ee = EarlyExitModel(model, heads)
    ids = seqs[2, :48]
    for threshold in (0.6, 0.3):
        logits, exit_at = ee.forward(ids, threshold)
        assert 0 < int((exit_at < 5).sum()) < len(ids)        # some tokens leave early, some do not
        cache = ee.new_cache()
        steps = [ee.decode_step(t, cache, p, threshold) for p, t in enumerate(ids.tolist())]
        assert [ran for _, ran in steps] == exit_at.tolist()
        assert torch.allclose(torch.stack([lg for lg, _ in steps]), logits, atol=1e-4)


def test_heads_round_trip_through_safetensors(exits, tmp_path):
    model, heads, seqs = exits
    save_heads(heads, tmp_path / "h.safetensors", {"thresholds": [0.5]})
    loaded = load_heads(model, tmp_path / "h.safetensors")
    assert sorted(loaded) == [2, 3]
    a, _ = EarlyExitModel(model, heads).forward(seqs[0, :32], 0.5)
    b, _ = EarlyExitModel(model, loaded).forward(seqs[0, :32], 0.5)
    assert torch.equal(a, b)
