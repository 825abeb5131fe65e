"""Live plots of the selected run, fed by its events: memory over time, perplexity as windows are scored,
and decode speed and energy per variant as they are measured."""
from __future__ import annotations

import math

import pyqtgraph as pg
from PySide6.QtCore import QTimer
from PySide6.QtGui import QFontMetrics
from PySide6.QtWidgets import QGridLayout, QWidget

from .run_state import RunState

REFRESH_MS = 500      # plots redraw at most this often, however fast events arrive


class IntegerAxis(pg.AxisItem):
    """An axis that counts things (windows): ticks on whole numbers only."""

    def tickValues(self, minVal, maxVal, size):
        out = []
        for spacing, values in super().tickValues(minVal, maxVal, size):
            whole = [v for v in values if abs(v - round(v)) < 1e-9]
            if spacing >= 1 and whole:
                out.append((spacing, whole))
        return out or [(1, list(range(max(1, math.ceil(minVal)), int(maxVal) + 1)))]


def pen(i: int):
    return pg.mkPen(pg.intColor(i, hues=9, values=1, maxValue=220, minValue=150), width=2)


class LivePlots(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.state: RunState | None = None
        self.memory_limit: float | None = None
        self.memory = pg.PlotWidget(title="Memory over time")
        self.memory.setLabel("left", "RSS", units="B")
        self.memory.setLabel("bottom", "time (s)")         # seconds stay seconds (no "ks")
        self.memory.addLegend(offset=(5, 5))
        self.quality = pg.PlotWidget(title="Perplexity per window",
                                     axisItems={"bottom": IntegerAxis("bottom")})
        self.quality.setLabel("bottom", "window")
        self.quality.addLegend(offset=(5, 5))
        self.speed = pg.PlotWidget(title="Decode speed per variant (tokens/s)")
        self.energy = pg.PlotWidget(title="Energy per variant (J/token)")
        for w in (self.memory, self.quality, self.speed, self.energy):
            w.showGrid(x=True, y=True, alpha=0.2)
            w.setMinimumHeight(160)
        for w in (self.speed, self.energy):      # variant names as ticks: room for their descenders ('_')
            w.getAxis("bottom").setHeight(2 * QFontMetrics(w.font()).height() + 6)
        self.memory.setObjectName("memoryPlot")
        grid = QGridLayout(self)
        grid.addWidget(self.memory, 0, 0)
        grid.addWidget(self.quality, 0, 1)
        grid.addWidget(self.speed, 1, 0)
        grid.addWidget(self.energy, 1, 1)
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(REFRESH_MS)
        self._timer.timeout.connect(self.redraw)
        self.redraws = 0
        self._drawn_state: RunState | None = None
        self._curves: dict = {}
        self._colors: dict[str, int] = {}
        self._limit_line = None

    def _color(self, name: str) -> int:
        """One colour per variant (and for the worker process) across all four plots, in order of appearance."""
        return self._colors.setdefault(name, len(self._colors))

    def show_state(self, state: RunState | None) -> None:
        self.state = state
        self._drawn_state = None     # a different run: start from empty plots, each view following its data
        for w in (self.memory, self.quality, self.speed, self.energy):
            w.enableAutoRange()
        self.redraw()

    def set_memory_limit(self, limit_bytes: float | None) -> None:
        self.memory_limit = limit_bytes
        self.schedule()

    def schedule(self) -> None:
        """Ask for a redraw (coalesced: events may arrive hundreds of times a second)."""
        if not self._timer.isActive():
            self._timer.start()

    def redraw(self) -> None:
        """Update the curves in place (re-creating plot items on every update is what makes plots slow)."""
        self.redraws += 1
        st = self.state
        if st is not self._drawn_state:
            for w in (self.memory, self.quality, self.speed, self.energy):
                w.clear()
            self._curves = {}
            self._colors = {}
            self._limit_line = None
            self._drawn_state = st
        if st is None:
            return
        memory = {"worker process": st.worker_memory}
        memory.update({str(v or "run"): pts for v, pts in sorted(st.samples.get("rss_bytes", {}).items(),
                                                                  key=lambda kv: str(kv[0]))})
        for name, points in memory.items():
            if points:
                xs, ys = zip(*points)
                self._curve(self.memory, ("memory", name), name).setData(xs, ys)
        peak = max((v for pts in memory.values() for _, v in pts), default=0)
        # the budget is in view when it is near the curves; far above them it would flatten them: its label says so
        near = bool(self.memory_limit) and self.memory_limit <= 3 * max(peak, 1)
        if self._limit_line is not None and getattr(self._limit_line, "near", None) != near:
            self.memory.removeItem(self._limit_line)
            self._limit_line = None
        if self.memory_limit and self._limit_line is None:
            label = f"budget {self.memory_limit / 1e6:,.0f} MB" + ("" if near else " (above the curves)")
            self._limit_line = pg.InfiniteLine(self.memory_limit, angle=0, label=label,
                                               labelOpts={"position": 0.05, "anchors": [(0, 1), (0, 1)]},
                                               pen=pg.mkPen(pg.intColor(0), width=2, style=pg.QtCore.Qt.PenStyle.DashLine))
            self._limit_line.near = near
            self.memory.addItem(self._limit_line, ignoreBounds=not near)
        elif self._limit_line is not None:
            if self.memory_limit:
                self._limit_line.setValue(self.memory_limit)
            else:
                self.memory.removeItem(self._limit_line)
                self._limit_line = None
        for variant, points in sorted(st.samples.get("perplexity", {}).items(), key=lambda kv: str(kv[0])):
            ys = [v for _, v in points]
            self._curve(self.quality, ("ppl", str(variant)), str(variant), symbols=True).setData(
                list(range(1, len(ys) + 1)), ys)
        if st.plan["predicted"]:          # the planner's search: its planes instead of per-variant bars
            self._plan(self.speed, "memory_bytes", "Search: memory vs KL", "memory at the app's context", "B", "memory")
            self._plan(self.energy, "decode_tps", "Search: speed vs KL", "decode on the device", "tok/s", "speed")
        else:
            self._bars(self.speed, "decode_tps")
            self._bars(self.energy, "energy_j_per_token")

    def _plan(self, plot: pg.PlotWidget, xkey: str, title: str, xlabel: str, unit: str, limit: str) -> None:
        """Predicted points (hollow) and measured ones (filled) against KL (log scale), GGUF files as circles (a
        narrower model's as triangles) and ONNX folders as squares, the budget as a dashed line inside the view."""
        st = self.state
        key = ("plan", xkey)
        sig = (len(st.plan["predicted"]), len(st.plan["measured"]), id(st.plan["predicted"]))
        if self._curves.get(key) == sig:
            return
        self._curves[key] = sig
        plot.clear()
        plot.setTitle(title)
        plot.setLabel("bottom", xlabel, units=unit)
        plot.setLabel("left", "KL (○ predicted, ● built; □ ONNX, △ narrower)")
        plot.setLogMode(x=False, y=True)
        plot.getAxis("bottom").setTicks(None)
        pred = [p for p in st.plan["predicted"] if p.get(xkey) is not None and p.get("kl", 0) > 0]
        plot.getAxis("left").enableAutoSIPrefix(False)
        plot.plot([p[xkey] for p in pred], [p["kl"] for p in pred], pen=None, symbol=_symbols(pred), symbolSize=7,
                  symbolPen=pg.mkPen(pen(1).color()), symbolBrush=None)
        meas = [p for p in st.plan["measured"] if p.get(xkey) is not None and p.get("kl")]
        plot.plot([p[xkey] for p in meas], [p["kl"] for p in meas], pen=None, symbol=_symbols(meas), symbolSize=11,
                  symbolPen=None, symbolBrush=pen(4).color())
        b = st.plan.get("budget") or {}
        line = {"memory": b.get("max_memory_bytes"), "speed": b.get("min_decode_tps")}[limit]
        dash = pg.mkPen(pg.intColor(0), width=2, style=pg.QtCore.Qt.PenStyle.DashLine)
        xs = [p[xkey] for p in pred + meas]
        if line:
            plot.addItem(pg.InfiniteLine(line, angle=90, label="budget", labelOpts={"position": 0.9}, pen=dash))
            xs.append(line)
        if xs:
            plot.setXRange(min(xs), max(xs), padding=0.05)
        if b.get("max_kl"):
            plot.addItem(pg.InfiniteLine(math.log10(b["max_kl"]), angle=0, label="KL budget", pen=dash))

    def _curve(self, plot: pg.PlotWidget, key, name: str, symbols: bool = False):
        if key not in self._curves:
            i = self._color(name)
            kw = dict(symbol="o", symbolSize=5, symbolBrush=pen(i).color(), symbolPen=None) if symbols else {}
            self._curves[key] = plot.plot([], [], pen=pen(i), name=name, **kw)
        return self._curves[key]

    def _bars(self, plot: pg.PlotWidget, metric: str) -> None:
        rows = [(name, v["metrics"][metric]) for name, v in self.state.variants.items()
                if v.get("metrics", {}).get(metric) is not None]
        key = ("bars", metric)
        if self._curves.get(key) == rows:
            return
        self._curves[key] = rows
        plot.clear()
        if not rows:
            plot.getAxis("bottom").setTicks([[]])
            return
        xs = list(range(len(rows)))
        plot.addItem(pg.BarGraphItem(x=xs, height=[v for _, v in rows], width=0.6,
                                     brushes=[pen(self._color(name)).color() for name, _ in rows]))
        plot.getAxis("bottom").setTicks([[(x, name) for x, (name, _) in zip(xs, rows)]])

    def series_counts(self) -> dict[str, int]:
        """How many points each plot holds now (for tests and the status bar)."""
        st = self.state
        if st is None:
            return {}
        return {"memory": len(st.worker_memory) + sum(len(p) for p in st.samples.get("rss_bytes", {}).values()),
                "perplexity": sum(len(p) for p in st.samples.get("perplexity", {}).values()),
                "decode_tps": sum(1 for v in st.variants.values() if v.get("metrics", {}).get("decode_tps") is not None),
                "energy": sum(1 for v in st.variants.values()
                              if v.get("metrics", {}).get("energy_j_per_token") is not None)}


def _symbols(points: list[dict]) -> list[str]:
    """A planner point's marker: a circle for a GGUF file, a triangle for a narrower model's (MLP channels removed,
    healed), a square for an ONNX folder."""
    return ["s" if p.get("onnx") else "t1" if p.get("width") else "o" for p in points]
