"""Stand-ins for Slicer's Qt widgets (qMRML*, ctk*) so BiomedSeg.ui loads with PySide6 alone.

Each stand-in has the class name the .ui names and looks enough like the real widget for
the panel screenshot: a collapsible section draws its header bar with an arrow, node
selectors are combo boxes, path editors are a line edit with a browse button. Properties
the .ui sets that a stand-in does not declare (nodeTypes, noneEnabled, ...) become
dynamic properties, so tests can read them back.
"""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtCore import Property, QFile, QRect, Qt  # noqa: E402
from PySide6.QtGui import QPainter, QPalette  # noqa: E402
from PySide6.QtUiTools import QUiLoader  # noqa: E402
from PySide6.QtWidgets import (QApplication, QComboBox, QHBoxLayout, QLineEdit, QStyle,  # noqa: E402
                               QStyleOptionButton, QToolButton, QWidget)

ROOT = Path(__file__).resolve().parents[1]
UI_FILE = ROOT / "BiomedSeg" / "Resources" / "UI" / "BiomedSeg.ui"


class qMRMLWidget(QWidget):
    def setMRMLScene(self, scene):
        self._scene = scene


class qMRMLNodeComboBox(QComboBox):
    """A node selector: a combo box whose first item is the 'none' entry when that is enabled."""

    def setMRMLScene(self, scene):
        self._scene = scene

    def setNodeNames(self, names: list[str], current: str | None = None):
        self.clear()
        if self.property("noneEnabled"):
            self.addItem(self.property("noneDisplay") or "None")
        self.addItems(names)
        if current is not None:
            self.setCurrentText(current)


class ctkPathLineEdit(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(2)
        self.lineEdit = QLineEdit(self)
        self.browseButton = QToolButton(self)
        self.browseButton.setText("…")
        layout.addWidget(self.lineEdit, 1)
        layout.addWidget(self.browseButton)

    def _get_path(self) -> str:
        return self.lineEdit.text()

    def _set_path(self, value: str) -> None:
        self.lineEdit.setText(value)

    currentPath = Property(str, _get_path, _set_path)


class ctkCollapsibleButton(QWidget):
    """Header bar with an arrow and a title; its contents hide when collapsed (as in CTK)."""

    HEADER = 24

    def __init__(self, parent=None):
        super().__init__(parent)
        self._text = ""
        self._collapsed = False
        self.setContentsMargins(2, self.HEADER + 2, 2, 2)

    def _get_text(self) -> str:
        return self._text

    def _set_text(self, value: str) -> None:
        self._text = value
        self.update()

    def _get_collapsed(self) -> bool:
        return self._collapsed

    def _set_collapsed(self, value: bool) -> None:
        self._collapsed = bool(value)
        self.apply_collapsed()

    text = Property(str, _get_text, _set_text)
    collapsed = Property(bool, _get_collapsed, _set_collapsed)

    def apply_collapsed(self) -> None:
        for child in self.findChildren(QWidget, options=Qt.FindDirectChildrenOnly):
            child.setVisible(not self._collapsed)
        self.setMaximumHeight(self.HEADER if self._collapsed else 16777215)
        self.setContentsMargins(2, self.HEADER + (0 if self._collapsed else 2), 2, 0 if self._collapsed else 2)

    def paintEvent(self, event):
        painter = QPainter(self)
        option = QStyleOptionButton()
        option.initFrom(self)
        option.rect = QRect(0, 0, self.width(), self.HEADER)
        option.state |= QStyle.State_Raised
        self.style().drawControl(QStyle.CE_PushButtonBevel, option, painter, self)
        arrow = QStyleOptionButton()
        arrow.initFrom(self)
        arrow.rect = QRect(6, (self.HEADER - 10) // 2, 10, 10)
        self.style().drawPrimitive(QStyle.PE_IndicatorArrowRight if self._collapsed else QStyle.PE_IndicatorArrowDown,
                                   arrow, painter, self)
        painter.setPen(self.palette().color(QPalette.ButtonText))
        painter.drawText(QRect(22, 0, self.width() - 24, self.HEADER), Qt.AlignVCenter | Qt.AlignLeft, self._text)
        if not self._collapsed:
            painter.setPen(self.palette().color(QPalette.Mid))
            painter.drawRect(QRect(0, self.HEADER, self.width() - 1, self.height() - self.HEADER - 1))


STANDINS = (qMRMLWidget, qMRMLNodeComboBox, ctkPathLineEdit, ctkCollapsibleButton)


def application() -> QApplication:
    app = QApplication.instance() or QApplication([])
    app.setStyle("Fusion")
    return app


def load_ui(path: Path = UI_FILE) -> tuple[QWidget, str]:
    """The panel loaded from the .ui with the stand-ins registered; returns (widget, loader error text)."""
    application()
    loader = QUiLoader()
    for cls in STANDINS:
        loader.registerCustomWidget(cls)
    ui_file = QFile(str(path))
    if not ui_file.open(QFile.ReadOnly):
        raise OSError(f"cannot open {path}")
    try:
        widget = loader.load(ui_file)
    finally:
        ui_file.close()
    if widget is not None:
        for section in widget.findChildren(ctkCollapsibleButton):
            section.apply_collapsed()
    return widget, loader.errorString()
