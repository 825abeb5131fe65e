"""The machine a benchmark ran on, for its results file."""
from __future__ import annotations

import os
import platform


def machine() -> dict:
    """The CPU (its model name), its logical and usable cores, RAM, Python and the load when the run began."""
    import psutil
    from edgetailor.engine.devices import cpu_model, usable_cores

    return {"cpu": cpu_model(), "logical_cores": os.cpu_count(), "usable_cores": usable_cores(),
            "ram_gb": round(psutil.virtual_memory().total / 1e9, 1), "python": platform.python_version(),
            "platform": platform.platform(), "load_average_at_start": os.getloadavg()}

def write_results(stem, results: dict, markdown: str) -> None:
    """``<stem>.json`` and ``<stem>.md``, each written whole or not at all (``engine.atomic``): the one way every
    benchmark saves what it measured."""
    from pathlib import Path

    from edgetailor.engine.atomic import write_json, write_text

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    write_json(stem.with_name(stem.name + ".json"), results)
    write_text(stem.with_name(stem.name + ".md"), markdown.rstrip("\n") + "\n")
