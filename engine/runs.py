"""Run records: each run is a folder with a manifest, its artifacts and its event log.

    <runs>/<run id>/
        manifest.json   recipe, source + hash, library versions, timings, metrics, artifacts with sha256
        events.jsonl    every event the run emitted (the GUI replays it after a restart)
        artifacts/      the variants' files, each written atomically

The manifest is rewritten atomically after every change; a cancelled or failed run is recorded as such,
and its partial files are removed.
"""
from __future__ import annotations

import json
import os
import platform
import secrets
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from . import atomic
from .errors import EdgeTailorError
from .paths import asset_path

STATUSES = ("running", "succeeded", "failed", "cancelled")
LIBRARIES = ("edgetailor", "torch", "transformers", "gguf", "llama_cpp_python", "onnx", "onnxruntime",
             "onnxruntime-genai", "numpy", "peft", "optuna")


@dataclass
class Variant:
    """One compressed (or baseline) model the run produced, with its measurements."""

    name: str
    format: str                 # "torch" | "gguf" | "onnx"
    path: str | None = None     # relative to the run folder; None for the in-memory baseline
    params: dict = field(default_factory=dict)    # quant type, sparsity, ...
    metrics: dict = field(default_factory=dict)   # perplexity, kl, size_bytes, decode_tps, ...
    parent: str | None = None   # the variant it was derived from
    steps: list = field(default_factory=list)     # transform steps applied before export

    def to_dict(self) -> dict:
        return asdict(self)


def library_versions() -> dict:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for lib in LIBRARIES:
        try:
            out[lib] = metadata.version(lib.replace("_", "-"))
        except metadata.PackageNotFoundError:
            continue
    return out


def new_run_id(recipe_name: str) -> str:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in recipe_name)[:40]
    return f"{stamp}-{safe}-{secrets.token_hex(2)}"


class RunRecord:
    def __init__(self, folder: Path, manifest: dict):
        self.folder = Path(folder)
        self.manifest = manifest

    @property
    def id(self) -> str:
        return self.manifest["id"]

    @property
    def artifacts_dir(self) -> Path:
        d = self.folder / "artifacts"
        d.mkdir(parents=True, exist_ok=True)
        return d

    @property
    def manifest_path(self) -> Path:
        return self.folder / "manifest.json"

    @classmethod
    def create(cls, root: Path, recipe: dict, source_spec: str, options: dict, run_id: str | None = None):
        run_id = run_id or new_run_id(recipe.get("name", "run"))
        folder = Path(root) / run_id
        folder.mkdir(parents=True, exist_ok=False)
        manifest = {
            "id": run_id, "status": "running", "created": _now(), "finished": None,
            "recipe": recipe, "source": {"spec": source_spec}, "options": options,
            "versions": library_versions(), "machine": machine_info(), "steps": [], "variants": [],
            "artifacts": [], "error": None, "timings": {},
        }
        rec = cls(folder, manifest)
        try:
            rec.save()
        except OSError:
            import shutil

            shutil.rmtree(folder, ignore_errors=True)      # no run folder without its record
            raise
        return rec

    @classmethod
    def open(cls, folder: Path) -> "RunRecord":
        p = Path(folder) / "manifest.json"
        return cls(Path(folder), read_manifest(p))

    def save(self) -> None:
        """Atomically; on a disk too full for a new file, in place, so that a run that fails for want of disk is
        still recorded as failed. The in place write never gives a block back (another program filling the disk
        would take it): the record is padded with spaces (valid JSON) to ``RECORD_SLACK`` past its text, so the
        failed status fits in blocks the file already holds; a longer record first reserves its blocks."""
        import errno

        data = (json.dumps(self.manifest, indent=2, default=str) + "\n").encode("utf-8")
        padded = data + b" " * (-(len(data) + RECORD_SLACK) % 4096 + RECORD_SLACK)
        try:
            atomic.write_bytes(self.manifest_path, padded)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or not self.manifest_path.is_file():
                raise
            _overwrite_in_place(self.manifest_path, data)

    # --- variants and artifacts ---------------------------------------------------------------
    def variant(self, name: str) -> dict | None:
        return next((v for v in self.manifest["variants"] if v["name"] == name), None)

    def upsert_variant(self, v: Variant | dict) -> dict:
        d = v.to_dict() if isinstance(v, Variant) else dict(v)
        old = self.variant(d["name"])
        if old is None:
            self.manifest["variants"].append(d)
        else:
            old.update(d)
            d = old
        self.save()
        return d

    def add_metrics(self, variant: str, metrics: dict) -> None:
        v = self.variant(variant)
        if v is None:
            raise KeyError(variant)
        v.setdefault("metrics", {}).update(metrics)
        self.save()

    def add_artifact(self, path: Path) -> dict:
        path = Path(path)
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        entry = {"path": str(path.relative_to(self.folder)), "bytes": atomic.tree_size(path),
                 "sha256": atomic.sha256_tree(path),
                 "files": [{"path": str(f.relative_to(self.folder)), "bytes": f.stat().st_size,
                            "sha256": atomic.sha256_file(f)} for f in files] if path.is_dir() else None}
        self.manifest["artifacts"] = [a for a in self.manifest["artifacts"] if a["path"] != entry["path"]]
        self.manifest["artifacts"].append(entry)
        self.save()
        return entry

    def finish(self, status: str, error: dict | None = None) -> None:
        assert status in STATUSES
        removed = atomic.remove_partials(self.folder)
        self.manifest["status"] = status
        self.manifest["finished"] = _now()
        self.manifest["error"] = error
        if removed:
            self.manifest.setdefault("cleanup", []).extend(str(p.relative_to(self.folder)) for p in removed)
        self.save()


#: bytes of spaces after a record's text, so that its final status can be written in place on a full disk
RECORD_SLACK = 2048


def _overwrite_in_place(path: Path, data: bytes) -> None:
    """``data`` over the file's old bytes, padded with spaces to the file's size; where it is longer, its blocks are
    reserved first (on ENOSPC the old record is left whole)."""
    with open(path, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        if len(data) > size:
            os.posix_fallocate(f.fileno(), 0, len(data))
        f.write(data + b" " * max(0, size - len(data)))
        f.flush()
        os.fsync(f.fileno())


#: keys every run record has, with their types (what the CLI and the GUI read without checking again)
MANIFEST_KEYS = {"id": str, "status": str, "created": str, "recipe": dict, "source": dict, "variants": list,
                 "steps": list}


def read_manifest(p: Path) -> dict:
    """A run record, checked: UTF-8 JSON, an object with the keys the app reads. Raises ``CorruptRecordError``."""
    try:
        m = json.loads(Path(p).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptRecordError(f"The run record {p} is unreadable ({type(exc).__name__}: {exc}).",
                                 f"Move or delete the folder {Path(p).parent}; other runs are not affected.") from exc
    if not isinstance(m, dict):
        m = {}
    wrong = [k for k, t in MANIFEST_KEYS.items() if not isinstance(m.get(k), t)]
    if wrong:
        raise CorruptRecordError(f"The run record {p} is not an EdgeTailor run record (missing or wrong: "
                                 f"{', '.join(wrong)}).",
                                 f"Move or delete the folder {Path(p).parent}; other runs are not affected.")
    return m


class CorruptRecordError(EdgeTailorError):
    """A run folder whose manifest cannot be read: listed apart, never fatal to the app."""


def list_runs(root: Path, unreadable: list | None = None) -> list[dict]:
    """Manifests of all runs below ``root``, newest first. Unreadable ones are skipped; their problems are
    appended to ``unreadable`` when given (so the CLI and the GUI can say which folders they skipped)."""
    out = []
    root = Path(root)
    if not root.is_dir():
        return out
    for d in root.iterdir():
        p = d / "manifest.json"
        if p.is_file():
            try:
                m = read_manifest(p)
            except CorruptRecordError as exc:
                if unreadable is not None:
                    unreadable.append(exc)
                continue
            m["_folder"] = str(d)
            out.append(m)
    return sorted(out, key=lambda m: m.get("created", ""), reverse=True)


def find_run(root: Path, run_id: str) -> RunRecord:
    folder = Path(root) / run_id
    if not (folder / "manifest.json").exists():
        matches = [m for m in list_runs(root) if m["id"].startswith(run_id)]
        if len(matches) != 1:
            raise EdgeTailorError(f"No single run matches '{run_id}'.", "List runs with: edgetailor runs")
        folder = Path(matches[0]["_folder"])
    return RunRecord.open(folder)


def machine_info() -> dict:
    import psutil

    return {"cpu": platform.processor() or platform.machine(), "cores_logical": os.cpu_count(),
            "cores_physical": psutil.cpu_count(logical=False), "ram_bytes": psutil.virtual_memory().total,
            "system": platform.system()}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def elapsed(t0: float) -> float:
    return round(time.perf_counter() - t0, 3)


def expected_step_seconds(root: str | Path, source_sha: str | None, steps: list[tuple[str, dict]],
                          limit: int = 200) -> list[float | None]:
    """What each step (name, params) took on this source in earlier runs here: the median of its succeeded runs,
    or None where there is none. Progress and the time left are weighted by these (the latest ``limit`` runs)."""
    from statistics import median

    found: list[list[float]] = [[] for _ in steps]
    try:
        folders = sorted((p for p in Path(root).iterdir() if p.is_dir()), reverse=True)[:limit]
    except OSError:
        folders = []
    for folder in folders:
        try:
            m = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
            if not source_sha or m["source"].get("sha256") != source_sha:
                continue
            done = [e for e in m["steps"] if e.get("status") == "succeeded" and e.get("seconds")]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue                                  # an unreadable record says nothing about times
        for entry in done:
            for i, (name, params) in enumerate(steps):
                if entry.get("name") == name and entry.get("params") == params:
                    found[i].append(float(entry["seconds"]))
    return [round(median(f), 3) if f else None for f in found]


STEP_PRIOR = "step_seconds.json"


def prior_step_seconds(steps: list[tuple[str, dict]]) -> list[float | None]:
    """What each step (name, params) took when ``bench/step_prior.py`` ran the presets on the demo model
    (``assets/step_seconds.json``; the same params first, else the step's median over them), or None for a step
    it never ran. Only their ratios mean anything elsewhere: a first run here weights its progress by them."""
    from statistics import median

    try:
        measured = json.loads(asset_path(STEP_PRIOR).read_text(encoding="utf-8"))["steps"]
    except (OSError, ValueError, KeyError, TypeError):
        return [None] * len(steps)
    out: list[float | None] = []
    for name, params in steps:
        same = [m["seconds"] for m in measured if m.get("name") == name and m.get("params") == params]
        named = [m["seconds"] for m in measured if m.get("name") == name]
        out.append(round(median(same or named), 3) if same or named else None)
    return out
