"""The run queue: live runs with their progress, time left and a cancel button, then previous runs."""
from __future__ import annotations

import html

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QAbstractItemView,
    QHeaderView,
    QLabel,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from .common import fmt_seconds
from .run_state import RunState

COLUMNS = ("Run", "Model", "Status", "Progress", "Time left", "")


class RunQueue(QWidget):
    selected = Signal(str)          # run id
    cancel_requested = Signal(str)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setObjectName("runTable")
        self.table.setAccessibleName("Runs")
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        for c in range(1, len(COLUMNS)):
            header.setSectionResizeMode(c, QHeaderView.ResizeMode.ResizeToContents)
        self.log = QPlainTextEdit()
        self.log.setReadOnly(True)
        self.log.setObjectName("runLog")
        self.log.setAccessibleName("Run log")
        self.detail = QLabel()
        self.detail.setWordWrap(True)
        self.detail.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        split = QSplitter(Qt.Orientation.Vertical)
        split.addWidget(self.table)
        bottom = QWidget()
        bl = QVBoxLayout(bottom)
        bl.setContentsMargins(0, 0, 0, 0)
        bl.addWidget(self.detail)
        bl.addWidget(self.log)
        split.addWidget(bottom)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(split)
        self.rows: dict[str, int] = {}
        self.states: dict[str, RunState] = {}
        self.table.itemSelectionChanged.connect(self._selection_changed)

    def add(self, state: RunState, live: bool, top: bool = True) -> None:
        row = 0 if top else self.table.rowCount()
        self.table.insertRow(row)
        self.rows = {rid: (r + 1 if r >= row else r) for rid, r in self.rows.items()}
        self.rows[state.run_id] = row
        self.states[state.run_id] = state
        self.table.setItem(row, 0, QTableWidgetItem(state.run_id))
        self.table.setItem(row, 1, QTableWidgetItem(state.source))
        self.table.setItem(row, 2, QTableWidgetItem(state.status))
        bar = QProgressBar()
        bar.setRange(0, 1000)
        bar.setAccessibleName("Progress")
        self.table.setCellWidget(row, 3, bar)
        self.table.setItem(row, 4, QTableWidgetItem(""))
        if live:
            button = QPushButton("Cancel")
            button.setObjectName(f"cancel-{state.run_id}")
            button.setAccessibleName(f"Cancel run {state.run_id}")
            button.clicked.connect(lambda _=False, rid=state.run_id: self.cancel_requested.emit(rid))
            self.table.setCellWidget(row, 5, button)
        self.update_run(state.run_id)

    def update_run(self, run_id: str) -> None:
        st, row = self.states[run_id], self.rows[run_id]
        status = st.status if st.finished else (f"{st.step_name or 'starting'}: {st.message}" if st.message
                                                 else st.step_name or "starting")
        self.table.item(row, 2).setText(status)
        self.table.item(row, 2).setToolTip(status)
        bar = self.table.cellWidget(row, 3)
        bar.setValue(int(1000 * st.fraction))
        bar.setFormat(f"{100 * st.fraction:.0f} %")
        self.table.item(row, 4).setText("" if st.finished else fmt_seconds(st.time_left()))
        if st.finished:
            button = self.table.cellWidget(row, 5)
            if button is not None:
                self.table.removeCellWidget(row, 5)
        if self.current() == run_id:
            self._show_detail(st)

    def append_log(self, run_id: str, line: str) -> None:
        if self.current() == run_id:
            self.log.appendPlainText(line)

    def select(self, run_id: str) -> None:
        if run_id in self.rows:
            self.table.selectRow(self.rows[run_id])

    def current(self) -> str | None:
        rows = self.table.selectionModel().selectedRows()
        if not rows:
            return None
        item = self.table.item(rows[0].row(), 0)
        return item.text() if item else None

    def _selection_changed(self) -> None:
        rid = self.current()
        if rid is None:
            return
        st = self.states[rid]
        self.log.setPlainText("\n".join(st.log))
        self._show_detail(st)
        self.selected.emit(rid)

    def _show_detail(self, st: RunState) -> None:
        e = html.escape
        text = (f"<b>{e(st.run_id)}</b> — {e(st.recipe_name)} on {e(st.source)}: {e(st.status)}, "
                f"{fmt_seconds(st.elapsed())}")
        if st.error and st.error.get("problem") and st.status != "cancelled":
            text += f"<br><b>⚠ {e(st.error['problem'])}</b>" + (f"<br>Fix: {e(st.error['fix'])}" if st.error.get("fix") else "")
        self.detail.setText(text)
