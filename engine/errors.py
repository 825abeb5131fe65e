"""Errors the user can act on: each names the problem and the fix."""
from __future__ import annotations


class EdgeTailorError(Exception):
    """A problem with the user's input or environment, with the fix spelled out.

    The CLI prints ``problem`` and ``fix`` without a traceback; the GUI shows them in a dialog.
    """

    exit_code = 2

    def __init__(self, problem: str, fix: str = ""):
        super().__init__(problem)
        self.problem = problem
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.problem}\nFix: {self.fix}" if self.fix else self.problem

    def to_dict(self) -> dict:
        return {"type": type(self).__name__, "problem": self.problem, "fix": self.fix, "exit_code": self.exit_code}


class DoesNotFitError(EdgeTailorError):
    """The job needs more memory or disk than the machine has."""

    exit_code = 3


class UnsupportedModelError(EdgeTailorError):
    """A model family (architecture) that neither EdgeTailor nor its runtimes support yet."""

    exit_code = 4


class RunCancelled(Exception):
    """Raised inside a step when the user cancelled the run."""
