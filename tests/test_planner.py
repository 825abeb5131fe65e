"""The planner: search under a device budget, build and measure the best candidates, recommend one (CLI, GUI)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import make_tiny_model

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

BUDGET_KEYS = ("memory_bytes", "decode_tps", "j_per_token", "kl", "ppl_increase_pct")


@pytest.fixture(scope="module")
def kv_model(tmp_path_factory, stories_dir):
    """A tiny random Llama whose head size (32) lets llama.cpp quantize its KV cache."""
    return make_tiny_model(tmp_path_factory.mktemp("planner") / "llama-hd32", "llama", stories_dir, seed=4,
                           hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32)


FIT = {"context": 256, "kv_types": ["f16", "q8_0"], "max_drop_blocks": 1, "candidates": 2, "rounds": 2, "trials": 16,
       "max_sequences": 4, "seq_len": 128, "prompt_tokens": 32, "gen_tokens": 8, "repeats": 1, "screen_windows": 1}


@pytest.fixture(scope="module")
def fit_run(kv_model):
    from edgetailor.engine import JobSpec, run_job

    events = []
    record = run_job(JobSpec(recipe={"name": "fit", "steps": [{"step": "fit", "params": FIT}]}, source=str(kv_model),
                             options={"threads": 2, "eval_windows": 3, "eval_ctx": 128}), emit=events.append)
    assert record.manifest["status"] == "succeeded", record.manifest.get("error")
    return record, events


def test_fit_builds_the_best_candidates_measures_them_and_recommends_one_that_fits(fit_run):
    from edgetailor.engine.planner import violations
    from edgetailor.engine.steps.fit import FitConfig

    record, events = fit_run
    plan = json.loads((record.artifacts_dir / "plan.json").read_text())
    assert len(plan["rounds"]) >= 1 and all(r["points"] for r in plan["rounds"])
    # the first GGUF file is measured with every KV type, each later one with its own; ONNX folders with
    # onnxruntime's float32 cache (both formats are in the search)
    files = {m["label"].rsplit("-kv-", 1)[0] for m in plan["measured"]}
    assert len(files) == 2
    assert {m["kv_type"] for m in plan["measured"] if not m["onnx"]} == {"f16", "q8_0"}
    assert {m["kv_type"] for m in plan["measured"] if m["onnx"]} <= {"f32"}
    assert {p["format"] for p in plan["rounds"][0]["points"]} == {"gguf", "onnx"}
    # every GGUF file the search drew is predicted with every KV type (its trials go to size and depth)
    for r in plan["rounds"]:
        kv_of: dict[tuple, set] = {}
        for p in r["points"]:
            if p["format"] == "gguf":
                kv_of.setdefault((p["tensor_bytes"], p["drop_blocks"], p["speed_weight"]), set()).add(p["kv_type"])
        assert kv_of and all(kvs == {"f16", "q8_0"} for kvs in kv_of.values()), kv_of
    by_name = {v["name"]: v for v in record.manifest["variants"]}
    for m in plan["measured"]:
        v = by_name[m["name"]]
        assert (record.folder / v["path"]).exists()
        assert v["format"] == m["format"]
        assert v["params"]["kv_type"] == m["kv_type"] or m["onnx"]
        # checked against the source before it was kept, then evaluated and benchmarked in llama.cpp
        assert v["metrics"]["verify_top1"] > 0.5 and v["metrics"]["kl"] >= 0
        assert v["metrics"]["peak_rss_os_bytes"] > 0 and v["metrics"]["decode_tps"] > 0
        assert v["metrics"]["predicted_memory_bytes"] > 0
    # the q8_0 cache of the first file is smaller than its f16 cache
    first = sorted(plan["measured"], key=lambda m: plan["measured"].index(m))[:2]
    assert first[0]["predicted"]["memory_bytes"] != first[1]["predicted"]["memory_bytes"]
    rec = record.manifest["recommendation"]
    assert rec == plan["recommendation"]
    chosen = next(m for m in plan["measured"] if m["name"] == rec["variant"])
    # only the run's first evaluation is on every window at once; every other point was screened on one window
    # (estimated from the first on the same window); the recommended variant is scored on all three, whichever it is
    anchor = plan["measured"][0]
    assert anchor["kv_type"] in ("f16", "f32") and "screened" not in anchor
    for m in plan["measured"]:
        metrics = by_name[m["name"]]["metrics"]
        screened = m is not anchor and m["name"] != rec["variant"]
        assert (m.get("screened"), metrics.get("screened_windows"), metrics["eval_windows"]) == \
            ((1, 1, 1) if screened else (None, None, 3)), m["name"]
    budget = FitConfig(**FIT).budget()
    assert violations(budget, {k: chosen[k] for k in BUDGET_KEYS}) == {}          # it fits, as measured
    assert chosen["kl"] == min(m["kl"] for m in plan["measured"]
                               if not violations(budget, {k: m[k] for k in BUDGET_KEYS}))
    assert by_name[rec["variant"]]["metrics"]["recommended"] is True
    assert "to spare" in rec["reason"] and "perplexity" in rec["reason"]
    # after the first round the predictions are scaled to what was measured
    assert plan["calibration"]["points"] == len(plan["measured"])
    # every GGUF file's speed, the first's too, was predicted from llama.cpp's decode costs measured here
    assert "measured on this machine" in plan["decode_model"]
    assert all(m["decode_model"] for m in plan["measured"] if not m["onnx"])
    # with each KV-cache type's own cost (timed on a probe with that cache): one file, two speeds predicted
    assert "KV-cache types f16, q8_0" in plan["decode_model"]
    speeds: dict[str, set] = {}
    for m in plan["measured"]:
        if not m["onnx"]:
            speeds.setdefault(m["label"].rsplit("-kv-", 1)[0], set()).add(round(m["decode_tps_raw"], 6))
    assert any(len(s) == 2 for s in speeds.values()), speeds
    assert all(isinstance(m["contended"], bool) for m in plan["measured"])
    kinds = [e["data"]["phase"] for e in events if e["type"] == "plan"]
    assert kinds[0] == "predicted" and "measured" in kinds


def test_a_second_fit_of_the_model_reuses_what_the_first_measured_and_fresh_measures_again(fit_run, kv_model,
                                                                                            monkeypatch):
    """Another budget on the same model: the tensors' prices, the depth measurements, the baseline's log-probs and
    the encoded tensors come from the first fit (``engine.measured_cache``), the same plan gives the same file, byte
    for byte, and its scores on the same windows are the first fit's; ``reuse_measured`` off measures again."""
    from edgetailor.engine import JobSpec, run_job

    def fit(**params):
        events = []
        record = run_job(JobSpec(recipe={"name": "fit", "steps": [{"step": "fit", "params": {**FIT, **params}}]},
                                 source=str(kv_model), options={"threads": 2, "eval_windows": 3, "eval_ctx": 128}),
                         emit=events.append)
        assert record.manifest["status"] == "succeeded", record.manifest.get("error")
        said = [e["data"].get("message", "") for e in events if e["type"] in ("log", "progress")]
        return record, said

    first, _ = fit_run
    again, said = fit(max_kl=50.0)
    assert any(m.startswith("Reused what an earlier fit of this model measured") and "prices, depth, baseline, verify"
               in m for m in said)
    assert not any(m.startswith(("sensitivity", "baseline ")) for m in said)
    plan_of = [next(m["name"] for m in json.loads((r.artifacts_dir / "plan.json").read_text())["measured"]
                    if not m["onnx"]) for r in (first, again)]
    assert plan_of[0] == plan_of[1]
    files = [(r.folder / next(v["path"] for v in r.manifest["variants"] if v["name"] == plan_of[0])).read_bytes()
             for r in (first, again)]
    assert files[0] == files[1]
    scored = [r.variant(plan_of[0])["metrics"] for r in (first, again)]      # the same bytes: its scores reused
    assert scored[1].get("scores_reused") and not scored[0].get("scores_reused")
    assert (scored[1]["kl"], scored[1]["perplexity"]) == (scored[0]["kl"], scored[0]["perplexity"])
    assert again.variant("baseline")["metrics"]["perplexity"] == first.variant("baseline")["metrics"]["perplexity"]
    monkeypatch.setenv("EDGETAILOR_CACHE_GB", "0.000001")      # a cache too small for this model's entries
    _, said = fit(reuse_measured=False, candidates=1, rounds=1)
    assert not any(m.startswith("Reused") for m in said) and any(m.startswith("sensitivity") for m in said)
    assert any(m.startswith("What this fit measured is not kept") for m in said)
    monkeypatch.delenv("EDGETAILOR_CACHE_GB")
    _, said = fit(candidates=1, rounds=1)
    assert any(m.startswith("sensitivity") for m in said)          # nothing was left to reuse


def test_recommendation_picks_the_best_that_fits_and_names_the_runner_up_per_limit():
    from edgetailor.engine.devices import Budget, get_device
    from edgetailor.engine.planner import recommend

    budget = Budget(get_device("pixel-8"), max_memory_bytes=1e9, min_decode_tps=10, max_ppl_increase_pct=5)
    row = dict(decode_tps=20.0, j_per_token=0.3, ppl_increase_pct=1.0)
    small = {"name": "small", "memory_bytes": 8e8, "kl": 0.05, **row}
    big = {"name": "big", "memory_bytes": 1.2e9, "kl": 0.01, **row}
    slow = {"name": "slow", "memory_bytes": 9e8, "kl": 0.02, **{**row, "decode_tps": 8.0}}
    rec = recommend([small, big, slow], budget, 4096)
    assert rec["variant"] == "small"
    assert "200 MB to spare" in rec["reason"] and "4096-token context" in rec["reason"]
    assert rec["runner_up"]["memory"]["variant"] == "big" and rec["runner_up"]["memory"]["relax_pct"] == 20.0
    assert rec["runner_up"]["speed"]["variant"] == "slow"
    # a limit no built candidate shows the price of: the search's predictions say it (marked as not built)
    from edgetailor.engine.planner import Candidate, Point, Prediction

    guess = Point(Candidate(300_000_000, "f16"), Prediction(file_bytes=301_000_000, bits_per_weight=6.0,
                                                            memory_bytes=1.1e9, decode_tps=30.0, j_per_token=0.2,
                                                            kl=0.004, ppl_increase_pct=0.4, decode_tps_here=40.0), False)
    rec = recommend([small, slow], budget, 4096, [guess])
    assert rec["runner_up"]["memory"]["measured"] is False and rec["runner_up"]["memory"]["relax_pct"] == 10.0
    assert "not built" in rec["runner_up"]["memory"]["text"] and "301.0 MB file" in rec["runner_up"]["memory"]["text"]
    none = recommend([big, slow], Budget(get_device("pixel-8"), max_memory_bytes=5e8), 4096)
    assert none["variant"] is None and none["closest"] == "slow"
    assert "relax memory by 80%" in none["reason"]


def test_a_screened_cache_is_estimated_from_the_full_one_and_scored_in_full_before_it_is_recommended():
    from edgetailor.engine.devices import Budget, get_device
    from edgetailor.engine.planner import recommend_scored, screened_evaluation

    # the f16 cache on 4 windows, a q8_0 cache on the first 2: its estimate is f16's plus their difference there
    f16 = {"nll": 3.0, "perplexity": 20.0855, "kl": 0.010, "kl_p999": 0.5, "top1": 0.90, "windows": 4,
           "per_window": [{"nll": 2.0, "kl": 0.004, "top1": 0.95}, {"nll": 4.0, "kl": 0.016, "top1": 0.85},
                          {"nll": 3.0, "kl": 0.010, "top1": 0.90}, {"nll": 3.0, "kl": 0.010, "top1": 0.90}]}
    q8 = {"nll": 3.05, "kl": 0.012, "kl_p999": 0.6, "top1": 0.89, "windows": 2,
          "per_window": [{"nll": 2.04, "kl": 0.005, "top1": 0.94}, {"nll": 4.06, "kl": 0.019, "top1": 0.84}]}
    est = screened_evaluation(q8, f16)
    assert est["nll"] == pytest.approx(3.05) and est["perplexity"] == pytest.approx(2.718281828 ** 3.05)
    assert est["kl"] == pytest.approx(0.012) and est["top1"] == pytest.approx(0.89)
    assert est["windows"] == 2 and est["kl_p999"] == 0.6         # scored on 2 windows; its own tail
    # windows where the two differ by another amount than their means: the pairing, not the means, counts
    far = {**q8, "kl": 0.5, "per_window": [{"nll": 2.0, "kl": 0.008, "top1": 0.95}, {"nll": 4.0, "kl": 0.020, "top1": 0.85}]}
    assert screened_evaluation(far, f16)["kl"] == pytest.approx(0.014)

    budget = Budget(get_device("pixel-8"), max_memory_bytes=1e9)
    row = dict(decode_tps=20.0, j_per_token=0.3, ppl_increase_pct=1.0, memory_bytes=8e8)
    full = {"name": "f16", "kl": 0.010, **row}
    scored = []

    def rescore(m, kl):
        scored.append(m["name"])
        return {k: v for k, v in m.items() if k != "screened"} | {"kl": kl}

    # a screened pick is scored on every window first; worse than it looked, the other is recommended
    measured = [full, {"name": "q8_0", "kl": 0.008, "screened": 2, **row}]
    rec = recommend_scored(measured, budget, 2048, None, lambda m: rescore(m, 0.011))
    assert scored == ["q8_0"] and rec["variant"] == "f16" and "screened" not in measured[1]
    # still the best once scored in full: recommended, on its full figures
    scored.clear()
    measured = [full, {"name": "q8_0", "kl": 0.008, "screened": 2, **row}]
    rec = recommend_scored(measured, budget, 2048, None, lambda m: rescore(m, 0.009))
    assert scored == ["q8_0"] and rec["variant"] == "q8_0" and "KL 0.0090" in rec["reason"]
    # a screened point that is not the pick is left as it is (its runner-up text says it is an estimate)
    scored.clear()
    worse = {"name": "q4_0", "kl": 0.002, "screened": 2, **row, "memory_bytes": 1.1e9}
    rec = recommend_scored([full, worse], budget, 2048, None, lambda m: rescore(m, 1.0))
    assert scored == [] and rec["variant"] == "f16"
    assert "estimated from 2 windows" in rec["runner_up"]["memory"]["text"]


def test_when_memory_binds_a_shorter_context_is_offered_for_a_better_candidate():
    from edgetailor.engine.devices import Budget, get_device
    from edgetailor.engine.planner import recommend

    budget = Budget(get_device("pixel-8"), max_memory_bytes=1e9)
    row = dict(decode_tps=20.0, j_per_token=0.3, ppl_increase_pct=1.0, kv_bytes_per_token=100_000)
    small = {"name": "small", "memory_bytes": 8e8, "kl": 0.05, **row}
    big = {"name": "big", "memory_bytes": 1.2e9, "kl": 0.01, **row}      # 409.6 MB of it is KV at 4096 tokens
    rec = recommend([small, big], budget, 4096)
    sc = rec["shorter_context"]
    # 1.2 GB - 409.6 MB of KV = 790.4 MB; the limit leaves 209.6 MB of KV: 2096 tokens -> 2048 in steps of 256
    assert sc["variant"] == "big" and sc["context"] == 2048
    assert sc["memory_bytes"] == pytest.approx(1.2e9 - 100_000 * 2048) and sc["memory_bytes"] <= 1e9
    assert "2048 tokens instead of 4096" in sc["text"] and "predicted" in sc["text"]
    # of two of about the same quality, the one that keeps more context (a smaller KV cache per token)
    lean = {**big, "name": "lean-kv", "kl": 0.0105, "kv_bytes_per_token": 53_125, "memory_bytes": 1.0176e9 + 1e6}
    assert recommend([small, big, lean], budget, 4096)["shorter_context"]["variant"] == "lean-kv"
    # nothing to offer: the better candidate misses another limit too, or no context shorter than 256 fits
    assert "shorter_context" not in recommend([small, {**big, "decode_tps": 1.0}],
                                              Budget(get_device("pixel-8"), max_memory_bytes=1e9, min_decode_tps=10), 4096)
    assert "shorter_context" not in recommend([small, {**big, "memory_bytes": 5e9}], budget, 4096)


def test_calibration_scales_the_predictions_to_the_measured_points():
    from edgetailor.engine.planner import Calibration

    c = Calibration()
    c.refit([{"kv_type": "f16", "cost": 0.01, "kl": 0.02, "ppl_increase_pct": 2.0, "memory_raw": 100.0,
              "memory_measured": 110.0, "decode_tps_raw": 50.0, "decode_tps_measured": 25.0}])
    # one level of cost: the excess over the theory's 1/2 is llama.cpp's own floor, in every GGUF file
    assert c.kl_scale == pytest.approx(0.5) and c.kl_floor == pytest.approx(0.015)
    assert c.memory_ratio == pytest.approx(1.1)
    # decode time = the roofline's time + the runtime's own: 1/25 s measured, 1/50 s roofline -> 0.02 s
    assert c.latency("f16") == pytest.approx(0.02) and c.latency("q4_0") == pytest.approx(0.02)
    assert c.points == 1
    # ONNX points scale ONNX predictions only, per type (int4 and int8 run different kernels)
    c.refit([{"kv_type": "f16", "cost": 0.01, "kl": 0.02, "memory_raw": 100.0, "memory_measured": 110.0,
              "decode_tps_raw": 50.0, "decode_tps_measured": 25.0},
             {"kv_type": "f32", "onnx": "int8", "cost": 0.001, "kl": 0.004, "memory_raw": 200.0,
              "memory_measured": 180.0, "decode_tps_raw": 40.0, "decode_tps_measured": 10.0}])
    assert c.kl_scale == pytest.approx(0.5) and c.memory_ratio == pytest.approx(1.1)
    assert c.kl_scale_for("int8") == pytest.approx(4.0) and c.kl_scale_for("int4-32") == pytest.approx(0.5)
    assert c.onnx_memory_ratio == pytest.approx(0.9)
    assert c.latency("f32", "int8") == pytest.approx(0.1 - 0.025) and c.latency("f32", "int4-32") is None
    assert c.latency("f16") == pytest.approx(0.02)
    # the runtime's own time may come out below zero: over a decode cost model slower than measured, and over a
    # roofline where a cache larger than the file beats the memory bandwidth; a prediction keeps half its time
    point = {"kv_type": "f16", "cost": 0.01, "kl": 0.02, "memory_raw": 100.0, "memory_measured": 110.0,
             "decode_tps_raw": 50.0, "decode_tps_measured": 60.0}
    c.refit([{**point, "decode_model": True}])
    assert c.latency("f16") == pytest.approx(1 / 60 - 1 / 50)
    c.refit([point])
    assert c.latency("f16") == pytest.approx(1 / 60 - 1 / 50)



def test_gguf_kl_is_a_floor_plus_a_scale_once_two_levels_of_cost_are_measured():
    """The demo's first two planner files (98.4 MB: KL 0.0027 where the cost predicts 0.0002; 89.6 MB: 0.0087):
    a scale through zero fitted on the first put the second at 0.085; the floor and the theory's scale put it
    within 5%, and two levels of cost fit both."""
    from edgetailor.engine.planner import Calibration, floor_and_scale

    first, second = (0.00042, 0.00267), (0.01329, 0.00869)
    floor, scale = floor_and_scale([first])
    assert scale == pytest.approx(0.5) and floor == pytest.approx(0.00246)
    assert floor + scale * second[0] == pytest.approx(second[1], rel=0.06)
    floor, scale = floor_and_scale([first, second])
    assert scale == pytest.approx(0.468, rel=0.01) and floor == pytest.approx(0.00247, rel=0.01)
    # measured below the theory: no floor, the scale comes down; a negative fitted floor is refitted through zero
    assert floor_and_scale([(0.01, 0.002)]) == pytest.approx((0.0, 0.2))
    f, s = floor_and_scale([(0.01, 0.001), (0.03, 0.009)])
    assert f == 0.0 and s == pytest.approx((0.01 * 0.001 + 0.03 * 0.009) / (0.01 ** 2 + 0.03 ** 2))
    c = Calibration()      # ONNX files carry no llama.cpp floor; f16-cache GGUF points set it
    point = {"cost": 0.01, "memory_raw": 1.0, "decode_tps_raw": 1.0}
    c.refit([{**point, "kv_type": "f16", "kl": 0.02}, {**point, "kv_type": "f32", "onnx": "int4-32", "kl": 0.5}])
    assert c.kl_floor == pytest.approx(0.015) and c.kl_scale_for("int4-32") == pytest.approx(50.0)

def test_when_nothing_fits_the_full_models_closest_file_is_built_beside_a_narrower_ones():
    """The demo at 150 MB with a 33% narrower model: every file over the limit, the narrower ones closest, so all
    four built were narrower (KL 0.86-0.92) and the answer never said what the full model's closest file gives."""
    from edgetailor.engine.devices import Budget, get_device
    from edgetailor.engine.planner import Candidate, Point, Prediction, pick

    def point(size, width, memory, kl):
        return Point(Candidate(size, "q4_0", width=width), Prediction(size, 4.5, memory, 100.0, 0.01, kl, 1.0, 100.0),
                     feasible=False)

    points = [point(65, 0.33, 159e6, 0.9), point(67, 0.33, 161e6, 0.9), point(70, 0.33, 163e6, 0.89),
              point(80, 0.0, 175e6, 0.05), point(85, 0.0, 180e6, 0.03)]
    budget = Budget(get_device("pixel-8"), max_memory_bytes=150e6)
    chosen = pick(points, budget, 2, [])
    assert [(p.candidate.tensor_bytes, p.candidate.width) for p in chosen] == [(65, 0.33), (80, 0.0)]


def test_a_structures_kl_on_the_evaluation_text_is_fitted_apart_from_llama_cpps_floor():
    """A narrower model's KL measured on held-out calibration text (0.45) read 0.62 on the evaluation text (the
    demo, 25% of its MLP channels cut): its files fit a ratio of their own, and the whole model's floor and scale
    come from the whole model's files only (before, the narrow file's excess became a floor in every file)."""
    from edgetailor.engine.planner import Calibration, structure_key

    c = Calibration()
    point = {"kv_type": "f16", "memory_raw": 1.0, "decode_tps_raw": 1.0}
    c.refit([{**point, "cost": 0.01, "kl": 0.02},
             {**point, "cost": 0.02, "kl": 0.64, "width": 0.25, "structure_kl": 0.45}])
    assert c.kl_floor == pytest.approx(0.015) and c.kl_scale == pytest.approx(0.5)
    assert c.structure_scale[structure_key(0.25, 0)] == pytest.approx((0.64 - 0.015 - 0.01) / 0.45)
    assert structure_key(0.0, 2) not in c.structure_scale          # blocks removed: not measured yet (ratio 1)


@pytest.mark.parametrize("tie", [False, True])
def test_onnx_schemes_are_priced_on_the_grid_and_at_the_bytes_the_exporter_writes(tmp_path, stories_dir, tie):
    """The planner's ONNX prices: each scheme's bytes are the folder's (onnx_info reads what onnxruntime loads),
    and its int4 grid is the one onnxruntime's MatMulNBits quantizer writes (the same dequantized weights)."""
    import numpy as np
    import onnx
    from edgetailor.engine.lazy import LazyModel
    from edgetailor.engine.modeling import load_tokenizer
    from edgetailor.engine.planner import Predictor
    from edgetailor.engine.projection import onnx_info
    from edgetailor.engine.sources import resolve
    from edgetailor.exporters import get_exporter
    from edgetailor.exporters.gguf_calibrated import tensor_sources
    from edgetailor.exporters.gguf_plan import price_types
    from edgetailor.exporters.onnx_plan import SCHEMES
    from onnx import numpy_helper
    from types import SimpleNamespace

    folder = make_tiny_model(tmp_path / "m", "llama", stories_dir, seed=2, tie=tie, hidden_size=128,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    src = resolve(str(folder))
    model = LazyModel(src.path)
    sources = tensor_sources(model)
    flat = SimpleNamespace(output_grad_sq={}, input_sq={})            # unit weights: the plain squared error
    prices = price_types(sources, flat, onnx_schemes=list(SCHEMES.values()))
    planner = Predictor(prices, sources, model.config, 0, 1, None, None, 64, 16, None)
    for name, s in SCHEMES.items():
        out = tmp_path / name
        get_exporter("onnx").export(model, load_tokenizer(src), src.path, out, {**s.export_options(), "method": "rtn"})
        written = onnx_info(out)
        assert planner.onnx_weights_info(name).resident_bytes == pytest.approx(written.resident_bytes, rel=0.01), name
        assert planner.onnx_weights_info(name).bytes_per_token == pytest.approx(written.bytes_per_token, rel=0.01)
        if s.type != "int4":
            continue
        proto = onnx.load(str(out / "model.onnx"))
        init = {i.name: i for i in proto.graph.initializer}
        head = "token_embd.weight" if tie else "output.weight"
        for name, node in (("blk.0.ffn_down.weight", next(n for n in proto.graph.node if n.op_type == "MatMulNBits"
                                                          and "layers.0" in n.name and "down" in n.name)),
                           (head, next(n for n in proto.graph.node if "logits" in n.output))):
            bits = next(a.i for a in node.attribute if a.name == "bits")
            assert bits == s.bits_of(name, tie)
            packed, scales = numpy_helper.to_array(init[node.input[1]]), numpy_helper.to_array(init[node.input[2]])
            if bits == 4:
                q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(packed.shape[0], -1).astype(np.float32) - 8
            else:
                q = packed.reshape(packed.shape[0], -1).astype(np.float32) - 128
            ort = q * np.repeat(scales.reshape(packed.shape[0], -1), s.block_size, axis=1)
            W = sources[name].matrix()
            assert np.abs(s.dequantized(W, bits) - ort[:, :W.shape[1]]).max() <= 1e-6 * np.abs(W).max(), (name, bits)


def fit_cli(model, out, max_memory: str, *more: str, formats: str = "gguf"):
    """``edgetailor fit`` on a small plan: one f16 candidate, short calibration and evaluation."""
    return subprocess.run([sys.executable, "-m", "edgetailor", "fit", str(model), "--context", "256", "--kv-types", "f16",
                           "--candidates", "1", "--rounds", "1", "--trials", "8", "--max-sequences", "2", "--windows",
                           "2", "--ctx", "128", "--out", str(out), "--quiet", "--max-memory", max_memory,
                           "--formats", formats, *more], capture_output=True, text=True, timeout=900, env=os.environ)


def test_cli_fit_prints_the_plan_and_writes_the_recommended_bundle(kv_model, tmp_path):
    out = tmp_path / "bundle"                       # made by the command
    res = fit_cli(kv_model, out, "4GB")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Frontier (predicted" in res.stdout and "Recommended: fit-" in res.stdout
    # the decode-cost probes are loaded and saved by transformers, whose own bars would tear the CLI's progress
    assert "Loading weights" not in res.stderr and "Writing model shards" not in res.stderr, res.stderr[-2000:]
    bundles = list(out.iterdir())
    assert len(bundles) == 1 and any(f.suffix == ".gguf" for f in bundles[0].iterdir())
    card = (bundles[0] / "README.md").read_text()
    assert "-c 256" in card and "## Budget it was checked against" in card and "memory at most 4,000 MB" in card
    assert "None" not in card and "{'" not in card                      # no Python reprs in a model card
    assert "PARAMETER num_ctx 256" in (bundles[0] / "Modelfile").read_text()


def test_cli_fit_for_an_onnxruntime_app_recommends_an_onnx_folder_measured_at_the_apps_context(kv_model, tmp_path):
    """An app that runs onnxruntime: the search spans the ONNX schemes only; the recommended folder is built (GPTQ
    onto MatMulNBits), checked against the source, run in onnxruntime, its memory at the app's context is the
    measured peak plus the cache's growth to that context, and the bundle holds the folder."""
    out = tmp_path / "bundle"
    out.mkdir()
    res = fit_cli(kv_model, out, "4GB", "--onnx-schemes", "int4-32,int8", formats="onnx")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Recommended: fit-onnx-" in res.stdout and "onnx int4-32" in res.stdout and "onnx int8" in res.stdout
    bundle = next(out.iterdir())
    folder = next(p for p in bundle.iterdir() if p.is_dir())
    assert (folder / "model.onnx").exists() and (folder / "genai_config.json").exists()
    metrics = json.loads((bundle / "metrics.json").read_text())["variant"]
    assert metrics["format"] == "onnx" and metrics["params"]["runtime"] == "onnxruntime"
    m = metrics["metrics"]
    assert m["verify_kl"] >= 0 and m["kv_growth_bytes"] > 0
    assert m["memory_at_context_bytes"] == m["peak_rss_os_bytes"] + m["kv_growth_bytes"]
    assert abs(m["predicted_memory_error_pct"]) < 10


def test_a_candidate_that_fails_its_check_is_left_out_and_the_plan_goes_on(kv_model, monkeypatch):
    """An ONNX int8 folder whose activations' quantization costs more than its check allows (forced here with a
    bound no file meets) is not kept, its scheme leaves the search, and the plan recommends among the others."""
    from edgetailor.engine import JobSpec, run_job
    from edgetailor.engine import verification

    strict = verification.Tolerance(max_kl=1e-12, min_top1=1.0)
    real = verification.tolerance_for
    monkeypatch.setattr(verification, "tolerance_for",
                        lambda fmt, qtype: strict if (fmt, qtype) == ("onnx", "int8") else real(fmt, qtype))
    params = {**FIT, "formats": ["onnx"], "onnx_schemes": ["int8", "int4-32"], "max_drop_blocks": 0,
              "candidates": 2, "rounds": 3}
    rec = run_job(JobSpec(recipe={"name": "fit", "steps": [{"step": "fit", "params": params}]}, source=str(kv_model),
                          options={"threads": 2, "eval_windows": 2, "eval_ctx": 128}))
    assert rec.manifest["status"] == "succeeded", rec.manifest.get("error")
    plan = json.loads((rec.artifacts_dir / "plan.json").read_text())
    assert [r["onnx"] for r in plan["rejected"]] == ["int8"] and "KL" in plan["rejected"][0]["problem"]
    assert {m["onnx"] for m in plan["measured"]} == {"int4-32"}
    assert all(p["onnx"] != "int8" for p in plan["rounds"][-1]["points"])     # later searches leave it out
    assert not [p for p in rec.artifacts_dir.iterdir() if "int8" in p.name]    # nothing of it kept
    assert plan["recommendation"]["variant"].startswith("fit-onnx-int4-32")


def test_cli_fit_when_nothing_fits_says_which_limit_to_relax(kv_model, tmp_path):
    res = fit_cli(kv_model, tmp_path, "2MB")
    assert res.returncode == 3, res.stderr[-3000:]
    assert "Nothing fits." in res.stdout and "relax memory by" in res.stdout
    assert list(tmp_path.iterdir()) == []          # no bundle


def test_cli_fit_refuses_a_bad_memory_size_before_anything_runs(tmp_path):
    res = subprocess.run([sys.executable, "-m", "edgetailor", "fit", "demo", "--max-memory", "lots",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=120, env=os.environ)
    assert res.returncode == 2 and "not a memory size" in res.stderr and "Traceback" not in res.stderr
    nowhere = tmp_path / "missing" / "bundle"
    res = subprocess.run([sys.executable, "-m", "edgetailor", "fit", "demo", "--out", str(nowhere)],
                         capture_output=True, text=True, timeout=120, env=os.environ)
    assert res.returncode == 2 and "does not exist" in res.stderr and "Traceback" not in res.stderr
    assert not nowhere.parent.exists()


def test_gui_shows_the_search_live_and_opens_on_the_recommendation(fit_run, qapp):
    from edgetailor.ui.plots import LivePlots
    from edgetailor.ui.results import ResultsPanel
    from edgetailor.ui.run_state import RunState

    record, _ = fit_run
    st = RunState.from_folder(record.folder)
    assert st.plan["predicted"] and st.plan["measured"]
    plots = LivePlots()
    plots.show_state(st)
    items = plots.speed.getPlotItem().listDataItems()
    drawn = sum(len(i.getData()[0]) for i in items)
    assert drawn == len([p for p in st.plan["predicted"] if p["kl"] > 0]) + len(st.plan["measured"])
    # ONNX folders are squares, GGUF files circles, on the planes as in the search
    marks = [m for i in items for m in i.opts["symbol"]]
    assert marks.count("s") == len([p for p in st.plan["predicted"] if p["kl"] > 0 and p["onnx"]]) + len(
        [m for m in st.plan["measured"] if m["onnx"]]) > 0 and "o" in marks
    from edgetailor.ui.plots import _symbols

    assert _symbols([{"width": 0.33, "onnx": ""}, {"onnx": "int8", "width": 0.0}, {"width": 0.0}]) == ["t1", "s", "o"]
    panel = ResultsPanel()
    panel.set_variants(st.variant_rows(), None)
    panel.set_recommendation(st.recommendation)
    assert not panel.card.isHidden() and st.recommendation["variant"] in panel.card.title.text()
    assert panel.current() == st.recommendation["variant"]
    # the decision first, each column saying what it is; the recommended row marked
    from edgetailor.ui.results import COLUMNS
    from PySide6.QtCore import Qt

    assert [c[0] for c in COLUMNS[:3]] == ["Variant", "Fits", "Score"]
    score_tip = panel.model.headerData(2, Qt.Orientation.Horizontal, Qt.ItemDataRole.ToolTipRole)
    assert "P_c^1.5" in score_tip and "Lower is better" in score_tip
    row = next(r for r, v in enumerate(panel.model.rows) if v["name"] == st.recommendation["variant"])
    assert panel.model.index(row, 0).data() == "★ " + st.recommendation["variant"]
    device_col = [c[1] for c in COLUMNS].index("projected_decode_tps")
    assert panel.model.index(row, device_col).data(Qt.ItemDataRole.ToolTipRole).startswith("projected for ")
    # a screened file's quality is marked as an estimate, the recommended one's is not (scored on every window)
    kl_col = [c[1] for c in COLUMNS].index("kl")
    screened = [r for r, v in enumerate(panel.model.rows) if v["metrics"].get("screened_windows")]
    assert screened and all(panel.model.index(r, kl_col).data().startswith("≈ ") for r in screened)
    assert "estimated" in panel.model.index(screened[0], kl_col).data(Qt.ItemDataRole.ToolTipRole)
    assert not panel.model.index(row, kl_col).data().startswith("≈")
    asked = []
    panel.export_requested.connect(asked.append)
    panel.card.export_button.click()
    assert asked == [st.recommendation["variant"]]


def test_candidates_run_as_ray_tasks_with_the_same_results(kv_model):
    """A local Ray instance builds and measures a small plan's candidates; the files and their quality are those
    of the same plan built in this process."""
    from edgetailor.engine import JobSpec, run_job
    from edgetailor.engine.atomic import sha256_tree

    pytest.importorskip("ray")
    small = {**FIT, "rounds": 1, "kv_types": ["f16"]}
    runs = {}
    for how in ({"executor": "inline"}, {"executor": "ray", "ray_address": "local"}):
        rec = run_job(JobSpec(recipe={"name": "fit", "steps": [{"step": "fit", "params": {**small, **how}}]},
                              source=str(kv_model), options={"threads": 2, "eval_windows": 2, "eval_ctx": 128}))
        assert rec.manifest["status"] == "succeeded", rec.manifest.get("error")
        runs[how["executor"]] = rec
    got = {}
    for how, rec in runs.items():
        got[how] = {v["name"]: (sha256_tree(rec.folder / v["path"]), v["metrics"]["kl"], v["metrics"]["perplexity"])
                    for v in rec.manifest["variants"] if v["name"] != "baseline"}
    assert len(got["ray"]) == 2 and got["ray"] == got["inline"]
    plan = json.loads((runs["ray"].artifacts_dir / "plan.json").read_text())
    assert plan["recommendation"]["variant"] in got["ray"]


def test_a_candidate_without_blocks_is_written_from_the_files_and_checked_against_the_pruned_model(kv_model,
                                                                                                 tmp_path, stories_dir):
    """Depth pruning in the search: the pruned model is a view of the source's files (no copy), identical to
    pruning the loaded model, and its file is checked against it, evaluated and benchmarked."""
    import numpy as np
    import torch
    from edgetailor.engine.calibration import final_logprobs, token_sequences
    from edgetailor.engine.evaluate import ReferenceLogprobs, evaluate, make_windows
    from edgetailor.engine.lazy import LazyModel
    from edgetailor.engine.modeling import load_model, load_tokenizer
    from edgetailor.engine.plan_tasks import CandidateTask, build_candidate, save_verification
    from edgetailor.engine.runtimes import TorchRuntime
    from edgetailor.engine.sources import resolve
    from edgetailor.engine.steps.prune.structured import remove_blocks
    from edgetailor.engine.text import read_text
    from edgetailor.exporters.gguf_calibrated import tensor_sources

    src = resolve(str(stories_dir))
    seqs = token_sequences(load_tokenizer(src), read_text(None), 64, 2)
    lazy, loaded = LazyModel(src.path), load_model(src).model
    assert torch.equal(final_logprobs(lazy.without_blocks([1, 3]), seqs),
                       final_logprobs(remove_blocks(loaded, [1, 3]), seqs))

    src = resolve(str(kv_model))
    tok = load_tokenizer(src)
    pruned = LazyModel(src.path).without_blocks([0])
    types = {n: "Q8_0" for n in tensor_sources(pruned)}
    windows = make_windows(tok, read_text(None), 64, 2)
    ref = ReferenceLogprobs(tmp_path / "reference")
    evaluate(TorchRuntime(load_model(src).model), windows, reference=ref, record_reference=True)
    save_verification(tmp_path / "verify.npz", windows, [np.zeros((64, 8))] * 2)   # the full model's: not used
    task = CandidateTask(name="minus1", source=str(src.path), trust_remote_code=False, out=str(tmp_path / "m.gguf"),
                         types=types, file_type="Q8_0", method="gptq", sequences=seqs.tolist()[:2],
                         verify=str(tmp_path / "verify.npz"), eval_windows=windows, reference=str(ref.folder),
                         kv_types=["f16"], context=128, prompt=windows[0][:16], gen_tokens=4, repeats=1, threads=2,
                         drop_blocks=[0])
    res = build_candidate(task)
    assert res["agreement"]["verify_top1"] > 0.9            # the pruned model's own log-probs, not the source's
    import gguf

    assert gguf.GGUFReader(task.out).fields["llama.block_count"].contents() == 1
    assert res["measured"]["f16"]["evaluation"]["kl"] > 0.01   # a block is gone: far from the source


def test_a_speed_weight_buys_faster_kernels_at_the_same_size_and_reports_the_types_true_loss():
    """Under a speed limit the planner searches mixes whose types also pay for their measured kernel time: at the
    same bytes, a weighted plan swaps slow types for fast ones (Q5_K -> Q4_K, repacked here), decoding faster at a
    larger loss, and its predicted KL counts the types' loss alone."""
    from types import SimpleNamespace

    from edgetailor.engine.planner import Predictor
    from edgetailor.exporters.gguf_plan import TypePrices, _lower_hull, type_bytes

    shape = (1024, 1024)
    names = [f"blk.{i}.ffn_down.weight" for i in range(4)]
    # per tensor: Q4_K loses more than Q5_K, Q6_K least; the later blocks are more sensitive
    loss = {"Q4_K": 4.0, "Q5_K": 2.0, "Q6_K": 1.0}
    every = {n: sorted(((t, type_bytes(t, shape), (i + 1) * c) for t, c in loss.items()), key=lambda o: (o[1], o[2]))
             for i, n in enumerate(names)}
    prices = TypePrices({n: _lower_hull(o) for n, o in every.items()}, every)
    decode = {"layer_rates": {"Q4_K": 3e10, "Q5_K": 8e9, "Q6_K": 1e10}, "head_rates": {}}
    planner = Predictor(prices, {n: SimpleNamespace(shape=shape) for n in names}, None, 0, 4 * shape[0] * shape[1],
                        None, None, 256, 40, None, decode_model=decode)
    size = sum(type_bytes("Q5_K", shape) for _ in names)
    plain_types, plain_bytes, plain_cost = planner.plan(size)
    fast_types, fast_bytes, fast_cost = planner.plan(size, speed=3.0)
    assert "Q5_K" in plain_types.values() and fast_bytes <= size and plain_bytes <= size
    assert planner.kernel_seconds(fast_types) < 0.8 * planner.kernel_seconds(plain_types)
    assert fast_cost > plain_cost
    assert fast_cost == pytest.approx(sum(next(c for t, _, c in every[n] if t == fast_types[n]) for n in names))
    cand = planner.candidate(size, "f16", speed=3.0)
    assert cand.speed == 3.0 and "-fast3" in cand.label and cand.tensor_bytes == fast_bytes
    # weight 0 is the plain plan
    assert planner.plan(size, speed=0.0) == (plain_types, plain_bytes, plain_cost)


def test_before_its_own_kl_is_measured_an_8bit_cache_is_built_from_but_a_4bit_one_is_not():
    """Under a speed floor an f16 cache's extra time per token can leave only small files feasible: the first
    file may come from a q8_0 point (all its KV types are measured with it), never from an unmeasured q4_0 one."""
    from edgetailor.engine.planner import Calibration, Candidate, Point, Prediction, buildable

    def point(mb, kv, feasible):
        pred = Prediction(file_bytes=mb * 1e6, bits_per_weight=5.0, memory_bytes=2e8, decode_tps=100.0,
                          j_per_token=0.1, kl=0.1 / mb, ppl_increase_pct=1.0, decode_tps_here=100.0)
        return Point(Candidate(mb * 1e6, kv), pred, feasible)

    points = [point(78, "f16", True), point(116, "f16", False), point(116, "q8_0", True), point(120, "q4_0", True)]
    pool = buildable(points, Calibration().kv_kl)
    assert {(p.candidate.tensor_bytes, p.candidate.kv_type) for p in pool} == {(78e6, "f16"), (116e6, "f16"),
                                                                            (116e6, "q8_0")}
    measured = Calibration()
    measured.kv_kl["q4_0"] = 0.05
    assert len(buildable(points, measured.kv_kl)) == 4
    # nothing measured or tried fits: every point
    assert len(buildable([point(80, "q4_0", True), point(90, "f16", False)], Calibration().kv_kl)) == 2



def test_narrower_healed_models_are_searched_beside_the_full_one(kv_model):
    """Width pruning with healing in the search: each share of MLP channels removed is cut, healed, priced by its own
    sensitivities, and its files predicted beside the full model's: smaller, carrying its measured KL."""
    from edgetailor.engine import JobSpec, run_job
    from edgetailor.engine.planner import Candidate

    fit = {**FIT, "width_ratios": [0.5], "heal_steps": 12, "heal_minutes": 0, "candidates": 1, "rounds": 1,
           "formats": ["gguf"]}
    record = run_job(JobSpec(recipe={"name": "fit", "steps": [{"step": "fit", "params": fit}]}, source=str(kv_model),
                             options={"threads": 2, "eval_windows": 3, "eval_ctx": 128}))
    assert record.manifest["status"] == "succeeded", record.manifest.get("error")
    plan = json.loads((record.artifacts_dir / "plan.json").read_text())
    (narrow,) = plan["narrower"]
    assert narrow["width"] == 0.5 and narrow["intermediate_size"] == 128        # 256 channels, half cut
    points = plan["rounds"][0]["points"]
    assert {p["width"] for p in points} == {0.0, 0.5}
    thin = [p for p in points if p["width"] == 0.5]
    full = [p for p in points if p["width"] == 0.0 and not p["drop_blocks"]]
    assert max(p["file_bytes"] for p in thin) < max(p["file_bytes"] for p in full)
    assert min(p["file_bytes"] for p in thin) < min(p["file_bytes"] for p in full)
    assert min(p["kl"] for p in thin) >= narrow["heldout_kl"] > 0
    assert not (record.folder / "scratch").exists()                 # the narrower model went with the run's scratch
    assert Candidate(1, "f16", width=0.5).label.endswith("-mlp50pct-kv-f16")


def test_a_narrower_healed_model_is_written_once_and_its_file_checked_against_it(kv_model, tmp_path):
    """The narrower model heals (held-out KL falls), is written as a model folder, and a candidate built from it is
    checked against its own log-probs (not the source's: those given here are zeros) and scored against the
    source's."""
    import gguf
    import numpy as np
    from edgetailor.engine.calibration import token_sequences
    from edgetailor.engine.evaluate import ReferenceLogprobs, evaluate, make_windows
    from edgetailor.engine.lazy import LazyModel
    from edgetailor.engine.modeling import load_model, load_tokenizer
    from edgetailor.engine.narrowed import Healing, narrowed_model
    from edgetailor.engine.plan_tasks import CandidateTask, build_candidate, save_verification
    from edgetailor.engine.runtimes import TorchRuntime
    from edgetailor.engine.sources import resolve
    from edgetailor.engine.text import read_text
    from edgetailor.exporters.gguf_calibrated import tensor_sources

    src = resolve(str(kv_model))
    tok = load_tokenizer(src)
    text = read_text(None)
    seqs = token_sequences(tok, text, 64, 8)
    teacher = load_model(src).model
    n = narrowed_model(src.path, teacher, 0.25, seqs[:2], seqs[:6], seqs[6:], Healing(0, 20), tmp_path / "narrow")
    assert n.intermediate == 192 and n.kl < n.kl_before, n.to_dict()
    assert (n.folder / "tokenizer_config.json").exists() and not list(tmp_path.glob(".*partial*"))
    windows = make_windows(tok, text, 64, 2)
    ref = ReferenceLogprobs(tmp_path / "reference")
    evaluate(TorchRuntime(teacher), windows, reference=ref, record_reference=True)
    save_verification(tmp_path / "verify.npz", windows, [np.zeros((64, 8))] * 2)
    task = CandidateTask(name="narrow", source=str(n.folder), trust_remote_code=False, out=str(tmp_path / "n.gguf"),
                         types={k: "Q8_0" for k in tensor_sources(LazyModel(n.folder))}, file_type="Q8_0",
                         method="gptq", sequences=seqs.tolist()[:2], verify=str(tmp_path / "verify.npz"),
                         eval_windows=windows, reference=str(ref.folder), kv_types=["f16"], context=128,
                         prompt=windows[0][:16], gen_tokens=4, repeats=1, threads=2, narrowed=True)
    res = build_candidate(task)
    assert res["agreement"]["verify_top1"] > 0.9, res
    assert gguf.GGUFReader(task.out).fields["llama.feed_forward_length"].contents() == 192
    assert res["measured"]["f16"]["evaluation"]["kl"] > 0.01      # scored against the source (itself: ~0.0003)
