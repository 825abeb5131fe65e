"""Calibration and evaluation text: the project's own default text, or any UTF-8 file the user picks."""
from __future__ import annotations

from pathlib import Path

from . import paths
from .errors import EdgeTailorError

DEFAULT_CALIBRATION = "calibration.txt"
DEFAULT_EVALUATION = "evaluation.txt"


def default_calibration_path() -> Path:
    return paths.asset_path("text", DEFAULT_CALIBRATION)


def default_evaluation_path() -> Path:
    return paths.asset_path("text", DEFAULT_EVALUATION)


def read_text(path: str | Path | None) -> str:
    """Read a text file exactly as it is (no newline translation: tokenizers see the real bytes)."""
    p = Path(path) if path else default_calibration_path()
    if not p.exists():
        raise EdgeTailorError(f"The text file {p} does not exist.", "Pick an existing UTF-8 text file.")
    if p.is_dir():
        raise EdgeTailorError(f"{p} is a folder, not a text file.", "Pick a UTF-8 text file.")
    data = p.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EdgeTailorError(f"{p} is not UTF-8 text (byte {exc.start} cannot be decoded).",
                              "Save the file as UTF-8, or pick another text file.") from exc
    if not text.strip():
        raise EdgeTailorError(f"{p} is empty.", "Pick a text file with at least a few paragraphs of prose.")
    return text
