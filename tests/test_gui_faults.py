"""Fault injection in the window: every bad model the CLI's ``inspect`` refuses (``test_faults.MODEL_CASES``),
picked in a real window (offscreen), is named on the model card in the CLI's words; Run then says it in a dialog
with the fix and makes no run folder (the source is checked in the caller, ``sources.check_before_run``); the
window goes on."""
from __future__ import annotations

import html
import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest

pytest.importorskip("pytestqt")
from test_faults import MODEL_CASES
from test_gui import make_window


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_a_bad_model_is_named_on_the_card_and_run_refuses_it(case, qtbot, tmp_path, stories_dir, monkeypatch):
    build, _, words = MODEL_CASES[case]
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("EDGETAILOR_HOME", str(home))
    spec = build(work, stories_dir)[1]
    w = make_window(qtbot, home / "runs", stories_dir)
    qtbot.waitUntil(lambda: w.model_panel.report is not None, timeout=60_000)   # the good model first
    w.model_panel.set_spec(spec)
    card = w.model_panel.card
    qtbot.waitUntil(lambda: words in html.unescape(card.text()), timeout=60_000)
    assert "Traceback" not in card.text()
    w.run_recipe()
    box = w.last_error
    assert box is not None and box.informativeText().startswith("Fix: "), box.text()
    assert words in box.text() + box.informativeText(), box.text()
    runs = home / "runs"
    assert not runs.exists() or not any(runs.iterdir())          # refused before a run folder was made
    assert w.isVisible()


@pytest.mark.parametrize("content", [b"[1, 2]", b"{not json", b'{"id": "x"}', b"\xff\xfe"])
def test_a_broken_device_profile_of_the_user_is_named_in_the_status_bar(content, qtbot, tmp_path, stories_dir,
                                                                        monkeypatch):
    home = tmp_path / "home"
    (home / "devices").mkdir(parents=True)
    (home / "devices" / "mine.json").write_bytes(content)
    monkeypatch.setenv("EDGETAILOR_HOME", str(home))
    w = make_window(qtbot, home / "runs", stories_dir)
    assert "Skipped 1 device profile(s)" in w.status_label.text()
    assert str(home / "devices" / "mine.json") in w.status_label.toolTip()
    assert w.budget_panel.profile.count() >= 1                  # the bundled profiles still there
