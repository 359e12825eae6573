"""Render docs/TextDiffSeg-panel.png: the module's panel (its .ui file, offscreen with PySide6).

Slicer cannot run here, so the panel is drawn with stand-ins for Slicer's widgets and filled as it
looks after a run: the gallery shows five liver proposals on a real BTCV CT (its manual label,
grown, shrunk and shifted, in place of model samples), drawn by the engine's own thumbnail code.

    python docs/render_panel_screenshot.py
"""

import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "TextDiffSeg"), str(REPO / "Testing" / "Python")]

from slicer_ui import loadUi  # noqa: E402
from PySide6.QtCore import QSize, Qt  # noqa: E402
from PySide6.QtGui import QIcon, QPixmap  # noqa: E402
from PySide6.QtWidgets import QListWidgetItem, QWidget  # noqa: E402
from TextDiffSegHelpers.gallery import Gallery  # noqa: E402

from TextDiffSegLib import registry, terminology  # noqa: E402
from TextDiffSegLib.fusion import agreement_scores  # noqa: E402
from TextDiffSegLib.thumbnails import thumbnail, write_png  # noqa: E402
from TextDiffSegLib.volume import from_sitk  # noqa: E402

CASE = REPO.parent / "shared" / "data" / "btcv"
OUTPUT = REPO / "docs" / "TextDiffSeg-panel.png"
THUMBNAIL = 100


def proposals(liver: np.ndarray) -> list[np.ndarray]:
    """Five plausible variants of a manual liver mask."""
    ball = ndimage.generate_binary_structure(3, 1)
    return [
        liver,
        ndimage.binary_dilation(liver, ball, iterations=2),
        ndimage.binary_erosion(liver, ball, iterations=2),
        np.roll(liver, 4, axis=2),
        ndimage.binary_dilation(np.roll(liver, -3, axis=1), ball, iterations=1),
    ]


def main() -> None:
    image = from_sitk(sitk.ReadImage(str(CASE / "imagesTr" / "btcv_0005.nii.gz")))
    liver = sitk.GetArrayFromImage(sitk.ReadImage(str(CASE / "labelsTr" / "btcv_0005.nii.gz"))) == 6
    masks = proposals(liver)
    scores = agreement_scores(masks)
    color = terminology.get_structure("liver").color

    panel = loadUi()
    child = lambda name: panel.findChild(QWidget, name)  # noqa: E731
    child("inputVolumeSelector").addItem("btcv_0005")
    child("promptLineEdit").setText("liver; spleen")
    default = registry.default_model_name()
    for info in registry.list_models():
        child("modelComboBox").addItem(info.name + (" (default)" if info.name == default else ""))
    child("modelComboBox").addItem("Choose a model folder...")
    child("modelInfoLabel").setText(registry.list_models()[0].description + " Bundled, works offline.")
    child("seedSpinBox").setValue(42)
    child("deviceComboBox").addItems(["auto", "GPU", "CPU"])
    child("outputSegmentationSelector").addItem("btcv_0005 TextDiffSeg")
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
