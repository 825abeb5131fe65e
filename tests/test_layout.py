"""The repository layout and set-up the design card and README promise."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib
from conftest import REPO


def test_design_card_folders_exist():
    for name in ("app", "ui", "engine", "exporters", "assets", "tests", "packaging", "bench", "docs"):
        assert (REPO / name).is_dir(), name
    for f in ("pyproject.toml", "README.md", "docs/ARCHITECTURE.md", ".ci/run"):
        assert (REPO / f).is_file(), f


def test_every_python_folder_is_a_listed_package():
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = {v: k for k, v in cfg["package-dir"].items()}
    assert set(cfg["packages"]) == set(cfg["package-dir"])
    for top in ("app", "engine", "exporters", "ui", "assets"):
        for init in (REPO / top).rglob("__init__.py"):
            folder = str(init.parent.relative_to(REPO))
            assert folder in mapped, f"{folder} has an __init__.py but is not in pyproject's package-dir"


def test_one_namespace_in_site_packages():
    import edgetailor
    import edgetailor.engine
    import edgetailor.exporters

    assert Path(edgetailor.__file__).parent == REPO / "app"
    assert Path(edgetailor.engine.__file__).parent == REPO / "engine"
    site = Path(next(p for p in sys.path if p.endswith("site-packages")))
    ours = [p.name for p in site.iterdir() if "edgetailor" in p.name.lower()]
    assert ours, "edgetailor is not installed in the environment"
    for generic in ("app", "ui", "engine", "exporters", "assets"):
        assert not (site / generic).exists(), f"a generic '{generic}' package landed in site-packages"


def test_engine_has_no_qt_imports():
    for py in (REPO / "engine").rglob("*.py"):
        text = py.read_text()
        assert not re.search(r"^\s*(from|import)\s+(PySide6|PyQt|pyqtgraph)", text, re.M), py


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci/run").read_text()
    cmd = "bash packaging/setup.sh --dev && .venv/bin/python -m pytest -q"
    assert cmd in readme and cmd in ci
    assert "bash packaging/setup.sh && .venv/bin/edgetailor compress demo --preset gguf-ladder" in readme


def test_bundled_texts_are_large_enough():
    from edgetailor.engine.text import default_calibration_path, default_evaluation_path

    assert default_calibration_path().stat().st_size >= 30_000
    assert default_evaluation_path().stat().st_size >= 30_000


def test_every_step_lives_in_the_module_named_after_it():
    """A step "family.variant" is found in engine/steps/family.py (or the package engine/steps/family/)."""
    from edgetailor.engine.registry import all_steps

    for name, info in all_steps().items():
        parts = info.run.__module__.split(".")
        family = name.split(".")[0]
        assert family in (parts[-1], parts[-2]) and "steps" in parts, (name, info.run.__module__)


def test_the_architecture_map_names_every_module():
    """docs/ARCHITECTURE.md stays true: every product module is named in it (the steps by their folder and
    the rule that names their modules, checked above)."""
    doc = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    missing = [str(p.relative_to(REPO)) for folder in ("app", "ui", "engine", "exporters")
               for p in (REPO / folder).rglob("*.py")
               if p.name not in ("__main__.py", "__init__.py") and "steps" not in p.parts and p.name not in doc]
    assert not missing, missing


def test_no_function_in_product_code_is_over_60_lines_without_a_reason():
    """A long function says why in one line (``# long: ...``); the rest are short enough to read at once."""
    import ast

    unexplained = []
    for folder in ("engine", "exporters", "app", "ui"):
        for f in sorted((REPO / folder).rglob("*.py")):
            text = f.read_text(encoding="utf-8")
            lines = text.splitlines()
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and \
                        node.end_lineno - node.lineno + 1 > 60 and \
                        not any(ln.strip().startswith("# long: ") for ln in lines[node.lineno:node.end_lineno]):
                    unexplained.append(f"{f.relative_to(REPO)}:{node.lineno} {node.name}")
    assert unexplained == []
