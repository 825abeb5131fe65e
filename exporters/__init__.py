"""Exporters: one shape for every output format (see ``base.Exporter``)."""
from __future__ import annotations

import importlib

from .base import Exporter, ExportResult

_EXPORTERS: dict[str, Exporter] = {}
_MODULES = ("gguf", "onnx")   # each module registers itself; a missing optional one is skipped


def register_exporter(exporter: Exporter) -> Exporter:
    _EXPORTERS[exporter.format] = exporter
    return exporter


def all_exporters() -> dict[str, Exporter]:
    for m in _MODULES:
        try:
            importlib.import_module(f"{__name__}.{m}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{m}":
                raise
    return dict(_EXPORTERS)


def get_exporter(fmt: str) -> Exporter:
    from ..engine.errors import EdgeTailorError

    found = all_exporters()
    if fmt not in found:
        raise EdgeTailorError(f"There is no exporter for '{fmt}'.", f"Use one of: {', '.join(sorted(found))}.")
    return found[fmt]


__all__ = ["Exporter", "ExportResult", "register_exporter", "all_exporters", "get_exporter"]
