"""Low-rank factorization (lowrank.svd) on the real stories260K model."""
from __future__ import annotations

import pytest
import torch
from edgetailor.engine import text
from edgetailor.engine.calibration import mean_loss, token_sequences
from edgetailor.engine.modeling import load_model
from edgetailor.engine.plain import plain_weights
from edgetailor.engine.sources import resolve
from edgetailor.engine.steps.lowrank import LowRankConfig, LowRankLinear, factorize


@pytest.fixture(scope="module")
def stories(stories_dir):
    torch.set_num_threads(2)
    src = resolve(str(stories_dir))
    lm = load_model(src)
    seqs = token_sequences(lm.tokenizer, text.read_text(None), 128, 16)
    return src, seqs


def _linear_params(model) -> int:
    n = 0
    for m in model.model.layers.modules():
        if isinstance(m, LowRankLinear):
            n += m.first.weight.numel() + m.second.weight.numel()
        elif isinstance(m, torch.nn.Linear) and not any(m is x.first or m is x.second for x in model.modules()
                                                         if isinstance(x, LowRankLinear)):
            n += m.weight.numel()
    return n


def test_budget_mode_meets_the_parameter_budget_within_one_percent(stories):
    src, _ = stories
    model = load_model(src).model
    before = _linear_params(model)
    rep = factorize(model, LowRankConfig(keep=0.7, activation_aware=False))
    after = _linear_params(model)                       # counted on the modules themselves
    assert after == rep["linear_params_after"] and before == rep["linear_params_before"]
    assert 0.69 * before <= after <= 0.70 * before
    assert rep["layers_factored"] > 0


def test_energy_mode_keeps_at_least_the_requested_energy(stories):
    src, _ = stories
    model = load_model(src).model
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    factorize(model, LowRankConfig(mode="energy", keep=0.9, activation_aware=False))
    checked = 0
    for name, m in model.named_modules():
        if isinstance(m, LowRankLinear):
            w = dense[name]
            kept = (m.second.weight @ m.first.weight).detach().square().sum() / w.square().sum()
            assert float(kept) >= 0.9 - 1e-4, name
            assert m.rank < min(w.shape)
            checked += 1
    assert checked > 0


def test_activation_aware_beats_plain_svd_on_calibration_loss(stories):
    src, seqs = stories
    losses = {}
    for aware in (False, True):
        model = load_model(src).model
        factorize(model, LowRankConfig(keep=0.7, activation_aware=aware), seqs)
        losses[aware] = mean_loss(model, seqs)
    base = mean_loss(load_model(src).model, seqs)
    assert base < losses[True] < losses[False]


def test_plain_weights_multiplies_the_factors_back(stories):
    src, seqs = stories
    model = load_model(src).model
    factorize(model, LowRankConfig(keep=0.5, activation_aware=True), seqs)
    plain = plain_weights(model)
    assert not any(isinstance(m, LowRankLinear) for m in plain.modules())
    assert any(isinstance(m, LowRankLinear) for m in model.modules())      # the original stays factored
    assert sum(p.numel() for p in plain.parameters()) > sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        a = model(input_ids=seqs[:2]).logits
        b = plain(input_ids=seqs[:2]).logits
    assert torch.allclose(a, b, atol=1e-3)
