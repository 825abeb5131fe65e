"""The one shape every exporter has.

An exporter turns an in-memory Hugging Face model (plus its tokenizer folder) into files a runtime loads,
then loads them back in that runtime before calling them done::

    result = get_exporter("gguf").export(model, tokenizer, tokenizer_dir, out_path, {"type": "Q4_K_M"})
    result.files   # what was written
    result.info    # what the user should know (type, size, tensors kept at higher precision, ...)

Exporters write into the path they are given; the caller (``RunContext.artifact``) makes that atomic.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


@dataclass
class ExportResult:
    path: Path                  # the file or folder a runtime opens
    files: list[Path]
    info: dict = field(default_factory=dict)


class Exporter(ABC):
    format: str = "?"           # variant format name, also the runtime that opens it
    runtimes: tuple[str, ...] = ()   # who can run the output, for the user
    suffix: str = ""            # the written file's ending ("" for a folder)

    @abstractmethod
    def export(self, model, tokenizer, tokenizer_dir: Path, out: Path, options: dict,
               progress: Callable[[float, str], None] | None = None,
               cancelled: Callable[[], bool] | None = None) -> ExportResult:
        """Write the model to ``out``; raise EdgeTailorError for anything the user can fix."""

    def check_options(self, options: dict) -> None:
        """Raise EdgeTailorError for a type or option this exporter cannot write (checked when the recipe is,
        before any model loads)."""

    @abstractmethod
    def verify(self, path: Path) -> dict:
        """Load ``path`` in the target runtime and run a forward pass; return what was checked."""
