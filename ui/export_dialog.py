"""Export one variant as a bundle: lists what the bundle will hold, then writes it where the user chose."""
from __future__ import annotations

import html
from pathlib import Path

from edgetailor.engine.bundle import BundlePlan, write_bundle
from PySide6.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
)

from .common import fmt_bytes, show_error


class ExportDialog(QDialog):
    def __init__(self, plan: BundlePlan, start_folder: str, parent=None):
        super().__init__(parent)
        self.setWindowTitle(f"Export {plan.variant['name']}")
        self.setObjectName("exportDialog")
        self.plan = plan
        self.written: Path | None = None
        self.last_error = None                    # the error box of the last failed save
        v = plan.variant
        intro = QLabel(f"<b>{html.escape(v['name'])}</b> ({html.escape(v['format'])}) is written as the folder "
                       f"<b>{html.escape(plan.folder_name)}</b>, holding:")
        intro.setWordWrap(True)
        self.contents = QTableWidget(len(plan.entries), 3)
        self.contents.setObjectName("bundleContents")
        self.contents.setAccessibleName("Bundle contents")
        self.contents.setHorizontalHeaderLabels(["File", "Size", "What it is"])
        self.contents.verticalHeader().setVisible(False)
        self.contents.horizontalHeader().setSectionResizeMode(2, QHeaderView.ResizeMode.Stretch)
        for r, e in enumerate(plan.entries):
            self.contents.setItem(r, 0, QTableWidgetItem(e.name))
            self.contents.setItem(r, 1, QTableWidgetItem(fmt_bytes(e.bytes)))
            self.contents.setItem(r, 2, QTableWidgetItem(e.description))
        self.contents.resizeColumnsToContents()
        self.folder = QLineEdit(start_folder)
        self.folder.setObjectName("exportFolder")
        self.folder.setAccessibleName("Export into folder")
        browse = QPushButton("&Browse…")
        browse.clicked.connect(self.browse)
        row = QHBoxLayout()
        row.addWidget(QLabel("Into &folder:"))
        row.addWidget(self.folder, 1)
        row.addWidget(browse)
        row.itemAt(0).widget().setBuddy(self.folder)
        self.total = QLabel(f"Total {fmt_bytes(plan.total_bytes)}")
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Save | QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self.save)
        buttons.rejected.connect(self.reject)
        lay = QVBoxLayout(self)
        lay.addWidget(intro)
        lay.addWidget(self.contents)
        lay.addWidget(self.total)
        lay.addLayout(row)
        lay.addWidget(buttons)
        self.resize(720, 320)

    def browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Export into folder", self.folder.text())
        if folder:
            self.folder.setText(folder)

    def save(self) -> None:
        try:
            self.written = write_bundle(self.plan, self.folder.text().strip())
        except Exception as exc:
            self.last_error = show_error(self, "Export failed", exc)
            return
        self.accept()
