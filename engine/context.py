"""What a step sees while it runs: the model, the texts, the run record, and ways to report."""
from __future__ import annotations

import contextlib
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from . import atomic, text
from .errors import RunCancelled
from .events import make_event
from .runs import RunRecord, Variant
from .sources import ResolvedSource

if TYPE_CHECKING:
    from .reference import ReferenceChoice


@dataclass
class JobOptions:
    """Settings shared by every step of a job (each step's own settings live in its config)."""

    eval_ctx: int = 512            # tokens per evaluation window
    eval_windows: int = 16         # windows evaluated (16 x 512 tokens: under a minute on the demo model)
    eval_text: str | None = None   # path; None = the bundled evaluation text
    calibration_text: str | None = None   # path; None = the bundled calibration text
    threads: int | None = None     # None = physical cores
    dtype: str = "float32"         # dtype the source is loaded in

    def __post_init__(self):
        """Checked when the job is made, before a run folder exists or the model loads."""
        from .errors import EdgeTailorError

        if self.eval_ctx < 8:
            raise EdgeTailorError(f"An evaluation context of {self.eval_ctx} tokens is too short.",
                                  "Use 64 tokens or more (--ctx).")
        if self.eval_windows < 1:
            raise EdgeTailorError(f"{self.eval_windows} evaluation windows evaluate nothing.",
                                  "Give 1 window or more (--windows); 16 is the default.")
        if self.threads is not None and self.threads < 1:
            raise EdgeTailorError(f"{self.threads} CPU threads cannot run anything.",
                                  "Give 1 thread or more (--threads), or leave it out for one per physical core.")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise EdgeTailorError(f"'{self.dtype}' is not a dtype the model can load in.",
                                  "Use float32, bfloat16 or float16.")
        for what, path in (("evaluation", self.eval_text), ("calibration", self.calibration_text)):
            if path is None:
                continue
            try:
                text.read_text(path)             # exists, a file, UTF-8, not empty
            except EdgeTailorError as exc:
                raise EdgeTailorError(f"The {what} text: {exc.problem}",
                                      f"{exc.fix} (--{'eval' if what == 'evaluation' else 'calibration'}-text)") from None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "JobOptions":
        from .registry import parse_config

        return parse_config(cls, d or {}, where="job options")

    def resolved_threads(self) -> int:
        if self.threads:
            return int(self.threads)
        import psutil

        return psutil.cpu_count(logical=False) or 1


@dataclass
class Held:
    """Something measured on the model as it stood after the transforms ``applied`` (stale after another)."""
    applied: tuple[str, ...]
    value: Any


@dataclass
class Scratch:
    """What a step leaves for later steps of the same run: one typed slot each."""
    imatrix: Held | None = None                       # ImatrixStats (with or without Hessians)
    verification: Held | None = None                  # (check windows, the model's log-probs on them)
    reference_choice: "ReferenceChoice | None" = None # the runtime that gives the run's reference logits


class RunContext:
    def __init__(self, record: RunRecord, source: ResolvedSource, options: JobOptions,
                 emit: Callable[[dict], None], cancel: threading.Event | None = None, t0: float | None = None):
        self.record = record
        self.source = source
        self.options = options
        self._emit = emit
        self.cancel = cancel or threading.Event()
        self.t0 = t0
        self.step_name: str | None = None
        self.applied: list[str] = []       # transform steps applied to the current model, in order
        self._loaded = None                # LoadedModel of the current (possibly transformed) model
        self._tokenizer = None             # the tokenizer alone, while the model is not loaded
        self._lazy = None                  # LazyModel of the untouched source (export-only steps)
        self._streamed = None              # LazyModel of the current model when transforms streamed it
        self._texts: dict[str, str] = {}
        self.scratch = Scratch()           # what steps leave for later steps (importance stats, references)

    # --- reporting -----------------------------------------------------------------------------
    @property
    def run_id(self) -> str:
        return self.record.id

    def emit(self, type_: str, **data) -> None:
        self._emit(make_event(type_, self.run_id, self.step_name, self.t0, **data))

    def progress(self, fraction: float, message: str = "") -> None:
        self.emit("progress", fraction=max(0.0, min(1.0, float(fraction))), message=message)

    def log(self, message: str, level: str = "info") -> None:
        self.emit("log", message=message, level=level)

    def sample(self, series: str, value: float, variant: str | None = None) -> None:
        self.emit("sample", series=series, value=value, variant=variant)

    def report(self, **data) -> None:
        """What the running step did (what it changed, what it measured): kept under ``report`` in the step's
        manifest entry (later calls add to it) and streamed as a log line of its short values."""
        steps = self.record.manifest.get("steps") or []
        if steps and steps[-1].get("name") == self.step_name:
            steps[-1].setdefault("report", {}).update(data)
            self.record.save()
        short = {k: v for k, v in data.items() if isinstance(v, (str, int, float, bool)) or v is None}
        self.emit("log", message=f"{self.step_name}: " + ", ".join(f"{k}={v}" for k, v in short.items()),
                  level="info", report=data)

    def mark_applied(self, label: str, weights=None) -> None:
        """The running transform changed the model: later variants are named after it, later steps see it.
        ``weights``: the new model as lazily read files (a streamed transform's result), else the loaded model was
        changed in place."""
        if weights is not None:
            self._streamed = weights
            self._drop_unread_scratch(weights)
        self.applied.append(label)

    def _drop_unread_scratch(self, weights) -> None:
        """Earlier transforms' scratch folders that no tensor of the model is read from any more (the disk back)."""
        import shutil

        read = {f.parent for t in weights.state_dict().values() for f in t.files}
        for folder in (self.record.folder / "scratch" / "weights").glob("*"):
            if folder not in read:
                shutil.rmtree(folder, ignore_errors=True)

    def hold(self, slot: str, value) -> None:
        """Keep ``value`` in the scratch slot, stamped with the transforms applied so far."""
        setattr(self.scratch, slot, Held(tuple(self.applied), value))

    def held(self, slot: str):
        """The slot's value if it was measured on the model as it stands now, else None."""
        held = getattr(self.scratch, slot)
        return held.value if held is not None and held.applied == tuple(self.applied) else None

    def check_cancelled(self) -> None:
        if self.cancel.is_set():
            raise RunCancelled()

    # --- the model -----------------------------------------------------------------------------
    @property
    def loaded(self):
        if self._loaded is None:
            from .modeling import LoadedModel, load_model

            self.log(f"Loading {self.source.display_name}")
            if self._streamed is not None:          # the source with what streamed transforms wrote in place
                import torch

                model = self._streamed.materialise(getattr(torch, self.options.dtype))
                self._loaded = LoadedModel(model, self.tokenizer, self.source)
                self._streamed = None
            else:
                self._loaded = load_model(self.source, self.options.dtype)
        return self._loaded

    @property
    def model(self):
        return self.loaded.model

    @model.setter
    def model(self, new_model) -> None:
        self.loaded.model = new_model

    @property
    def tokenizer(self):
        """The source's tokenizer; reading it does not load the model."""
        if self._loaded is not None:
            return self._loaded.tokenizer
        if self._tokenizer is None:
            from .modeling import load_tokenizer

            self._tokenizer = load_tokenizer(self.source)
        return self._tokenizer

    def weights(self):
        """The current model for writers and walkers: read lazily from files (``LazyModel``: the source's, with the
        blocks streamed transforms wrote in place; nothing in memory until a tensor's turn, no fp32 copy) unless a
        step loaded it whole, then the loaded model."""
        if self._loaded is not None:
            return self.model
        if self._streamed is not None:
            return self._streamed
        if self.applied:
            return self.model
        return self.source_weights()

    def source_weights(self):
        """The untouched source: its files read lazily, or the loaded source when it has no safetensors (or a step
        loaded it before any transform)."""
        from .lazy import LazyModel, can_read_lazily

        if (self._loaded is not None and not self.applied) or not can_read_lazily(self.source.path):
            return self.load_baseline().model
        if self._lazy is None:
            self._lazy = LazyModel(self.source.path, trust_remote_code=self.source.trust_remote_code)
        return self._lazy

    def tensor_store(self, weights):
        """Where the running transform writes the tensors it changed of ``weights`` (a lazy model): the run's
        scratch, one folder per transform."""
        from .lazy import TensorStore

        return TensorStore(self.record.folder / "scratch" / "weights" / f"{len(self.applied):02d}", weights)

    def transform_walk(self, sequences=None, **kwargs):
        """A ``BlockWalk`` for a transform over the current model: lazily, each block kept (``Block.keep``) is
        written to the run's scratch and becomes the model at ``mark_applied(label, walk.result())``; a loaded
        model is changed in place."""
        from .walker import BlockWalk, FusedNamesError

        model = self.weights()
        if getattr(model, "is_lazy", False):
            store = self.tensor_store(model)
            try:
                return BlockWalk(model, sequences, cancelled=self.cancel.is_set, progress=self.progress,
                                 store=store, **kwargs)
            except FusedNamesError as exc:
                self.log(f"{exc.problem} Loading it whole for this step.")
        return BlockWalk(self.model, sequences, cancelled=self.cancel.is_set, progress=self.progress, **kwargs)

    def load_baseline(self):
        """A fresh copy of the untouched source model (the reference every variant is compared with)."""
        from .modeling import load_model

        if not self.applied:
            return self.loaded          # loaded once and kept: the current model is the source
        return load_model(self.source, self.options.dtype)

    def current_variant_name(self, suffix: str = "") -> str:
        base = "+".join(self.applied) if self.applied else "base"
        return f"{base}-{suffix}" if suffix else base

    # --- texts ---------------------------------------------------------------------------------
    def calibration_text(self) -> str:
        if "calibration" not in self._texts:
            self._texts["calibration"] = text.read_text(self.options.calibration_text)
        return self._texts["calibration"]

    def eval_text(self) -> str:
        if "eval" not in self._texts:
            path = self.options.eval_text or text.default_evaluation_path()
            self._texts["eval"] = text.read_text(path)
        return self._texts["eval"]

    # --- outputs -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def artifact(self, name: str) -> Iterator[Path]:
        """Write an artifact (file or folder) atomically into the run; it is recorded with its sha256."""
        final = self.record.artifacts_dir / name
        with atomic.atomic_path(final) as tmp:
            yield tmp
            self.check_cancelled()
        entry = self.record.add_artifact(final)
        self.emit("artifact", **entry)

    def add_variant(self, variant: Variant) -> dict:
        d = self.record.upsert_variant(variant)
        self.emit("variant", **d)
        return d

    def add_metrics(self, variant: str, **metrics) -> None:
        self.record.add_metrics(variant, metrics)
        for k, v in metrics.items():
            self.emit("metric", variant=variant, name=k, value=v)

    def variant_path(self, variant: dict) -> Path | None:
        return self.record.folder / variant["path"] if variant.get("path") else None
