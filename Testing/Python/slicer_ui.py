"""Loading the module's .ui file without Slicer: PySide6, offscreen, with stand-ins for Slicer's widgets.

Slicer's custom widgets (CTK, MRML) are not available outside Slicer. Each stand-in derives from the
Qt widget it behaves most like, so the panel lays out and renders much as in Slicer; properties Qt
does not know (``nodeTypes``, ``noneDisplay``...) are kept as dynamic properties.
"""

import ast
import os
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtCore import Property  # noqa: E402
from PySide6.QtUiTools import QUiLoader  # noqa: E402
from PySide6.QtWidgets import QApplication, QComboBox, QGroupBox, QWidget  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
UI_FILE = REPO / "Resources" / "UI" / "TextDiffSeg.ui"
MODULE_FILE = REPO / "TextDiffSeg" / "TextDiffSeg.py"


class qMRMLWidget(QWidget):
    pass


class ctkCollapsibleButton(QGroupBox):
    """A titled box; ``text`` is its title, as on the real collapsible button."""

    def _text(self):
        return self.title()

    def _setText(self, text):
        self.setTitle(text)

    text = Property(str, _text, _setText)


class qMRMLNodeComboBox(QComboBox):
    pass


class ctkSliderWidget(QWidget):
    pass


class qMRMLSubjectHierarchyTreeView(QWidget):
    pass


class ctkPathLineEdit(QComboBox):
    """A path typed or browsed to; the real one is an editable combo box with a browse button."""


STAND_INS = (qMRMLWidget, ctkCollapsibleButton, qMRMLNodeComboBox, ctkSliderWidget, qMRMLSubjectHierarchyTreeView,
             ctkPathLineEdit)


def application() -> QApplication:
    return QApplication.instance() or QApplication([])


def loadUi(path: Path = UI_FILE) -> QWidget:
    """The .ui file's top-level widget, built with the stand-ins."""
    application()
    loader = QUiLoader()
    for standIn in STAND_INS:
        loader.registerCustomWidget(standIn)
    widget = loader.load(str(path))
    if widget is None:
        raise RuntimeError(f"QUiLoader could not load {path}: {loader.errorString()}")
    return widget


def moduleSource() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text(), filename=str(MODULE_FILE))
