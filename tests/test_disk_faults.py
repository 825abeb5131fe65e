"""A real full or read-only disk under a run: the data folder and the temporary folder on a small tmpfs. Its bytes
swept below what a run writes (pre-flight refuses, naming the disk), its files (inodes) swept across the files a
run creates, so the disk fills at a different write each time: the run record, its event log, the source-hash
cache, the export's temporary folder, the artifacts, the temporary files. Each case: the run stops with the disk
named and the fix (its own exit code), no traceback, nothing half-written left behind, and the run's record true
(never "running"). Needs permission to mount a tmpfs (root, as in CI's containers); skipped otherwise."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from edgetailor.cli import EXIT_BAD_INPUT, EXIT_NO_FIT, EXIT_OK

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

RECIPE = {"name": "disk", "steps": [{"step": "export", "params": {"types": ["F16", "Q4_K_M"]}},
                                    {"step": "evaluate", "params": {"windows": 2}}]}
LEFTOVER = (".part", ".partial", ".tmp")


def _mount(folder: Path, size_kb: int, options: str = "") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k{options}", "tmpfs", str(folder)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {r.stderr.strip()}")


@pytest.fixture()
def small_disk(tmp_path):
    mounted: list[Path] = []

    def make(size_kb: int, options: str = "") -> Path:
        folder = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
        _mount(folder, size_kb, options)
        mounted.append(folder)
        return folder
    yield make
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def _compress(disk: Path, stories: Path, recipe: Path) -> subprocess.CompletedProcess:
    (disk / "tmp").mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(disk / "tmp"), "PYTHONWARNINGS": "ignore"}
    env.pop("EDGETAILOR_HOME", None)
    return subprocess.run([sys.executable, "-m", "edgetailor.cli", "--home", str(disk / "data"), "compress",
                           str(stories), "--recipe", str(recipe), "--quiet"],
                          capture_output=True, text=True, timeout=600, env=env)


def _used_kb(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) // 1024


def _records(data: Path) -> list[dict]:
    return [json.loads(m.read_text()) for m in (data / "runs").glob("*/manifest.json")]


def _leftovers(disk: Path) -> list[str]:
    """Half-written files and temporary folders (torch's own per-user compile cache, torchinductor_<user>, is not
    ours: torch keeps it between processes by design)."""
    return [str(p.relative_to(disk)) for p in disk.rglob("*")
            if p.name.endswith(LEFTOVER) or p.name == "scratch"
            or (p.parent.name == "tmp" and not p.name.startswith("torchinductor_"))]


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("disk-recipe") / "recipe.json"
    path.write_text(json.dumps(RECIPE))
    return path


@pytest.fixture(scope="module")
def run_kb(tmp_path_factory, stories_dir, recipe_file) -> int:
    """What a whole run of RECIPE writes (data folder and temporary files), measured once on a roomy disk."""
    disk = tmp_path_factory.mktemp("roomy")
    r = _compress(disk, stories_dir, recipe_file)
    assert r.returncode == EXIT_OK, r.stderr[-2000:]
    return _used_kb(disk)


@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.6, 0.9])
def test_a_disk_that_fills_during_a_run_stops_it_with_the_fix_and_leaves_nothing(fraction, run_kb, small_disk,
                                                                                 stories_dir, recipe_file):
    disk = small_disk(max(64, int(run_kb * fraction)))
    r = _compress(disk, stories_dir, recipe_file)
    said = r.stdout + r.stderr
    assert "Traceback" not in said, said[-3000:]
    assert r.returncode == EXIT_NO_FIT, (r.returncode, said[-2000:])
    assert "The disk is full" in said or "of disk" in said, said[-2000:]     # mid-run, or refused by pre-flight
    assert "--home" in said and "memory" not in said.lower(), said[-2000:]
    assert _leftovers(disk) == []
    assert all(m["status"] == "failed" for m in _records(disk / "data")), _records(disk / "data")


@pytest.mark.parametrize("files", [5, 6, 7, 8, 10, 12, 14, 15])
def test_a_disk_out_of_files_at_each_write_of_a_run_stops_it_with_the_fix_and_leaves_nothing(files, small_disk,
                                                                                          stories_dir, recipe_file):
    disk = small_disk(16384, f",nr_inodes={files}")
    r = _compress(disk, stories_dir, recipe_file)
    said = r.stdout + r.stderr
    assert "Traceback" not in said, said[-3000:]
    assert r.returncode == EXIT_NO_FIT and "The disk is full" in said and "--home" in said, (r.returncode,
                                                                                              said[-2000:])
    assert _leftovers(disk) == []
    assert all(m["status"] == "failed" for m in _records(disk / "data")), _records(disk / "data")


def _fill(disk: Path, leave_kb: int) -> None:
    """Another program takes the disk's bytes until only ``leave_kb`` are free."""
    ballast = disk / "ballast"
    try:
        fh = open(ballast, "wb", buffering=0)
    except OSError:                              # the run itself has already filled the disk
        return
    with fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
        except OSError:
            pass
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    os.truncate(ballast, max(0, ballast.stat().st_size - (leave_kb * 1024 - free)))


@pytest.mark.parametrize("after, leave_kb", [("events.jsonl", 0), ("events.jsonl", 128), ("events.jsonl", 384),
                                             ("artifacts/*-F16.gguf", 0), ("artifacts/*-F16.gguf", 128),
                                             ("artifacts/*-Q4_K_M.gguf", 0)])
def test_a_disk_another_program_fills_mid_run_stops_it_with_the_fix_and_leaves_nothing(after, leave_kb, run_kb,
                                                                                     small_disk, stories_dir,
                                                                                     recipe_file):
    """Pre-flight passed (the disk had room), then another program fills the disk while the run writes: as the
    run starts, after its first file, after its last file (the evaluation's reference windows still to write)."""
    import time

    disk = small_disk(run_kb * 4)
    (disk / "tmp").mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(disk / "tmp"), "PYTHONWARNINGS": "ignore"}
    env.pop("EDGETAILOR_HOME", None)
    proc = subprocess.Popen([sys.executable, "-m", "edgetailor.cli", "--home", str(disk / "data"), "compress",
                             str(stories_dir), "--recipe", str(recipe_file), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + 300
    while not list((disk / "data" / "runs").glob(f"*/{after}")) and time.monotonic() < deadline:
        time.sleep(0.05)
    _fill(disk, leave_kb)
    said = proc.communicate(timeout=600)[0]
    (disk / "ballast").unlink(missing_ok=True)
    assert "Traceback" not in said, said[-3000:]
    filled = "The disk is full" in said or "of disk" in said        # mid-write, or at the worker's own pre-flight
    assert proc.returncode == EXIT_NO_FIT and filled and "--home" in said, (proc.returncode, said[-2000:])
    assert _leftovers(disk) == []
    assert all(m["status"] == "failed" for m in _records(disk / "data")), _records(disk / "data")


def test_a_data_folder_on_a_read_only_disk_is_named_with_the_fix(small_disk, stories_dir, recipe_file):
    disk = small_disk(4096)
    (disk / "data").mkdir()
    (disk / "tmp").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    r = _compress(disk, stories_dir, recipe_file)
    said = r.stdout + r.stderr
    assert "Traceback" not in said, said[-3000:]
    assert r.returncode == EXIT_BAD_INPUT, (r.returncode, said[-2000:])
    assert "--home" in said


def test_the_models_cache_that_fills_while_converting_a_gguf_source_leaves_no_half_folder(small_disk, tmp_path):
    """A GGUF source is converted into the models cache: a disk that fills midway leaves no half-converted folder
    (the next run would take it for a model)."""
    from edgetailor.engine.sources import demo_gguf_path

    gguf = demo_gguf_path()
    disk = small_disk(int(gguf.stat().st_size // 1024 // 2))
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONWARNINGS": "ignore"}
    env.pop("EDGETAILOR_HOME", None)
    r = subprocess.run([sys.executable, "-m", "edgetailor.cli", "--home", str(disk / "data"), "inspect", str(gguf)],
                       capture_output=True, text=True, timeout=600, env=env)
    said = r.stdout + r.stderr
    assert "Traceback" not in said, said[-3000:]
    assert r.returncode == EXIT_NO_FIT and "disk" in said.lower(), (r.returncode, said[-2000:])
    assert _leftovers(disk) == []
    models = disk / "data" / "models"
    assert not models.exists() or not any(p.is_dir() for p in models.iterdir()), list(models.rglob("*"))[:10]
    shutil.rmtree(tmp_path, ignore_errors=True)


# --- the window, after it started: its export destination and the settings it keeps -------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, stories_dir) -> Path:
    """A run with one small variant to export (made on a roomy disk)."""
    disk = tmp_path_factory.mktemp("run-for-export")
    recipe = disk / "recipe.json"
    recipe.write_text(json.dumps({"name": "export", "steps": [{"step": "export", "params": {"types": ["F16"]}}]}))
    assert _compress(disk, stories_dir, recipe).returncode == EXIT_OK
    (run,) = (disk / "data" / "runs").iterdir()
    return run


def _export_into(qtbot, run: Path, folder: Path):
    from edgetailor.engine.bundle import plan_bundle
    from edgetailor.ui.export_dialog import ExportDialog

    dialog = ExportDialog(plan_bundle(run, "base-F16"), str(folder))
    qtbot.addWidget(dialog)
    dialog.show()
    dialog.save()
    return dialog


def test_exporting_into_a_read_only_folder_says_so_and_leaves_the_dialog_open(qtbot, small_disk, finished_run):
    disk = small_disk(4096)
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    dialog = _export_into(qtbot, finished_run, disk)
    assert dialog.written is None and dialog.isVisible()            # the user picks another folder and saves again
    said = dialog.last_error.text() + " " + dialog.last_error.informativeText()
    assert "may not write" in said and "Pick a folder you can write to" in said and "bug" not in said, said


def test_a_disk_that_fills_while_a_bundle_is_written_leaves_no_half_bundle(qtbot, small_disk, finished_run):
    disk = small_disk(16384, ",nr_inodes=3")                        # room for the bytes, not for every file
    dialog = _export_into(qtbot, finished_run, disk)
    said = dialog.last_error.text() + " " + dialog.last_error.informativeText()
    assert dialog.written is None and "filled up" in said and "another folder" in said, said
    assert list(disk.iterdir()) == []                                # nothing half-written left there


def test_settings_that_cannot_be_saved_are_said_in_the_status_bar(qtbot, small_disk, stories_dir, monkeypatch):
    """The data folder turns read-only after the window started: the settings it keeps cannot be written; the
    window says so (it does not lose them silently) and goes on."""
    from test_gui import make_window

    disk = small_disk(4096)
    monkeypatch.setenv("EDGETAILOR_HOME", str(disk / "home"))
    w = make_window(qtbot, disk / "home" / "runs", stories_dir)
    assert w.sync_settings() and w.settings_warning is None
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    w.budget_panel.set_profile("pixel-8")
    w.save_settings()
    assert w.settings_warning is not None and w.settings_warning.isVisible()
    assert "read-only or full" in w.settings_warning.toolTip() and "--home" in w.settings_warning.toolTip()


def test_a_run_record_is_written_failed_in_place_while_another_program_takes_every_freed_block(small_disk):
    """The disk is full and another program keeps writing: the record's final status still lands whole (it never
    gives a block back for the other program to take)."""
    import threading

    from edgetailor.engine.runs import RunRecord, read_manifest

    disk = small_disk(1024)
    rec = RunRecord.create(disk / "runs", {"name": "disk", "steps": []}, "stories", {})
    _fill(disk, 0)
    stop = threading.Event()

    def other_program():
        with open(disk / "ballast", "ab", buffering=0) as fh:
            while not stop.is_set():
                try:
                    fh.write(b"\0" * 4096)
                except OSError:
                    pass

    taker = threading.Thread(target=other_program)
    taker.start()
    try:
        for i in range(200):
            rec.finish("failed", {"type": "DiskFull", "message": "The disk is full " * (i % 3)})
            assert read_manifest(rec.manifest_path)["status"] == "failed"
    finally:
        stop.set()
        taker.join()
