"""The evaluator: llama-perplexity's windowing, perplexity, KL and top-1 from real runtimes."""
from __future__ import annotations

import math

import numpy as np
import torch
from edgetailor.engine import resolve
from edgetailor.engine.evaluate import ReferenceLogprobs, evaluate, make_windows
from edgetailor.engine.modeling import load_model
from edgetailor.engine.runtimes import TorchRuntime
from edgetailor.engine.text import default_evaluation_path, read_text


def test_windows_follow_llama_perplexity(stories_dir):
    lm = load_model(resolve(str(stories_dir)))
    text = read_text(default_evaluation_path())
    ws = make_windows(lm.tokenizer, text, 128, 3)
    ids = [1] + lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ws) == 3 and all(len(w) == 128 for w in ws)
    assert all(w[0] == 1 for w in ws)                    # BOS replaces each window's first token
    assert ws[1][1:] == ids[129:256]


def test_perplexity_is_exp_mean_nll_of_second_halves(stories_dir, tmp_path):
    lm = load_model(resolve(str(stories_dir)))
    ws = make_windows(lm.tokenizer, read_text(default_evaluation_path()), 64, 2)
    res = evaluate(TorchRuntime(lm.model), ws)
    nll, n = 0.0, 0
    for w in ws:
        with torch.no_grad():
            lp = torch.log_softmax(lm.model(torch.tensor([w])).logits[0].double(), -1)
        for j in range(32, 63):
            nll -= lp[j, w[j + 1]].item()
            n += 1
    assert res.tokens_scored == n == 62
    assert math.isclose(res.perplexity, math.exp(nll / n), rel_tol=1e-5)


def test_kl_is_zero_against_itself_and_grows_with_noise(stories_dir, tmp_path):
    lm = load_model(resolve(str(stories_dir)))
    ws = make_windows(lm.tokenizer, read_text(default_evaluation_path()), 64, 2)
    ref = ReferenceLogprobs(tmp_path / "ref")
    evaluate(TorchRuntime(lm.model), ws, reference=ref, record_reference=True)
    same = evaluate(TorchRuntime(lm.model), ws, reference=ref)
    assert same.kl < 1e-4 and same.top1 > 0.99
    with torch.no_grad():
        for p in lm.model.parameters():
            if p.ndim == 2:
                p.add_(torch.randn_like(p) * p.std() * 0.3)
    noisy = evaluate(TorchRuntime(lm.model), ws, reference=ref)
    assert noisy.kl > 0.01 and noisy.top1 < same.top1
    assert np.isfinite(noisy.perplexity)


def test_a_comparison_scores_a_variant_on_the_first_windows_against_the_baseline_on_the_same(stories_dir):
    """A slow variant scored on fewer windows is compared with the baseline on those windows, not on all."""
    import copy

    from edgetailor.engine.evaluate import Comparison

    lm = load_model(resolve(str(stories_dir)))
    ws = make_windows(lm.tokenizer, read_text(default_evaluation_path()), 64, 4)
    noisy = copy.deepcopy(lm.model)
    with torch.no_grad():
        for p in noisy.parameters():
            if p.ndim == 2:
                p.add_(torch.randn_like(p) * p.std() * 0.2)
    with Comparison(lm.model, ws) as cmp:
        first_two = evaluate(TorchRuntime(lm.model), ws[:2])
        assert math.isclose(cmp.baseline_perplexity(2), first_two.perplexity, rel_tol=1e-6)
        assert math.isclose(cmp.baseline_perplexity(), cmp.baseline.perplexity, rel_tol=1e-9)
        res = cmp.score_runtime(TorchRuntime(noisy), windows=2)
        assert res.windows == 2 and res.kl > 0.001
        assert math.isclose(cmp.row(res)["ppl_increase_pct"], 100 * (res.perplexity / first_two.perplexity - 1),
                            rel_tol=1e-6)


def test_results_on_the_first_windows_and_on_the_rest_join_into_the_result_on_all(stories_dir, tmp_path):
    """A screened file scored on the rest of the windows later: the joined figures are those of one evaluation on
    every window (the 99.9th percentile of KL too, from every token's KL)."""
    from edgetailor.engine.evaluate import joined_results

    lm = load_model(resolve(str(stories_dir)))
    ws = make_windows(lm.tokenizer, read_text(default_evaluation_path()), 64, 5)
    ref = ReferenceLogprobs(tmp_path / "ref")
    evaluate(TorchRuntime(lm.model), ws, reference=ref, record_reference=True)
    with torch.no_grad():
        for p in lm.model.parameters():
            if p.ndim == 2:
                p.add_(torch.randn_like(p) * p.std() * 0.2)
    rt = TorchRuntime(lm.model)
    whole = evaluate(rt, ws, reference=ref, per_window=True).to_dict()
    first = evaluate(rt, ws[:2], reference=ref, per_window=True, token_kl=True).to_dict()
    rest = evaluate(rt, ws[2:], reference=ref, per_window=True, first_window=2, token_kl=True).to_dict()
    joined = joined_results(first, rest)
    assert len(first["token_kl"]) == first["tokens_scored"] and "token_kl" not in whole
    for key in ("perplexity", "nll", "kl", "kl_p999", "top1"):
        assert math.isclose(joined[key], whole[key], rel_tol=1e-9), key
    assert (joined["windows"], joined["tokens_scored"], joined["per_window"]) == \
        (whole["windows"], whole["tokens_scored"], whole["per_window"])
    # the rest scored against the reference's own windows 2..4, not its first three
    misaligned = evaluate(rt, ws[2:], reference=ref).to_dict()
    assert not math.isclose(misaligned["kl"], rest["kl"], rel_tol=1e-3)
