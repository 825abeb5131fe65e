"""The main job on the bundled demo model: baseline, F16 and Q4_K_M GGUF, each evaluated."""
from __future__ import annotations

import pytest
from edgetailor.engine import JobSpec, run_job


@pytest.mark.slow
def test_demo_baseline_f16_q4km(demo_source, tmp_path):
    recipe = {"name": "demo-it", "steps": [
        {"step": "export", "params": {"types": ["F16", "Q4_K_M"]}},
        {"step": "evaluate", "params": {"windows": 4}},
    ]}
    rec = run_job(JobSpec(recipe=recipe, source="demo", runs_root=str(tmp_path)))
    m = rec.manifest
    assert m["status"] == "succeeded", m["error"]
    v = {x["name"]: x["metrics"] for x in m["variants"]}
    base, f16, q4 = v["baseline"], v["base-F16"], v["base-Q4_K_M"]
    assert 5 < base["perplexity"] < 100
    assert abs(f16["ppl_increase_pct"]) < 0.5                      # F16 within 0.5% of the torch baseline
    assert f16["kl"] < 0.002 and f16["top1"] > 0.97
    assert q4["size_bytes"] < 0.5 * f16["size_bytes"]
    assert q4["kl"] > f16["kl"]
