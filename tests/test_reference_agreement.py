"""Our evaluator against llama.cpp's own llama-perplexity, on the same GGUF, text and windowing.

Needs llama.cpp's tools built from the llama-cpp-python sdist (`python bench/reference_tools.py`, several
minutes); skipped when they are not built. bench/results/gguf_ladder.md holds the same check on the demo
model with 100 windows.
"""
from __future__ import annotations

import sys

import pytest
from conftest import REPO, WIKITEXT

sys.path.insert(0, str(REPO / "bench"))


def _tools():
    try:
        import reference_tools as ref
    except ImportError:
        pytest.skip("bench/reference_tools.py missing")
    bins = ref._binaries(ref.cache_dir() / "build" / (ref.installed_version() or "?"))
    if not ref._all_built(bins):
        pytest.skip("llama.cpp reference tools not built (python bench/reference_tools.py)")
    return ref


def test_perplexity_agrees_with_llama_perplexity_within_1pct(stories_dir, tmp_path):
    ref = _tools()
    from edgetailor.engine import resolve
    from edgetailor.engine.evaluate import evaluate, make_windows
    from edgetailor.engine.modeling import load_model
    from edgetailor.engine.runtimes import LlamaCppRuntime
    from edgetailor.engine.text import read_text
    from edgetailor.exporters import get_exporter

    if not WIKITEXT.exists():
        pytest.skip("wikitext-2 not present")
    lm = load_model(resolve(str(stories_dir)))
    out = tmp_path / "s.gguf"
    get_exporter("gguf").export(lm.model, lm.tokenizer, stories_dir, out, {"type": "F16"})
    ppl_tool, _ = ref.run_perplexity(out, WIKITEXT, ctx=128, chunks=8, threads=2)
    windows = make_windows(lm.tokenizer, read_text(WIKITEXT), 128, 8)
    with LlamaCppRuntime(out, n_ctx=128, threads=2) as rt:
        ours = evaluate(rt, windows).perplexity
    assert abs(ours / ppl_tool - 1) < 0.01, (ours, ppl_tool)
