"""Low-rank, clustering, layer sharing and early exit as recipe steps on stories260K: each runs in a job,
exports to GGUF (loaded back by llama.cpp in the export step) and is scored by the evaluate step."""
from __future__ import annotations

import pytest
from edgetailor.engine import JobSpec, run_job
from edgetailor.engine.steps.cluster import load_palette
from edgetailor.engine.steps.early_exit import load_heads

CALIB = {"calibration_sequences": 8, "calibration_length": 128}


def _run(stories_dir, tmp_path, steps):
    recipe = {"name": "techniques", "steps": steps + [
        {"step": "export", "params": {"format": "gguf", "types": ["F32"]}},
        {"step": "evaluate", "params": {"windows": 2, "ctx": 128, "current": True}}]}
    rec = run_job(JobSpec(recipe=recipe, source=str(stories_dir), runs_root=str(tmp_path),
                          options={"threads": 2}))
    m = rec.manifest
    assert m["status"] == "succeeded", m["error"]
    return rec, {v["name"]: v for v in m["variants"]}


@pytest.mark.parametrize("step, params, label", [
    ("lowrank.svd", {"keep": 0.7, **CALIB}, "asvd70"),
    ("cluster.kmeans", {"clusters": 16}, "km16"),
    ("share.layers", {"pairs": 1, "heal_steps": 4, "batch_size": 2, **CALIB}, "share1"),
])
def test_transform_exports_to_gguf_that_scores_like_the_torch_model(stories_dir, tmp_path, step, params, label):
    rec, v = _run(stories_dir, tmp_path, [{"step": step, "params": params}])
    gguf, torch_v, base = v[f"{label}-F32"], v[f"{label}-torch"], v["baseline"]
    assert gguf["steps"] == [label] and gguf["metrics"]["size_bytes"] > 0
    # the file llama.cpp runs is the transformed model: same perplexity as the in-memory torch model
    assert abs(gguf["metrics"]["perplexity"] / torch_v["metrics"]["perplexity"] - 1) < 2e-3
    assert gguf["metrics"]["kl"] > 1e-4                      # and it is not the untouched baseline
    report = rec.manifest["steps"][0]["report"]
    if step == "lowrank.svd":
        assert torch_v["metrics"]["parameters"] < base["metrics"]["parameters"]
        assert report["linear_params_after"] <= 0.7 * report["linear_params_before"]
    if step == "share.layers":
        assert torch_v["metrics"]["parameters"] == report["parameters_after"] < report["parameters_before"]
        assert report["heldout_kl_after_heal"] < report["heldout_kl_before_heal"]
    if step == "cluster.kmeans":
        assert report["max_distinct_values"] <= 16 and 4 < report["bits_per_weight"] < 4.1
        palette = rec.folder / "artifacts" / report["palette_file"]
        assert palette.stat().st_size == report["palette_file_bytes"] and load_palette(palette)


def test_early_exit_reports_exits_quality_and_speed_and_exports_the_full_model(stories_dir, tmp_path):
    rec, v = _run(stories_dir, tmp_path, [{"step": "early_exit.heads", "params": {
        "thresholds": [0.8, 0.4], "distill_steps": 5, "windows": 2, "ctx": 128, "decode_tokens": 8,
        "decode_repeats": 1, **CALIB}}])
    full, high, low = v["base-exit1"], v["base-exit0.8"], v["base-exit0.4"]
    assert full["metrics"]["exited_share"] == 0 and full["metrics"]["kl"] < 1e-3
    assert 0 <= high["metrics"]["exited_share"] <= low["metrics"]["exited_share"] and low["metrics"]["exited_share"] > 0
    assert low["metrics"]["kl"] > full["metrics"]["kl"]
    assert all(x["metrics"]["decode_tps"] > 0 for x in (full, high, low))
    # the GGUF is the full-depth model; the heads are a separate torch artifact
    assert v["base-F32"]["metrics"]["kl"] < 1e-3
    heads = rec.folder / "artifacts" / full["params"]["heads"]
    from edgetailor.engine.modeling import load_model
    from edgetailor.engine.sources import resolve

    assert sorted(load_heads(load_model(resolve(str(stories_dir))).model, heads)) == [2, 4]


def test_combined_recipe_exports_to_gguf_and_onnx(stories_dir, tmp_path):
    """low-rank -> layer sharing -> k-means in one recipe; GGUF (llama.cpp) and ONNX (onnxruntime) both score
    like the in-memory torch model they were written from."""
    recipe = {"name": "combined", "steps": [
        {"step": "lowrank.svd", "params": {"keep": 0.8, **CALIB}},
        {"step": "share.layers", "params": {"pairs": 1, "heal_steps": 2, "batch_size": 2, **CALIB}},
        {"step": "cluster.kmeans", "params": {"clusters": 256, "write_palette": False}},
        {"step": "export", "params": {"format": "gguf", "types": ["F32"]}},
        {"step": "export", "params": {"format": "onnx", "types": ["fp32"]}},
        {"step": "evaluate", "params": {"windows": 2, "ctx": 128, "current": True}}]}
    rec = run_job(JobSpec(recipe=recipe, source=str(stories_dir), runs_root=str(tmp_path), options={"threads": 2}))
    assert rec.manifest["status"] == "succeeded", rec.manifest["error"]
    v = {x["name"]: x["metrics"] for x in rec.manifest["variants"]}
    name = "asvd80+share1+km256"
    ppl = v[f"{name}-torch"]["perplexity"]
    assert abs(v[f"{name}-F32"]["perplexity"] / ppl - 1) < 2e-3
    assert abs(v[f"{name}-fp32"]["perplexity"] / ppl - 1) < 2e-3
