"""The packaged desktop app as a user meets it: build the archive, unpack it elsewhere, start it with no terminal
(PATH=/usr/bin:/bin, a fresh data folder), time the first start (the engine set up offline from the archive's
wheels) until the main window appears, then the second start; sizes of the launcher, the wheels, the archive,
the installed engine; screenshots of the set-up window and the main window at 1024x700 on Xvfb's xcb.

    .venv/bin/python bench/packaged_app.py          # writes bench/results/packaged_app.{json,md}
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
SHOTS = REPO / "docs" / "screenshots"
MAIN_WINDOW = '"EdgeTailor": ("gui.py"'
SETUP_WINDOW = '"EdgeTailor: first start"'


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def build() -> dict:
    t0 = time.perf_counter()
    subprocess.run(["bash", "packaging/build_app.sh"], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    dist = REPO / "dist" / "EdgeTailor"
    archive = next((REPO / "dist").glob("EdgeTailor-*.tar.gz"))
    return {"build_seconds": round(time.perf_counter() - t0, 1), "archive": archive.name,
            "archive_mb": round(archive.stat().st_size / 1e6, 1), "unpacked_mb": round(du(dist) / 1e6, 1),
            "launcher_mb": round(du(dist / "_internal") / 1e6 + (dist / "EdgeTailor").stat().st_size / 1e6, 1),
            "wheels_mb": round(du(dist / "wheels") / 1e6, 1), "wheels": len(list((dist / "wheels").glob("*.whl")))}


def windows() -> str:
    return subprocess.run(["xwininfo", "-root", "-tree"], capture_output=True, text=True).stdout


def grab(path: Path) -> None:
    subprocess.run([sys.executable, "-c", "import sys; from PySide6.QtGui import QGuiApplication; "
                    "app = QGuiApplication(sys.argv[:1]); app.primaryScreen().grabWindow(0).save(sys.argv[1])",
                    str(path)], env={**os.environ, "QT_QPA_PLATFORM": "xcb"}, check=True, timeout=60)


def start(launcher: Path, env: dict, shot_setup: Path | None, shot_main: Path | None) -> dict:
    """Start the launcher as a desktop does; seconds until the set-up window (if any) and the main window."""
    t0 = time.monotonic()
    proc = subprocess.Popen([str(launcher)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(ln.decode("utf-8", "replace") for ln in proc.stdout),
                     daemon=True).start()
    seen: dict = {}
    try:
        while time.monotonic() - t0 < 1200 and proc.poll() is None and not any("error:" in ln for ln in lines):
            tree = windows()
            if SETUP_WINDOW in tree and "setup_window_s" not in seen:
                seen["setup_window_s"] = round(time.monotonic() - t0, 1)
            if shot_setup and "setup_window_s" in seen and time.monotonic() - t0 > seen["setup_window_s"] + 20:
                grab(shot_setup)
                shot_setup = None
            if MAIN_WINDOW in tree:
                seen["main_window_s"] = round(time.monotonic() - t0, 1)
                time.sleep(8)                             # the model card and device list fill in
                if shot_main:
                    grab(shot_main)
                break
            time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    seen["exited_early"] = "main_window_s" not in seen
    if seen["exited_early"]:
        seen["output_tail"] = "".join(lines)[-2000:]
    return seen


def starts(unpacked: Path, home: Path, out_json: Path) -> None:
    """Inside Xvfb: the first start (set-up) and a second one."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "QT_QPA_PLATFORM", "PYTHONPATH")}
    env.update(PATH="/usr/bin:/bin", XDG_DATA_HOME=str(home / "share"), EDGETAILOR_HOME=str(home / "data"))
    launcher = unpacked / "EdgeTailor" / "EdgeTailor"
    first = start(launcher, env, SHOTS / "first-start-setup-1024x700.png", SHOTS / "packaged-app-1024x700.png")
    second = start(launcher, env, None, None)
    engine = home / "share" / "edgetailor" / "engine"
    entry = home / "share" / "applications" / "edgetailor.desktop"
    env_python = next(engine.glob("*/bin/python"), None)
    llama_cpu = subprocess.run([str(env_python), "-c", "import llama_cpp; print(llama_cpp.llama_print_system_info()"
                                ".decode())"], capture_output=True, text=True).stdout.strip() if env_python else ""
    out_json.write_text(json.dumps({"first_start": first, "second_start": second, "engine_llama_cpu": llama_cpu,
                                    "engine_installed_mb": round(du(engine) / 1e6, 1),
                                    "menu_entry_exec": next((ln[5:] for ln in entry.read_text().splitlines()
                                                             if ln.startswith("Exec=")), None)
                                    if entry.exists() else None}))


def cpu_features(system_info: str) -> str:
    """The CPU instruction sets llama.cpp was built with, from its system info ("AVX2 = 1 | ...")."""
    cpu = system_info.split("CPU :")[-1].split("|")
    return " ".join(f.split("=")[0].strip() for f in cpu if f.strip().endswith("= 1")) or "—"


def report(result: dict) -> str:
    b, f, s, m = result["build"], result["first_start"], result["second_start"], result["machine"]
    return "\n".join([
        "# The packaged desktop app: size and first start",
        "",
        f"`python bench/packaged_app.py` on {m['cpu']}, {m['logical_cores']} cores, {m['ram_gb']} GB, "
        f"{m['platform']}; load average at start {m['load_average_at_start'][0]:.2f}. One run.",
        "",
        "| what | figure |", "|---|---:|",
        f"| build (`bash packaging/build_app.sh`, its portable llama.cpp wheel cached) | {b['build_seconds']} s |",
        f"| archive `{b['archive']}` | {b['archive_mb']} MB |",
        f"| unpacked | {b['unpacked_mb']} MB |",
        f"| of which the frozen launcher (Python + Qt widgets) | {b['launcher_mb']} MB |",
        f"| of which the engine's wheels ({b['wheels']}, incl. the demo model) | {b['wheels_mb']} MB |",
        f"| engine installed at first start (`~/.local/share/edgetailor/engine`) | {result['engine_installed_mb']} MB |",
        f"| first start: set-up window shown after | {f.get('setup_window_s', '—')} s |",
        f"| first start: main window shown after (engine set up offline) | {f.get('main_window_s', '—')} s |",
        f"| second start: main window shown after | {s.get('main_window_s', '—')} s |",
        f"| application-menu entry written by the first start, Exec | `{result['menu_entry_exec']}` |",
        f"| llama.cpp in the installed engine, CPU features | `{cpu_features(result.get('engine_llama_cpu', ''))}` |",
        "",
        "Started as a desktop starts it: no terminal, `PATH=/usr/bin:/bin`, a fresh `XDG_DATA_HOME` and data folder,",
        "on Xvfb's real xcb platform at 1024x700. Screenshots: `docs/screenshots/first-start-setup-1024x700.png`,",
        "`docs/screenshots/packaged-app-1024x700.png`.",
        "",
    ])


def main() -> None:
    if sys.argv[1:2] == ["--starts"]:
        starts(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
        return
    from machine import machine, write_results

    result = {"machine": machine(), "build": build()}
    with tempfile.TemporaryDirectory(prefix="edgetailor-packaged-") as tmp:
        tmp = Path(tmp)
        with tarfile.open(REPO / "dist" / result["build"]["archive"]) as tf:
            tf.extractall(tmp / "unpacked", filter="data")
        subprocess.run(["xvfb-run", "-a", "-s", "-screen 0 1024x700x24", sys.executable, __file__, "--starts",
                        str(tmp / "unpacked"), str(tmp / "home"), str(tmp / "starts.json")], check=True)
        result.update(json.loads((tmp / "starts.json").read_text()))
        shutil.rmtree(tmp / "home", ignore_errors=True)
    out = REPO / "bench" / "results"
    write_results(out / "packaged_app", result, report(result))
    print(report(result))


if __name__ == "__main__":
    main()
