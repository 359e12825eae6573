"""Render docs/TextDiffSeg-panel.png: the module's panel (its .ui file, offscreen with PySide6).

Slicer cannot run here, so the panel is drawn with stand-ins for Slicer's widgets and filled as it
looks after a run: the gallery shows five liver proposals that the bundled default model sampled
on a BTCV CT it was not trained on (its first validation case), drawn by the engine's own
thumbnail code.

    python docs/render_panel_screenshot.py
"""

import sys
import tempfile
from pathlib import Path

import json

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "TextDiffSeg"), str(REPO / "Testing" / "Python")]

from slicer_ui import loadUi  # noqa: E402
from PySide6.QtCore import QSize, Qt  # noqa: E402
from PySide6.QtGui import QIcon, QPixmap  # noqa: E402
from PySide6.QtWidgets import QListWidgetItem, QWidget  # noqa: E402
from TextDiffSegHelpers.gallery import Gallery  # noqa: E402

from TextDiffSegLib import registry  # noqa: E402
from TextDiffSegLib.segmenter import Segmenter  # noqa: E402
from TextDiffSegLib.thumbnails import thumbnail, write_png  # noqa: E402
from TextDiffSegLib.volume import read_volume  # noqa: E402

CASE = REPO.parent / "shared" / "data" / "btcv"
OUTPUT = REPO / "docs" / "TextDiffSeg-panel.png"
THUMBNAIL = 100


def main() -> None:
    case = json.loads((registry.resolve_model(None) / "training.json").read_text())["split"]["validation"][0]
    image = read_volume(CASE / "imagesTr" / f"{case}.nii.gz")
    result = Segmenter.from_pretrained(None).propose(image, "liver", num_proposals=5, seed=42)
    masks, scores = result.proposals, result.scores
    color = result.structure.color

    panel = loadUi()
    child = lambda name: panel.findChild(QWidget, name)  # noqa: E731
    child("inputVolumeSelector").addItem(case)
    child("promptLineEdit").setText("liver; spleen")
    default = registry.default_model_name()
    for info in registry.list_models():
        child("modelComboBox").addItem(info.name + (" (default)" if info.name == default else ""))
    child("modelComboBox").addItem("Choose a model folder...")
    child("modelInfoLabel").setText(registry.list_models()[0].description + " Bundled, works offline.")
    child("seedSpinBox").setValue(42)
    child("deviceComboBox").addItems(["auto", "GPU", "CPU"])
    child("outputSegmentationSelector").addItem(f"{case} TextDiffSeg")
    child("generateButton").setEnabled(True)
    child("progressBar").hide()
    child("statusLabel").setText("Done. Select a proposal to see it; accept one or fuse several.")
    child("structureComboBox").addItems(["liver", "spleen"])

    gallery = Gallery(scores)
    gallery.select([1, 5])
    listWidget = child("galleryListWidget")
    listWidget.setIconSize(QSize(THUMBNAIL, THUMBNAIL))
    listWidget.setMinimumHeight(2 * THUMBNAIL + 70)
    with tempfile.TemporaryDirectory() as folder:
        for number in gallery.order():
            path = Path(folder) / f"proposal-{number}.png"
            write_png(thumbnail(image, masks[number - 1], color, THUMBNAIL, window=(40, 400)), path)
            item = QListWidgetItem(QIcon(QPixmap(str(path))), gallery.label(number))
            item.setData(Qt.UserRole, number)
            listWidget.addItem(item)
            item.setSelected(number in gallery.selected)
    child("fuseButton").setEnabled(gallery.canFuse())
    child("acceptButton").setEnabled(gallery.canAccept())
    child("uncertaintyCheckBox").setEnabled(True)
    child("editButton").setEnabled(True)

    panel.resize(420, panel.sizeHint().height())
    panel.grab().save(str(OUTPUT))
    print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    main()
