"""Fault injection, fast cases: bad input of every kind the CLI reads gets a message that names the problem and the
fix, in its own exit code, never a traceback, and nothing is left behind (no run folder for input that can be
checked before the model loads). Each case fails without the fix it names (see the issue's list)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from edgetailor.cli import EXIT_BAD_INPUT, EXIT_OK, EXIT_UNSUPPORTED, main


def _recipe(tmp: Path, steps: list) -> str:
    p = tmp / "recipe.json"
    p.write_text(json.dumps({"name": "fault", "steps": steps}))
    return str(p)


def _model(tmp: Path, files: dict) -> str:
    folder = tmp / "model"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(folder)


LLAMA = json.dumps({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "intermediate_size": 128, "vocab_size": 512})
EXPORT = [{"step": "export", "params": {"types": ["F16"]}}]

# name -> (argv builder (tmp, stories) -> list, exit code, words the message must hold)
# the model the user points at (also picked in the window: tests/test_gui_faults.py)
MODEL_CASES = {
    # model files
    "empty safetensors": (lambda t, s: ["inspect", _model(t, {"config.json": LLAMA, "model.safetensors": b""})],
                          EXIT_BAD_INPUT, "not a valid safetensors file"),
    "random bytes as safetensors": (lambda t, s: ["inspect", _model(t, {"config.json": LLAMA,
                                                                        "model.safetensors": os.urandom(4096)})],
                                    EXIT_BAD_INPUT, "not a valid safetensors file"),
    "safetensors cut short": (lambda t, s: ["inspect", _model(t, {"config.json": LLAMA, "model.safetensors":
                                                                  (s / "model.safetensors").read_bytes()[:2000]})],
                              EXIT_BAD_INPUT, "not a valid safetensors file"),
    "config is a list": (lambda t, s: ["inspect", _model(t, {"config.json": "[1, 2]"})],
                         EXIT_BAD_INPUT, "not a model configuration"),
    "config is not JSON": (lambda t, s: ["inspect", _model(t, {"config.json": "{bad"})],
                           EXIT_BAD_INPUT, "config.json"),
    "config is not UTF-8": (lambda t, s: ["inspect", _model(t, {"config.json": b"\xff\xfe{}"})],
                            EXIT_BAD_INPUT, "config.json"),
    "unsupported family": (lambda t, s: ["inspect", _model(t, {"config.json": json.dumps({"model_type": "rwkv7"})})],
                           EXIT_UNSUPPORTED, "not supported yet"),
    "path with a typo": (lambda t, s: ["inspect", str(s) + "-typo"], EXIT_BAD_INPUT, "Check the spelling"),
    "GGUF of random bytes": (lambda t, s: ["inspect", str(_write(t / "m.gguf", os.urandom(3000)))], EXIT_BAD_INPUT,
                             "not a GGUF file"),
    "GGUF empty": (lambda t, s: ["inspect", str(_write(t / "m.gguf", b""))], EXIT_BAD_INPUT, "is empty"),
    "GGUF cut short": (lambda t, s: ["inspect", str(_write(t / "m.gguf", b"GGUF\x03\x00\x00\x00"))], EXIT_BAD_INPUT,
                       "cut short"),
    "not a model file": (lambda t, s: ["inspect", str(_write(t / "notes.txt", b"hello"))], EXIT_BAD_INPUT,
                         "neither a model folder nor a .gguf"),
    "folder without config": (lambda t, s: ["inspect", str(t)], EXIT_BAD_INPUT, "has no config.json"),
    # tokenizers (read before any model loads)
    "tokenizer.json not JSON": (lambda t, s: ["inspect", _model(t, {**_weights(s), "tokenizer.json": "{bad"})],
                                EXIT_BAD_INPUT, "is not a tokenizer (JSON)"),
    "tokenizer.json a list": (lambda t, s: ["inspect", _model(t, {**_weights(s), "tokenizer.json": "[1]"})],
                              EXIT_BAD_INPUT, "not an object"),
    "tokenizer.json without a model": (lambda t, s: ["inspect", _model(t, {**_weights(s), "tokenizer.json": "{}"})],
                                       EXIT_BAD_INPUT, "no 'model' section"),
    "tokenizer.model garbage": (lambda t, s: ["inspect", _model(t, {**_weights(s), "tokenizer.model": b"garbage"})],
                                EXIT_BAD_INPUT, "not a SentencePiece tokenizer model"),
    "tokenizer config not UTF-8": (lambda t, s: ["inspect", _model(t, {**_weights(s), "tokenizer.model":
                                                                       (s / "tokenizer.model").read_bytes(),
                                                                       "tokenizer_config.json": b"\xff\xfe"})],
                                   EXIT_BAD_INPUT, "tokenizer configuration"),
}
CASES = {
    **MODEL_CASES,
    # recipes
    "recipe is a folder": (lambda t, s: ["compress", str(s), "--recipe", str(t)], EXIT_BAD_INPUT, "is a folder"),
    "recipe missing": (lambda t, s: ["compress", str(s), "--recipe", str(t / "nope.yaml")], EXIT_BAD_INPUT,
                       "does not exist"),
    "recipe not UTF-8": (lambda t, s: ["compress", str(s), "--recipe", str(_write(t / "r.yaml", b"\xff\xfe\x00"))],
                         EXIT_BAD_INPUT, "could not be parsed"),
    "recipe steps not a list": (lambda t, s: ["compress", str(s), "--recipe", str(_write(t / "r.yaml", b"steps: 5"))],
                                EXIT_BAD_INPUT, "non-empty 'steps' list"),
    "recipe is a list": (lambda t, s: ["compress", str(s), "--recipe", str(_write(t / "r.yaml", b"- a\n- b"))],
                         EXIT_BAD_INPUT, "non-empty 'steps' list"),
    "preset unknown": (lambda t, s: ["compress", str(s), "--preset", "nosuch"], EXIT_BAD_INPUT, "no preset named"),
    "recipe unknown step": (lambda t, s: ["compress", str(s), "--recipe", _recipe(t, [{"step": "quantize.magic"}])],
                            EXIT_BAD_INPUT, "no step named"),
    "recipe unknown export type": (lambda t, s: ["compress", str(s), "--recipe", _recipe(t, [
        {"step": "export", "params": {"types": ["Q9_Z"]}}])], EXIT_BAD_INPUT, "not a GGUF file type"),
    "recipe unknown format": (lambda t, s: ["compress", str(s), "--recipe", _recipe(t, [
        {"step": "export", "params": {"format": "tflite"}}])], EXIT_BAD_INPUT, "no exporter for 'tflite'"),
    "recipe unknown ONNX type": (lambda t, s: ["compress", str(s), "--recipe", _recipe(t, [
        {"step": "export", "params": {"format": "onnx", "types": ["int3"]}}])], EXIT_BAD_INPUT, "not an ONNX"),
    "recipe wrong parameter type": (lambda t, s: ["compress", str(s), "--recipe", _recipe(t, [
        {"step": "prune.magnitude", "params": {"sparsity": "lots"}}])], EXIT_BAD_INPUT, "sparsity"),
    "recipe unknown parameter": (lambda t, s: ["compress", str(s), "--recipe", _recipe(t, [
        {"step": "export", "params": {"typo": 1}}])], EXIT_BAD_INPUT, "no parameter 'typo'"),
    # job options
    "negative threads": (lambda t, s: ["compress", str(s), "--recipe", _recipe(t, EXPORT), "--threads", "-2"],
                         EXIT_BAD_INPUT, "threads"),
    "zero threads": (lambda t, s: ["compress", str(s), "--recipe", _recipe(t, EXPORT), "--threads", "0"],
                     EXIT_BAD_INPUT, "threads"),
    "recipe parameters not a mapping": (lambda t, s: ["compress", str(s), "--recipe", _recipe(t, [
        {"step": "export", "params": [1, 2]}])], EXIT_BAD_INPUT, "must be a mapping"),
    "recipe step not a mapping": (lambda t, s: ["compress", str(s), "--recipe", _recipe(t, [5])], EXIT_BAD_INPUT,
                                  "step"),
    "zero windows": (lambda t, s: ["compress", str(s), "--recipe", _recipe(t, EXPORT), "--windows", "0"],
                     EXIT_BAD_INPUT, "windows"),
    "negative context": (lambda t, s: ["compress", str(s), "--recipe", _recipe(t, EXPORT), "--ctx", "-5"],
                         EXIT_BAD_INPUT, "too short"),
    "missing calibration text": (lambda t, s: ["compress", str(s), "--recipe", _recipe(t, EXPORT),
                                               "--calibration-text", str(t / "nope.txt")],
                                 EXIT_BAD_INPUT, "does not exist"),
    "calibration text not UTF-8": (lambda t, s: ["compress", str(s), "--recipe", _recipe(t, EXPORT),
                                                  "--calibration-text", str(_write(t / "c.txt", b"\xff\xfe\x00x"))],
                                   EXIT_BAD_INPUT, "not UTF-8"),
    "calibration text empty": (lambda t, s: ["compress", str(s), "--recipe", _recipe(t, EXPORT),
                                             "--calibration-text", str(_write(t / "c.txt", b"  \n"))],
                               EXIT_BAD_INPUT, "is empty"),
    "evaluation text empty": (lambda t, s: ["compress", str(s), "--recipe", _recipe(t, EXPORT),
                                            "--eval-text", str(_write(t / "e.txt", b""))], EXIT_BAD_INPUT, "is empty"),
    "evaluate a missing file": (lambda t, s: ["evaluate", str(t / "nope.gguf")], EXIT_BAD_INPUT, "not a .gguf file"),
    "evaluate random bytes": (lambda t, s: ["evaluate", str(_write(t / "v.gguf", os.urandom(3000))), "--baseline",
                                            str(s)], EXIT_BAD_INPUT, "could not load"),
    "show an unknown run": (lambda t, s: ["runs", "nosuchrun"], EXIT_BAD_INPUT, "No single run matches"),
    "report an unknown run": (lambda t, s: ["report", "nosuchrun"], EXIT_BAD_INPUT, "No single run matches"),
    "evaluation text is a folder": (lambda t, s: ["compress", str(s), "--recipe", _recipe(t, EXPORT),
                                                  "--eval-text", str(t)], EXIT_BAD_INPUT, "is a folder"),
}


def _weights(stories: Path) -> dict:
    """A whole model's config and weights (stories260K), for cases about its other files."""
    return {"config.json": (stories / "config.json").read_bytes(),
            "model.safetensors": (stories / "model.safetensors").read_bytes()}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.fixture()
def home(tmp_path, monkeypatch):
    """A private data folder for the case (the CLI's --home sets the environment: restored afterwards)."""
    monkeypatch.setenv("EDGETAILOR_HOME", os.environ["EDGETAILOR_HOME"])
    h = tmp_path / "home"
    h.mkdir()
    return h


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_names_the_problem_and_the_fix_and_leaves_nothing(case, home, tmp_path, stories_dir, capsys):
    build, code, words = CASES[case]
    work = tmp_path / "work"
    work.mkdir()
    rc = main(["--home", str(home), *build(work, stories_dir)])
    err = capsys.readouterr().err
    assert rc == code, err
    assert words in err and "error: " in err and "fix: " in err, err
    assert "Traceback" not in err
    runs = home / "runs"
    assert not runs.exists() or not any(runs.iterdir())          # checked before any run folder was made


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_a_bad_model_to_compress_is_refused_before_a_run_folder_or_a_worker(case, home, tmp_path, stories_dir,
                                                                           capsys):
    build, code, words = MODEL_CASES[case]
    work = tmp_path / "work"
    work.mkdir()
    model = build(work, stories_dir)[1]
    rc = main(["--home", str(home), "compress", model, "--recipe", _recipe(tmp_path, EXPORT)])
    err = capsys.readouterr().err
    assert rc == code and words in err and "fix: " in err and "Traceback" not in err, err
    assert "run " not in err                                      # no worker was started
    runs = home / "runs"
    assert not runs.exists() or not any(runs.iterdir())


def test_the_data_folder_is_a_file_or_read_only(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EDGETAILOR_HOME", os.environ["EDGETAILOR_HOME"])
    a_file = tmp_path / "data"
    a_file.write_text("not a folder")
    assert main(["--home", str(a_file), "runs"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and "--home" in err and "Traceback" not in err
    if os.geteuid() == 0:
        return                      # root writes anywhere: the read-only case cannot happen here
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert main(["--home", str(ro), "runs"]) == EXIT_BAD_INPUT
        assert "cannot be created" in capsys.readouterr().err
    finally:
        ro.chmod(0o700)


@pytest.mark.parametrize("content", [b"\xff\xfe\x00 not utf-8", b"[1, 2, 3]", b'{"id": 5, "status": 7}', b""])
def test_a_corrupt_run_record_is_skipped_with_its_folder_named(content, home, capsys):
    from edgetailor.engine import RunRecord

    runs = home / "runs"
    good = RunRecord.create(runs, {"name": "ok", "steps": []}, "demo", {})
    good.finish("succeeded")
    bad = runs / "broken-run"
    bad.mkdir()
    (bad / "manifest.json").write_bytes(content)
    assert main(["--home", str(home), "runs"]) == EXIT_OK
    out = capsys.readouterr()
    assert good.id in out.out and "broken-run" not in out.out
    assert "skipped" in out.err and str(bad) in out.err and "Traceback" not in out.err


# --- process faults: a run's status is always true, and nothing is left behind ---------------------------------
CALIBRATED = [{"step": "quant.gguf_calibrated", "params": {"types": ["Q4_K_M"], "max_sequences": 4, "seq_len": 128,
                                                           "verify": False}}]


def _default_signals():
    """In the child before it runs: the signals it is sent act as they do for a process started from a terminal, however
    the test run itself was started (a shell's background job ignores SIGINT, ``nohup`` SIGHUP, and children inherit
    that)."""
    import signal

    for s in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(s, signal.SIG_DFL)


def _start_cli(tmp_path, demo_source, home, preexec=_default_signals):
    import subprocess
    import sys

    recipe = _recipe(tmp_path, CALIBRATED)
    env = {**os.environ, "EDGETAILOR_HOME": str(home)}
    proc = subprocess.Popen([sys.executable, "-m", "edgetailor.cli", "compress", str(demo_source.path), "--recipe", recipe,
                             "--threads", "1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, preexec_fn=preexec)
    return proc


def _wait_for(predicate, timeout=120.0):
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = predicate()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError("timed out")


def _running_step(home):
    from edgetailor.engine.runs import list_runs

    runs = list_runs(home / "runs")
    if runs and any(s.get("status") == "running" for s in runs[0]["steps"]):
        return runs[0]
    return None


def _final(home, run_id, timeout=90.0):
    from edgetailor.engine import RunRecord

    return _wait_for(lambda: (m := RunRecord.open(home / "runs" / run_id).manifest)["status"] != "running" and m,
                     timeout)


def _left_behind(folder: Path) -> list:
    return [p for p in folder.rglob("*") if p.name.endswith(".partial") or p.name.startswith("edgetailor-")
            or p.name == "scratch"]


@pytest.mark.parametrize("signal_name", ["SIGHUP", "SIGTERM", "SIGINT"])
def test_the_cli_closed_or_stopped_cancels_its_run_and_its_worker(signal_name, tmp_path, demo_source, home):
    import signal

    import psutil

    proc = _start_cli(tmp_path, demo_source, home)
    try:
        run = _wait_for(lambda: _running_step(home))
        workers = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(getattr(signal, signal_name))
        manifest = _final(home, run["id"])
        assert manifest["status"] == "cancelled"
        assert proc.wait(60) == 130
        psutil.wait_procs(workers, timeout=30)
        assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
        assert _left_behind(Path(run["_folder"])) == []
    finally:
        proc.kill()


def _ignoring_hangups():
    import signal

    _default_signals()
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def test_a_cli_started_with_nohup_runs_on_when_its_terminal_closes(tmp_path, demo_source, home):
    """``nohup edgetailor compress ...``: the hangup it was started ignoring is still ignored, the run succeeds."""
    import signal

    proc = _start_cli(tmp_path, demo_source, home, preexec=_ignoring_hangups)
    try:
        run = _wait_for(lambda: _running_step(home))
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(300) == 0, proc.stderr.read()[-2000:]
        assert _final(home, run["id"])["status"] == "succeeded"
    finally:
        proc.kill()


def test_a_killed_cli_takes_its_run_down_with_it(tmp_path, demo_source, home):
    """The worker sees its parent gone (kill -9 leaves no chance to cancel) and cancels the run itself."""
    import signal

    import psutil

    proc = _start_cli(tmp_path, demo_source, home)
    run = _wait_for(lambda: _running_step(home))
    workers = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    manifest = _final(home, run["id"])
    assert manifest["status"] == "cancelled"
    psutil.wait_procs(workers, timeout=60)
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
    assert _left_behind(Path(run["_folder"])) == []


def test_a_killed_worker_is_recorded_and_its_leftovers_swept(tmp_path, demo_source, home):
    import signal

    import psutil

    proc = _start_cli(tmp_path, demo_source, home)
    try:
        run = _wait_for(lambda: _running_step(home))
        folder = Path(run["_folder"])
        _wait_for(lambda: list(folder.glob("artifacts/edgetailor-calibrated-*")))     # mid-write
        for w in psutil.Process(proc.pid).children(recursive=True):
            if "multiprocessing" in " ".join(w.cmdline()):
                w.send_signal(signal.SIGKILL)
        assert proc.wait(60) == 1
        manifest = _final(home, run["id"], timeout=10)
        assert manifest["status"] == "failed" and "ended unexpectedly" in manifest["error"]["problem"]
        assert _left_behind(folder) == []
    finally:
        proc.kill()


# --- concurrency and leftovers of killed conversions -----------------------------------------------------------
@pytest.fixture(scope="module")
def stories_gguf(tmp_path_factory, stories_dir):
    from edgetailor.exporters import get_exporter
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("gguf") / "stories-f16.gguf"
    model = AutoModelForCausalLM.from_pretrained(str(stories_dir))
    get_exporter("gguf").export(model, AutoTokenizer.from_pretrained(str(stories_dir)), stories_dir, out,
                                {"type": "F16"})
    return out


def test_runs_that_share_a_new_gguf_source_convert_it_once_and_all_succeed(stories_gguf, tmp_path):
    import subprocess
    import sys

    home = tmp_path / "home"
    code = ("import sys; from edgetailor.engine import resolve; s = resolve(sys.argv[1]); "
            "import transformers; transformers.AutoConfig.from_pretrained(str(s.path)); print(s.path)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(stories_gguf)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "EDGETAILOR_HOME": str(home)})
             for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [o[1][-500:] for o in outs]
    assert len({o[0].strip() for o in outs}) == 1
    models = home / "models"
    assert [p.name for p in models.iterdir()] == [Path(outs[0][0].strip()).name]     # no partial, one folder


def test_a_conversion_killed_midway_is_swept_by_the_next_one(stories_gguf, home, monkeypatch):
    from edgetailor.engine import resolve

    monkeypatch.setenv("EDGETAILOR_HOME", str(home))
    models = home / "models"
    models.mkdir(parents=True)
    dead = models / ".gguf-stories-f16-abc.999999999.partial"        # a pid that cannot be running
    (dead / "sub").mkdir(parents=True)
    alive = models / f".other.{os.getpid()}.partial"                  # this process: in progress, kept
    alive.write_text("x")
    src = resolve(str(stories_gguf))
    assert (src.path / "config.json").exists()
    assert not dead.exists() and alive.exists()


@pytest.mark.parametrize("fault, kind, words", [
    (OSError(28, "No space left on device", "/data/runs/x/artifacts/m.gguf"), "DiskFull", "Free disk space"),
    (OSError(30, "Read-only file system", "/data/runs/x/artifacts/m.gguf"), "NotWritable", "--home"),
    (MemoryError(), "OutOfMemory", "smaller model"),
])
def test_a_full_disk_a_read_only_folder_or_no_memory_is_named_not_called_a_bug(fault, kind, words, stories_dir,
                                                                               tmp_path, monkeypatch):
    from edgetailor.engine.job import JobSpec, run_job
    from edgetailor.engine.registry import get_step

    def failing(ctx, cfg):
        raise fault
    monkeypatch.setattr(get_step("export"), "run", failing)
    rec = run_job(JobSpec(recipe={"name": "x", "steps": EXPORT}, source=str(stories_dir), runs_root=str(tmp_path)))
    err = rec.manifest["error"]
    assert rec.manifest["status"] == "failed" and err["type"] == kind and words in err["fix"]
    assert "bug" not in err["fix"] and "traceback" not in err


def test_the_app_with_a_data_folder_that_is_a_file_says_so_and_exits(tmp_path):
    import subprocess
    import sys

    a_file = tmp_path / "data"
    a_file.write_text("not a folder")
    r = subprocess.run([sys.executable, "-m", "edgetailor.gui"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "EDGETAILOR_HOME": str(a_file), "QT_QPA_PLATFORM": "offscreen"})
    assert r.returncode == EXIT_BAD_INPUT, r.stderr[-800:]
    assert "is a file, not a folder" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("content", [b"[1, 2]", b"{not json", b'{"id": "x"}', b"\xff\xfe"])
def test_a_broken_device_profile_of_the_user_is_skipped_and_named(content, home, capsys):
    (home / "devices").mkdir()
    (home / "devices" / "mine.json").write_bytes(content)
    assert main(["--home", str(home), "devices"]) == EXIT_OK
    out = capsys.readouterr()
    assert "raspberry-pi-5-8gb" in out.out                       # the bundled profiles still list
    assert "skipped: " in out.err and "mine.json" in out.err and "Traceback" not in out.err


def test_temporary_folders_of_killed_processes_are_swept_when_the_app_starts(tmp_path, home, monkeypatch):
    import tempfile

    from edgetailor.engine.atomic import temp_prefix

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = tmp_path / "edgetailor-bench-pid999999999-abc"            # a benchmark child killed mid-run
    (dead / "model").mkdir(parents=True)
    mine = Path(tempfile.mkdtemp(prefix=temp_prefix("onnx-int8")))      # this process: in use, kept
    other = tmp_path / "someone-elses-pid999999999-x"                   # not ours: never touched
    other.mkdir()
    assert main(["--home", str(home), "presets"]) == EXIT_OK
    assert not dead.exists() and mine.exists() and other.exists()


def test_a_distillation_killed_midway_resumes_from_its_last_checkpoint(tmp_path, stories_dir):
    """kill -9 of the worker during a long training step: the run is recorded as failed, its checkpoints stay
    (they are whole: written atomically), and a new run with ``resume_from`` goes on from the last one."""
    import signal

    from edgetailor.engine import JobSpec, start_job

    distill = {"seq_len": 128, "stride": 32, "batch_size": 2, "lr": 2e-3, "max_minutes": 0, "checkpoint_every": 5,
               "keep_checkpoints": 2}
    recipe = {"name": "kd", "steps": [{"step": "distill", "params": {**distill, "steps": 2000}}]}
    handle = start_job(JobSpec(recipe=recipe, source=str(stories_dir), options={"threads": 1},
                               runs_root=str(tmp_path / "runs")))
    checkpoints = handle.folder / "checkpoints"
    deadline = time.monotonic() + 240
    while len(list(checkpoints.glob("distill-step-*"))) < 2 and time.monotonic() < deadline:
        handle.poll(0.2)
    assert list(checkpoints.glob("distill-step-*")), "no checkpoint was written in time"
    os.kill(handle.pid, signal.SIGKILL)
    assert handle.wait() == "failed"
    manifest = json.loads((handle.folder / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "ended unexpectedly" in manifest["error"]["problem"]
    kept = sorted(checkpoints.iterdir())
    assert kept and all({f.name for f in c.iterdir()} == {"model.safetensors", "optimizer.pt", "state.json"}
                        for c in kept)
    last = int(kept[-1].name.rsplit("-", 1)[1])

    again = {"name": "kd", "steps": [{"step": "distill", "params": {**distill, "steps": last + 5,
                                                                     "resume_from": str(handle.folder)}}]}
    from edgetailor.engine import run_job

    resumed = run_job(JobSpec(recipe=again, source=str(stories_dir), options={"threads": 1},
                              runs_root=str(tmp_path / "runs")))
    assert resumed.manifest["status"] == "succeeded", resumed.manifest["error"]
    report = resumed.manifest["steps"][0]["report"]
    assert report["resumed_from_step"] == last and report["steps"] == last + 5


def test_a_run_on_a_model_without_a_tokenizer_stops_before_the_model_loads(tmp_path, stories_dir, home, capsys):
    """Pre-flight sizes a folder from its config and headers alone (a tokenizer is not needed to say what fits);
    a run needs one and says so before its run folder is made or its worker starts."""
    model = _model(tmp_path, _weights(stories_dir))
    assert main(["--home", str(home), "inspect", model]) == EXIT_OK
    rc = main(["--home", str(home), "compress", model, "--recipe", _recipe(tmp_path, EXPORT)])
    err = capsys.readouterr().err
    assert rc == EXIT_BAD_INPUT and "has no tokenizer" in err and "fix: " in err and "Traceback" not in err, err
    assert not (home / "runs").exists() or not any((home / "runs").iterdir())


GUI_WITH_A_RUN = """
import json, sys
from PySide6.QtWidgets import QApplication


def main():
    app = QApplication(sys.argv)
    from edgetailor.ui.main_window import MainWindow, configure_plots
    configure_plots(app)
    w = MainWindow(runs_root=sys.argv[1], job_options={"threads": 1}, model=sys.argv[2])
    w.show()
    run_id = w.controller.start(json.load(open(sys.argv[3])), sys.argv[2], {"threads": 1})
    print(run_id, flush=True)
    app.exec()


if __name__ == "__main__":        # the worker is spawned: it imports this file again
    main()
"""


@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGTERM", "SIGHUP"])
def test_a_gui_that_dies_or_is_closed_takes_its_run_down_with_it(signal_name, tmp_path, demo_source, home):
    """The window killed, terminated or its session closed mid-run: its worker sees it gone and cancels the run,
    which is recorded as cancelled with nothing left behind (runs never outlive their app)."""
    import signal
    import subprocess
    import sys

    import psutil

    script = tmp_path / "gui_with_a_run.py"
    script.write_text(GUI_WITH_A_RUN)
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"name": "fault", "steps": CALIBRATED}))
    env = {**os.environ, "EDGETAILOR_HOME": str(home), "QT_QPA_PLATFORM": "offscreen"}
    proc = subprocess.Popen([sys.executable, str(script), str(home / "runs"), str(demo_source.path), str(recipe)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=_default_signals)
    try:
        run_id = proc.stdout.readline().strip()
        assert run_id, proc.stderr.read()[-2000:]
        run = _wait_for(lambda: _running_step(home))
        assert run["id"] == run_id
        workers = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(getattr(signal, signal_name))
        proc.wait(120)                  # a generous bound: on a loaded 2-core machine Qt's teardown is slow
        manifest = _final(home, run_id)
        assert manifest["status"] == "cancelled", manifest.get("error")
        psutil.wait_procs(workers, timeout=60)
        assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
        assert _left_behind(Path(run["_folder"])) == []
    finally:
        proc.kill()
