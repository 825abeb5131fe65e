"""Results of the selected run: a sortable table of every variant's measurements, and a Pareto scatter
(size against quality) where clicking a point selects that variant."""
from __future__ import annotations

import pyqtgraph as pg
from edgetailor.engine.scoring import pareto_front
from PySide6.QtCore import QAbstractTableModel, QModelIndex, QSortFilterProxyModel, Qt, Signal
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QFrame,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from .budget_panel import check_variant
from .common import DASH, FrozenColumnTable, fmt_bytes

SORT_ROLE = Qt.ItemDataRole.UserRole


def _num(fmt):
    return lambda v: DASH if v is None else fmt(v)


# (header, metric name or special key, formatter, what it is): the decision first (fits, score), then what the
# budget constrains, then the rest
COLUMNS = [
    ("Variant", "name", str, "The variant (★: the planner's recommendation)"),
    ("Fits", "fits", str, "Does it meet the budget? Memory, speed and energy on the chosen device (projected from "
                          "what was measured here), quality as measured here. The tooltip of a cell says why not."),
    ("Score", "opt_score", _num(lambda v: f"{v:.3f}"),
     "Optimization score (Wallace et al. 2025): P_c^1.5 x (alpha x T_c + beta x E_c), where P_c, T_c and E_c are "
     "the variant's perplexity, time per token and energy per token as ratios to the baseline's. Lower is better; "
     "the baseline scores 1."),
    ("Size", "size_bytes", fmt_bytes, "The file's size"),
    ("PPL +%", "ppl_increase_pct", _num(lambda v: f"{v:+.2f} %"), "Perplexity increase over the baseline, measured here"),
    ("KL", "kl", _num(lambda v: f"{v:.4f}"), "Mean KL divergence to the baseline's next-token distribution, measured here"),
    ("Tok/s device", "projected_decode_tps", _num(lambda v: f"{v:.1f}"),
     "Decode speed projected for the device the variant was benchmarked for (its profile's bandwidth and compute)"),
    ("Tok/s here", "decode_tps", _num(lambda v: f"{v:.1f}"), "Decode speed measured on this machine"),
    ("Peak memory", "peak_rss_bytes", fmt_bytes, "Peak memory measured here while it generated"),
    ("J/token", "energy_j_per_token", _num(lambda v: f"{v:.4f}"),
     "Energy per generated token here: measured where the machine has energy counters (RAPL, NVML), else "
     "estimated from CPU time x power (the cell's tooltip says which)"),
    ("Perplexity", "perplexity", _num(lambda v: f"{v:.3f}"), "Perplexity on the evaluation text, measured here"),
    ("TTFT", "ttft_seconds", _num(lambda v: f"{1000 * v:.0f} ms"), "Time to first token, measured here"),
    ("Format", "format", str, "The runtime it is for: gguf (llama.cpp, Ollama, LM Studio), onnx, torch"),
    ("Parameters", "parameters", _num(lambda v: f"{v / 1e6:.2f} M"), "Parameters of the model"),
]


#: figures a screened planner file estimates (scored on a few windows, the rest taken from the run's first file)
SCREENED_KEYS = ("ppl_increase_pct", "kl", "perplexity")


class ResultsModel(QAbstractTableModel):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.rows: list[dict] = []
        self.budget = None        # engine.devices.Budget

    def set_rows(self, variants: list[dict], budget) -> None:
        self.beginResetModel()
        self.rows = [dict(v) for v in variants]
        self.budget = budget
        self.endResetModel()

    def rowCount(self, parent=QModelIndex()):
        return 0 if parent.isValid() else len(self.rows)

    def columnCount(self, parent=QModelIndex()):
        return 0 if parent.isValid() else len(COLUMNS)

    def headerData(self, section, orientation, role=Qt.ItemDataRole.DisplayRole):
        if orientation == Qt.Orientation.Horizontal and role == Qt.ItemDataRole.DisplayRole:
            return COLUMNS[section][0]
        if orientation == Qt.Orientation.Horizontal and role == Qt.ItemDataRole.ToolTipRole:
            return COLUMNS[section][3]
        return None

    def value(self, row: int, key: str):
        v = self.rows[row]
        if key in ("name", "format"):
            return v.get(key)
        if key == "fits":
            return check_variant(self.budget, v.get("metrics", {}))
        return v.get("metrics", {}).get(key)

    def data(self, index, role=Qt.ItemDataRole.DisplayRole):
        if not index.isValid():
            return None
        _, key, fmt, _ = COLUMNS[index.column()]
        value = self.value(index.row(), key)
        if key == "fits":
            fits, why = value
            if role == Qt.ItemDataRole.DisplayRole:
                return {True: "✓ fits", False: "✗ " + why, None: DASH}[fits]
            if role == Qt.ItemDataRole.ToolTipRole:
                return why
            if role == SORT_ROLE:
                return {True: 2, None: 1, False: 0}[fits]
            return None
        metrics = self.rows[index.row()].get("metrics", {})
        if role == Qt.ItemDataRole.DisplayRole:
            if key == "name" and metrics.get("recommended"):
                return f"★ {value}"
            if key in SCREENED_KEYS and value is not None and metrics.get("screened_windows"):
                return f"≈ {fmt(value)}"
            return fmt(value) if value is not None else DASH
        if role == Qt.ItemDataRole.ToolTipRole:
            return self.tooltip(key, metrics)
        if role == SORT_ROLE:
            return value       # None (unmeasured) sorts last, see _Proxy
        if role == Qt.ItemDataRole.TextAlignmentRole and key not in ("name", "format"):
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        return None


    @staticmethod
    def tooltip(key: str, m: dict) -> str | None:
        """Where a figure comes from: measured here, projected for a device, or estimated."""
        if key == "projected_decode_tps" and m.get("projected_device"):
            return f"projected for {m['projected_device']}"
        if key == "energy_j_per_token" and "energy_measured" in m:
            return "measured here (energy counters)" if m["energy_measured"] else "estimated here (CPU time x power)"
        if key == "name" and m.get("recommended"):
            return "the planner's recommendation"
        if key in SCREENED_KEYS and m.get("screened_windows"):
            return (f"estimated: scored on {m['screened_windows']} evaluation windows, the rest taken from the run's "
                    "first file on the same windows (the planner scores a file on every window before it "
                    "recommends it)")
        return None


class _Proxy(QSortFilterProxyModel):
    def lessThan(self, left, right):
        a, b = left.data(SORT_ROLE), right.data(SORT_ROLE)
        if a is None or b is None:        # unmeasured cells sort last
            return a is not None and b is None
        try:
            return a < b
        except TypeError:
            return str(a) < str(b)


class RecommendationCard(QFrame):
    """What to ship, from the planner: the variant, why (each limit with its headroom), the runner-up for each
    relaxed limit, and one click to export its bundle."""
    export_requested = Signal(str)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setObjectName("recommendationCard")
        self.setFrameShape(QFrame.Shape.StyledPanel)
        self.variant: str | None = None
        self.title = QLabel()
        self.title.setObjectName("recommendationTitle")
        self.reason = QLabel()
        self.reason.setWordWrap(True)
        self.reason.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.export_button = QPushButton("Export this &bundle…")
        self.export_button.setObjectName("recommendationExport")
        top = QHBoxLayout()
        top.addWidget(self.title, 1)
        top.addWidget(self.export_button)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(8, 6, 8, 6)
        lay.addLayout(top)
        lay.addWidget(self.reason)
        self.export_button.clicked.connect(lambda: self.variant and self.export_requested.emit(self.variant))
        self.hide()

    def set_recommendation(self, rec: dict | None) -> None:
        if not rec:
            self.variant = None
            self.hide()
            return
        self.variant = rec.get("variant")
        self.export_button.setVisible(bool(self.variant))
        if self.variant:
            self.title.setText(f"<b>Ship {self.variant}</b>")
        else:
            self.title.setText(f"<b>Nothing built meets every limit</b> — closest: {rec.get('closest', DASH)}")
        lines = [p.strip() for p in _top_level_parts(rec.get("reason", "")) if p.strip()]
        lines += [f"Runner-up — {r['text']}" for r in (rec.get("runner_up") or {}).values()]
        if rec.get("shorter_context"):
            lines.append(f"Shorter context — {rec['shorter_context']['text']}")
        self.reason.setText("<br>".join(f"• {line}" for line in lines))
        self.show()


def _top_level_parts(text: str) -> list[str]:
    """``text`` cut at the semicolons outside parentheses (a closest candidate's figures stay in one line)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch == "(") - (ch == ")")
        if ch == ";" and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


class ResultsPanel(QWidget):
    variant_selected = Signal(str)
    export_requested = Signal(str)
    try_requested = Signal(str)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.model = ResultsModel(self)
        self.proxy = _Proxy(self)
        self.proxy.setSourceModel(self.model)
        self.proxy.setSortRole(SORT_ROLE)
        self.table = FrozenColumnTable()          # the variant's name stays in view as the figures scroll
        self.table.setObjectName("resultsTable")
        self.table.setAccessibleName("Results")
        self.table.setModel(self.proxy)
        self.table.setSortingEnabled(True)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.table.verticalHeader().setVisible(False)
        self.y_axis = QComboBox()
        self.y_axis.addItem("Perplexity", "perplexity")
        self.y_axis.addItem("KL divergence", "kl")
        self.y_axis.setAccessibleName("Pareto quality axis")
        self.export_button = QPushButton("&Export…")
        self.try_button = QPushButton("Tr&y it")
        self.summary = QLabel()
        self.scatter_plot = pg.PlotWidget(title="Size against quality (click a point)")
        self.scatter_plot.setLabel("bottom", "size", units="B")
        self.scatter_plot.showGrid(x=True, y=True, alpha=0.2)
        self.scatter = pg.ScatterPlotItem(size=12, hoverable=True, tip=self._tip)
        self.scatter.sigClicked.connect(self._point_clicked)
        self.scatter_plot.addItem(self.scatter)
        self.front_line = pg.PlotDataItem(pen=pg.mkPen(pg.intColor(1), width=1, style=Qt.PenStyle.DashLine))
        self.scatter_plot.addItem(self.front_line)

        bar = QHBoxLayout()
        bar.addWidget(self.summary, 1)
        bar.addWidget(QLabel("Quality axis:"))
        bar.addWidget(self.y_axis)
        bar.addWidget(self.try_button)
        bar.addWidget(self.export_button)
        self.card = RecommendationCard()
        self.card.export_requested.connect(self.export_requested)
        split = QSplitter(Qt.Orientation.Vertical)
        split.addWidget(self.table)
        split.addWidget(self.scatter_plot)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.card)
        lay.addLayout(bar)
        lay.addWidget(split)
        self.table.selectionModel().selectionChanged.connect(self._row_selected)
        self.y_axis.currentIndexChanged.connect(lambda _: self._draw_scatter())
        self.export_button.clicked.connect(lambda: self.current() and self.export_requested.emit(self.current()))
        self.try_button.clicked.connect(lambda: self.current() and self.try_requested.emit(self.current()))

    def set_variants(self, variants: list[dict], budget) -> None:
        keep = self.current()
        self.model.set_rows(variants, budget)
        self._draw_scatter()
        if keep:
            self.select(keep)
        measured = sum(1 for v in variants if v.get("metrics", {}).get("perplexity") is not None)
        self.summary.setText(f"{len(variants)} variants, {measured} evaluated")

    def set_recommendation(self, rec: dict | None) -> None:
        self.card.set_recommendation(rec)
        if rec and rec.get("variant") and not self.current():
            self.select(rec["variant"])

    def current(self) -> str | None:
        rows = self.table.selectionModel().selectedRows()
        if not rows:
            return None
        return self.model.rows[self.proxy.mapToSource(rows[0]).row()]["name"]

    def select(self, name: str) -> None:
        for r, v in enumerate(self.model.rows):
            if v["name"] == name:
                idx = self.proxy.mapFromSource(self.model.index(r, 0))
                self.table.selectRow(idx.row())
                self.table.scrollTo(idx)
                return

    def _row_selected(self, *_):
        name = self.current()
        if name:
            self._highlight(name)
            self.variant_selected.emit(name)

    def points(self) -> list[tuple[str, float, float]]:
        key = self.y_axis.currentData()
        out = []
        for v in self.model.rows:
            m = v.get("metrics", {})
            if m.get("size_bytes") is not None and m.get(key) is not None:
                out.append((v["name"], float(m["size_bytes"]), float(m[key])))
        return out

    def _tip(self, x: float, y: float, data) -> str:
        return f"{data}\n{fmt_bytes(x)}, {self.y_axis.currentText().lower()} {y:.4g}"

    def _draw_scatter(self) -> None:
        pts = self.points()
        self.scatter_plot.setLabel("left", self.y_axis.currentText())
        self.scatter.setData([{"pos": (x, y), "data": name, "brush": pg.intColor(i, hues=9)}
                              for i, (name, x, y) in enumerate(pts)])
        front = pareto_front({name: (x, y) for name, x, y in pts})
        xy = {name: (x, y) for name, x, y in pts}
        self.front_line.setData([xy[n][0] for n in front], [xy[n][1] for n in front])
        if self.current():
            self._highlight(self.current())

    def _highlight(self, name: str) -> None:
        for p in self.scatter.points():
            selected = p.data() == name
            p.setSize(18 if selected else 12)
            p.setPen(pg.mkPen(self.palette().text().color(), width=3) if selected else pg.mkPen(None))

    def _point_clicked(self, _item, points, *_):
        if points:
            self.select(points[0].data())
