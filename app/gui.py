"""Entry point of the desktop app (``edgetailor-gui``)."""
from __future__ import annotations


def main() -> int:
    from edgetailor.ui.main_window import run_app

    return run_app()


if __name__ == "__main__":
    raise SystemExit(main())
