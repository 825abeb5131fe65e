"""The edgetailor command as a user runs it: real subprocesses, real exit codes."""
from __future__ import annotations

import json
import subprocess
import sys

import yaml
from conftest import tiny_recipe


def cli(*args, env_home=None, timeout=600):
    import os

    env = dict(os.environ)
    return subprocess.run([sys.executable, "-m", "edgetailor", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_inspect(stories_dir):
    r = cli("inspect", str(stories_dir), "--preset", "quick")
    assert r.returncode == 0, r.stderr
    assert "llama" in r.stdout and "0.3 M" in r.stdout and "gguf" in r.stdout
    j = json.loads(cli("inspect", str(stories_dir), "--json").stdout)
    assert j["parameters"]["total"] == 260_032 and j["fits"]


def test_bad_input_exit_code_and_message():
    r = cli("inspect", "/nope/missing.gguf")
    assert r.returncode == 2
    assert "error:" in r.stderr and "fix:" in r.stderr and "Traceback" not in r.stderr
    r = cli("compress", "demo", "--preset", "no-such-preset")
    assert r.returncode == 2 and "gguf-ladder" in r.stderr


def test_compress_evaluate_and_list(stories_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(types=("Q8_0",))))
    runs = tmp_path / "runs"
    r = cli("compress", str(stories_dir), "--recipe", str(recipe), "--runs-dir", str(runs), "--quiet")
    assert r.returncode == 0, r.stderr
    assert "base-Q8_0" in r.stdout and "baseline" in r.stdout
    # each step's time and the worker's measured peak beside pre-flight's figure, as the run recorded them
    steps = [line for line in r.stdout.splitlines() if line.startswith("step ")]
    assert len(steps) == len(tiny_recipe(types=("Q8_0",))["steps"]), r.stdout
    assert all(", peak RAM " in line and "(pre-flight " in line for line in steps), steps
    r = cli("runs", "--runs-dir", str(runs))
    assert "succeeded" in r.stdout
    gguf_file = next(runs.rglob("*.gguf"))
    r = cli("evaluate", str(gguf_file), "--baseline", str(stories_dir), "--ctx", "128", "--windows", "2", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["perplexity"] > 1 and out["kl"] is not None and out["runtime"] == "llama.cpp"


def test_steps_and_presets_listed():
    assert "export" in cli("steps").stdout
    assert "gguf-ladder" in cli("presets").stdout
