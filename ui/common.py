"""Small shared pieces of the app: background tasks, friendly error dialogs, number formatting."""
from __future__ import annotations

from collections.abc import Callable

from edgetailor.engine.errors import EdgeTailorError
from PySide6.QtCore import QCoreApplication, QEvent, QObject, QRunnable, Qt, QThreadPool, Signal
from PySide6.QtWidgets import (
    QAbstractItemView,
    QAbstractSpinBox,
    QComboBox,
    QHeaderView,
    QMessageBox,
    QTableView,
    QWidget,
)

DASH = "—"


class _TaskSignals(QObject):
    done = Signal(object)
    failed = Signal(object)


class _Task(QRunnable):
    def __init__(self, fn: Callable[[], object]):
        super().__init__()
        self.fn = fn
        self.signals = _TaskSignals()

    def run(self) -> None:
        try:
            result = self.fn()
        except BaseException as exc:   # reported to the GUI thread, never lost
            self.signals.failed.emit(exc)
        else:
            self.signals.done.emit(result)


class Background:
    """Runs functions off the GUI thread; results come back as calls on the GUI thread."""

    def __init__(self, max_threads: int = 2):
        self.pool = QThreadPool()
        self.pool.setMaxThreadCount(max_threads)
        self._running: set[_Task] = set()

    def run(self, fn: Callable[[], object], on_done: Callable[[object], None],
            on_error: Callable[[BaseException], None]) -> None:
        task = _Task(fn)
        task.setAutoDelete(False)
        self._running.add(task)

        def finish(handler, value):
            self._running.discard(task)
            handler(value)

        task.signals.done.connect(lambda r: finish(on_done, r))
        task.signals.failed.connect(lambda e: finish(on_error, e))
        self.pool.start(task)

    def busy(self) -> bool:
        return bool(self._running)

    def wait(self, msecs: int = -1) -> bool:
        return self.pool.waitForDone(msecs)


def problem_and_fix(error) -> tuple[str, str]:
    """(problem, fix) from an EdgeTailorError, a run's error dict, or any exception (never a traceback)."""
    if isinstance(error, EdgeTailorError):
        return error.problem, error.fix
    if isinstance(error, dict):
        return error.get("problem") or "The run failed.", error.get("fix") or ""
    if isinstance(error, MemoryError):
        return "The machine ran out of memory.", "Close other programs or pick a smaller model."
    from edgetailor.engine.job import machine_error

    found = machine_error(error)        # a full disk, a folder that may not be written
    if found:
        return found["problem"], found["fix"]
    return f"{type(error).__name__}: {error}", "This is likely a bug in EdgeTailor; please report it."


def show_error(parent: QWidget, title: str, error) -> QMessageBox:
    """A non-blocking dialog naming the problem and the fix."""
    problem, fix = problem_and_fix(error)
    box = QMessageBox(QMessageBox.Icon.Warning, title, problem, QMessageBox.StandardButton.Ok, parent)
    if fix:
        box.setInformativeText(f"Fix: {fix}")
    box.setObjectName("errorBox")
    box.open()
    return box


def fmt_bytes(n) -> str:
    if n is None:
        return DASH
    n = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return DASH


def fmt_seconds(s) -> str:
    if s is None:
        return DASH
    s = int(round(s))
    return f"{s // 60}:{s % 60:02d}" if s >= 60 else f"{s} s"


#: a combo box never asks for more width than this (its entries are elided)
COMBO_MIN_WIDTH = 120


class WheelGuard(QObject):
    """Spin boxes and combo boxes take wheel events only when they have focus; otherwise the wheel scrolls the
    panel they sit in (``target``), so scrolling past a field never edits it."""

    def __init__(self, target: QWidget, parent=None):
        super().__init__(parent)
        self.target = target

    def guard(self, root: QWidget) -> None:
        for w in root.findChildren(QAbstractSpinBox) + root.findChildren(QComboBox):
            w.setFocusPolicy(Qt.FocusPolicy.StrongFocus)
            w.installEventFilter(self)
        for combo in root.findChildren(QComboBox):      # long entries (paths, device names) must not widen the panel
            combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
            combo.setMinimumContentsLength(10)
            combo.setMinimumWidth(COMBO_MIN_WIDTH)

    def eventFilter(self, obj, event) -> bool:
        if event.type() == QEvent.Type.Wheel and not obj.hasFocus():
            QCoreApplication.sendEvent(self.target, event)
            return True
        return False


class FrozenColumnTable(QTableView):
    """A table whose first column (the row's name) stays in view while the others scroll sideways: a second
    view over the same model and selection shows only that column, laid over the first (Qt's frozen-column
    example)."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.frozen = QTableView(self)
        self.frozen.setObjectName("frozenColumn")
        self.frozen.setFocusPolicy(Qt.FocusPolicy.NoFocus)
        self.frozen.verticalHeader().hide()
        self.frozen.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Fixed)
        self.frozen.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.frozen.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.frozen.setStyleSheet("QTableView { border: none; border-right: 1px solid palette(mid); }")
        self.viewport().stackUnder(self.frozen)
        for view in (self, self.frozen):
            view.setVerticalScrollMode(QAbstractItemView.ScrollMode.ScrollPerPixel)
        self.setHorizontalScrollMode(QAbstractItemView.ScrollMode.ScrollPerPixel)
        self.frozen.verticalScrollBar().valueChanged.connect(self.verticalScrollBar().setValue)
        self.verticalScrollBar().valueChanged.connect(self.frozen.verticalScrollBar().setValue)
        self.horizontalHeader().sectionResized.connect(self._section_resized)
        self.verticalHeader().sectionResized.connect(lambda i, _old, new: self.frozen.setRowHeight(i, new))
        self.frozen.horizontalHeader().sectionClicked.connect(self._frozen_header_clicked)

    def setModel(self, model) -> None:
        super().setModel(model)
        self.frozen.setModel(model)
        self.frozen.setSelectionModel(self.selectionModel())
        for signal in (model.modelReset, model.layoutChanged, model.columnsInserted):
            signal.connect(self._show_first_column_only)
        self._show_first_column_only()

    def setSelectionBehavior(self, behavior) -> None:
        super().setSelectionBehavior(behavior)
        self.frozen.setSelectionBehavior(behavior)

    def _show_first_column_only(self, *_) -> None:
        model = self.model()
        for c in range(model.columnCount() if model is not None else 0):
            self.frozen.setColumnHidden(c, c != 0)
        self.frozen.setColumnWidth(0, self.columnWidth(0))
        self._place()

    def _frozen_header_clicked(self, section: int) -> None:
        """Sort by the name column from the frozen header too, with the main header's indicator."""
        header = self.horizontalHeader()
        order = (Qt.SortOrder.DescendingOrder if header.sortIndicatorSection() == section
                 and header.sortIndicatorOrder() == Qt.SortOrder.AscendingOrder else Qt.SortOrder.AscendingOrder)
        self.sortByColumn(section, order)

    def _section_resized(self, index: int, _old: int, new: int) -> None:
        if index == 0:
            self.frozen.setColumnWidth(0, new)
            self._place()

    def resizeEvent(self, event) -> None:
        super().resizeEvent(event)
        self._place()

    def _place(self) -> None:
        self.frozen.setGeometry(self.verticalHeader().width() + self.frameWidth(), self.frameWidth(),
                                self.columnWidth(0), self.viewport().height() + self.horizontalHeader().height())
        self.frozen.horizontalHeader().setFixedHeight(self.horizontalHeader().height())
