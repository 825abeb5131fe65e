"""Runs: manifests, artifacts with sha256, worker events, cancel and crash leave no partial file."""
from __future__ import annotations

import json
import time

import pytest
from conftest import tiny_recipe
from edgetailor.engine import JobSpec, run_job, start_job
from edgetailor.engine.atomic import sha256_file
from edgetailor.engine.errors import EdgeTailorError


def test_run_in_process_records_everything(stories_dir, tmp_path):
    events = []
    rec = run_job(JobSpec(recipe=tiny_recipe(), source=str(stories_dir), runs_root=str(tmp_path)), emit=events.append)
    m = json.loads((rec.folder / "manifest.json").read_text())
    assert m["status"] == "succeeded", m["error"]
    assert m["source"]["sha256"] and m["versions"]["torch"] and m["versions"]["llama_cpp_python"]
    names = {v["name"] for v in m["variants"]}
    assert names == {"baseline", "base-F16", "base-Q4_K_M"}
    for v in m["variants"]:
        assert v["metrics"]["perplexity"] > 1
    f16 = next(v for v in m["variants"] if v["name"] == "base-F16")["metrics"]
    assert abs(f16["ppl_increase_pct"]) < 0.5 and f16["kl"] < 1e-3
    for a in m["artifacts"]:
        assert sha256_file(rec.folder / a["path"]) == a["sha256"]
    assert [s["status"] for s in m["steps"]] == ["succeeded", "succeeded"]
    types = {e["type"] for e in events}
    assert {"run_started", "step_started", "progress", "variant", "artifact", "metric", "run_finished"} <= types
    logged = (rec.folder / "events.jsonl").read_text().splitlines()
    assert len(logged) == len(events)
    assert not list(rec.folder.rglob("*.partial")) and not (rec.folder / "scratch").exists()


def test_bad_parameters_fail_before_any_work(stories_dir, tmp_path):
    import pytest
    from edgetailor.engine import EdgeTailorError

    with pytest.raises(EdgeTailorError):
        run_job(JobSpec(recipe={"name": "x", "steps": [{"step": "export", "params": {"types": []}}]},
                        source=str(stories_dir), runs_root=str(tmp_path)))
    assert not list(tmp_path.iterdir())


def test_failed_run_is_recorded(tmp_path, stories_dir):
    recipe = {"name": "x", "steps": [{"step": "export", "params": {"types": ["F16"]}},
                                     {"step": "prune.magnitude", "params": {"modules": ["no_such_proj"]}},
                                     {"step": "export", "params": {"types": ["Q8_0"]}}]}
    rec = run_job(JobSpec(recipe=recipe, source=str(stories_dir), runs_root=str(tmp_path)))
    assert rec.manifest["status"] == "failed"
    assert "no_such_proj" in rec.manifest["error"]["problem"]
    assert [p.name for p in (rec.folder / "artifacts").iterdir()] == ["stories260K-base-F16.gguf"]   # no partial
    # a type the exporter cannot write is refused with the recipe, before any run folder exists
    with pytest.raises(EdgeTailorError, match="importance matrix"):
        run_job(JobSpec(recipe={"name": "x", "steps": [{"step": "export", "params": {"types": ["IQ1_S"]}}]},
                        source=str(stories_dir), runs_root=str(tmp_path / "other")))
    assert not (tmp_path / "other").exists()


def _run_until(handle, predicate, timeout=120):
    t = time.monotonic()
    seen = []
    while time.monotonic() - t < timeout:
        for ev in handle.poll(0.2):
            seen.append(ev)
            if predicate(ev):
                return seen
    raise AssertionError("the event never came")


def test_worker_streams_events_and_cancels_cleanly(stories_dir, tmp_path):
    recipe = tiny_recipe(types=("F32", "F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K"), windows=8)
    handle = start_job(JobSpec(recipe=recipe, source=str(stories_dir), runs_root=str(tmp_path)))
    _run_until(handle, lambda ev: ev["type"] == "artifact")
    handle.cancel()
    status = handle.wait()
    assert status == "cancelled"
    m = json.loads((handle.folder / "manifest.json").read_text())
    assert m["status"] == "cancelled" and m["finished"]
    assert not list(handle.folder.rglob("*.partial"))
    on_disk = {str(p.relative_to(handle.folder)) for p in (handle.folder / "artifacts").iterdir()}
    assert on_disk == {a["path"] for a in m["artifacts"]}     # every file is a recorded, complete artifact


def test_worker_crash_is_recorded_as_failed(stories_dir, tmp_path):
    handle = start_job(JobSpec(recipe=tiny_recipe(windows=8), source=str(stories_dir), runs_root=str(tmp_path)))
    _run_until(handle, lambda ev: ev["type"] == "step_started")
    handle._proc.kill()                              # as the OOM killer would
    assert handle.wait() == "failed"
    m = json.loads((handle.folder / "manifest.json").read_text())
    assert m["status"] == "failed" and "ended unexpectedly" in m["error"]["problem"]
    assert not list(handle.folder.rglob("*.partial"))


def test_a_second_run_knows_what_its_steps_took_and_weights_progress_by_it(stories_dir, tmp_path):
    from edgetailor.ui.run_state import RunState

    recipe = tiny_recipe(types=("F16",))
    first = run_job(JobSpec(recipe=recipe, source=str(stories_dir), runs_root=str(tmp_path)))
    took = [s["seconds"] for s in first.manifest["steps"]]
    events = []
    run_job(JobSpec(recipe=recipe, source=str(stories_dir), runs_root=str(tmp_path)), emit=events.append)
    started = [e for e in events if e["type"] == "step_started"]
    assert started[0]["data"]["expected_seconds"] == pytest.approx(took, abs=1e-3)
    assert all(s > 0 for s in started[0]["data"]["prior_seconds"])   # the demo's steps of those names
    other = run_job(JobSpec(recipe=tiny_recipe(types=("Q8_0",)), source=str(stories_dir), runs_root=str(tmp_path)),
                    emit=events.append)
    other_started = next(e for e in events if e["type"] == "step_started" and e["run"] == other.id)
    assert other_started["data"]["expected_seconds"][0] is None     # other export types: not the same step

    st = RunState("r")
    st.apply(started[0])
    assert st.weights() == pytest.approx(took)


def test_progress_and_time_left_follow_the_steps_earlier_durations():
    from edgetailor.ui.run_state import RunState

    def ev(kind, t, **data):
        return {"type": kind, "run": "r", "t": t, "wall": 1000.0 + t, "step": "s", "data": data}

    st = RunState("r")
    st.apply(ev("run_started", 0.0, recipe={"name": "x"}, source="m"))
    st.apply(ev("step_started", 0.0, index=0, count=3, params={}, expected_seconds=[10.0, 80.0, 10.0]))
    st.apply(ev("progress", 5.0, fraction=1.0))
    assert st.fraction == pytest.approx(0.10)              # the quick first step is a tenth of the run, not a third
    st.apply(ev("step_started", 20.0, index=1, count=3, params={}, expected_seconds=[10.0, 80.0, 10.0]))
    st.apply(ev("progress", 30.0, fraction=0.5))
    assert st.fraction == pytest.approx(0.50)
    assert st.time_left() == pytest.approx((40 + 10) * 2.0)  # this run is half as fast as before
    plain = RunState("p")
    plain.apply(ev("step_started", 0.0, index=1, count=4, params={}, expected_seconds=[None] * 4))
    plain.apply(ev("progress", 1.0, fraction=0.5))
    assert plain.weights() is None and plain.fraction == pytest.approx(1.5 / 4)


def test_a_first_run_weights_its_progress_by_what_the_steps_took_on_the_demo():
    from edgetailor.engine.runs import prior_step_seconds
    from edgetailor.ui.run_state import RunState

    steps = [("export", {"format": "gguf", "types": ["Q8_0", "Q5_K_M", "Q4_K_M"]}), ("evaluate", {}),
             ("benchmark", {"decode_model": False}), ("no-such-step", {})]
    prior = prior_step_seconds(steps)
    assert all(p and p > 0 for p in prior[:3]) and prior[3] is None     # measured by bench/step_prior.py
    st = RunState("r")
    st.apply({"type": "step_started", "run": "r", "t": 0.0, "wall": 1000.0, "step": "export",
              "data": {"index": 1, "count": 4, "params": {}, "expected_seconds": [None] * 4, "prior_seconds": prior}})
    assert st.weights() is None                                         # nothing ran here before
    mean = sum(prior[:3]) / 3
    assert st.weights("any") == pytest.approx([*prior[:3], mean])
    assert st.fraction == pytest.approx(prior[0] / (sum(prior[:3]) + mean))
