"""Gallery state, prompt completion and the gallery's thumbnails, on a real CT and its manual liver label."""

import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "TextDiffSeg"))
from TextDiffSegHelpers.gallery import Gallery  # noqa: E402
from TextDiffSegHelpers.prompts import promptCompletions  # noqa: E402

from TextDiffSegLib.thumbnails import thumbnail, write_png  # noqa: E402
from TextDiffSegLib.volume import Volume, from_sitk  # noqa: E402

LIVER_COLOR = (221, 130, 101)


@pytest.fixture(scope="module")
def case(shared_data):
    image = from_sitk(sitk.ReadImage(str(shared_data / "btcv/imagesTr/btcv_0005.nii.gz")))
    liver = sitk.GetArrayFromImage(sitk.ReadImage(str(shared_data / "btcv/labelsTr/btcv_0005.nii.gz"))) == 6
    return image, liver


def _outlined(rgb):
    return np.all(rgb == LIVER_COLOR, axis=2)


@pytest.mark.realdata
def test_thumbnail_outlines_the_proposal_on_the_slice_through_its_centroid(case):
    image, liver = case
    rgb = thumbnail(image, liver, LIVER_COLOR, size=128)
    assert rgb.dtype == np.uint8 and rgb.shape == (128, 128, 3)  # 257 x 257 voxels of 1.59 mm: square
    outline = _outlined(rgb)
    assert 20 < outline.sum() < 2000
    # radiological view: the liver (patient's right) is on the image's left
    assert np.argwhere(outline)[:, 1].mean() < 64
    # the outline encloses the liver as it lies on the centroid's slice
    z = int(round(np.argwhere(liver)[:, 0].mean()))
    rows, columns = np.argwhere(liver[z]).mean(axis=0) * 128 / 257
    assert abs(np.argwhere(outline)[:, 0].mean() - rows) < 10 and abs(np.argwhere(outline)[:, 1].mean() - columns) < 10


@pytest.mark.realdata
def test_thumbnail_looks_the_same_whichever_way_the_voxels_are_stored(case):
    image, liver = case
    # the same scan stored with x reversed: voxel i now lies where voxel (n - 1 - i) was
    nx = image.array.shape[2]
    origin = (image.origin[0] + (nx - 1) * image.spacing[0], image.origin[1], image.origin[2])
    flipped = Volume(image.array[:, :, ::-1], image.spacing, origin, (-1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    np.testing.assert_array_equal(
        thumbnail(flipped, liver[:, :, ::-1], LIVER_COLOR), thumbnail(image, liver, LIVER_COLOR)
    )


def test_thumbnail_keeps_the_aspect_ratio_and_applies_the_window():
    array = np.zeros((3, 20, 40), np.int16)
    array[:, :, 20:] = 100
    image = Volume(array, (1.0, 1.0, 5.0), (0.0, 0.0, 0.0))
    rgb = thumbnail(image, np.zeros(array.shape, np.uint8), LIVER_COLOR, size=64, window=(50, 100))
    assert rgb.shape == (32, 64, 3)
    assert rgb[:, :32].max() == 0 and rgb[:, 32:].min() == 255  # no outline for an empty mask
    with pytest.raises(ValueError, match="differs"):
        thumbnail(image, np.zeros((3, 20, 41)), LIVER_COLOR)


def test_thumbnail_png_is_read_back_as_written(tmp_path):
    rgb = np.zeros((3, 5, 3), np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[2, 4] = (0, 0, 255)
    write_png(rgb, tmp_path / "thumbnail.png")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "thumbnail.png"))), rgb)


def test_gallery_orders_by_agreement_and_tracks_the_selection():
    gallery = Gallery([0.5, 0.9, 0.7, 0.9], ["tiny"] * 4)
    assert gallery.order() == [2, 4, 3, 1]
    assert gallery.label(2) == "#2  0.90"
    assert Gallery([0.5, 0.9], ["universal-btcv", "lcpdn"]).label(2) == "#2  lcpdn  0.90"  # an ensemble's
    assert not gallery.canAccept() and not gallery.canFuse()
    gallery.select([3])
    assert gallery.selected == [3] and gallery.canAccept() and not gallery.canFuse()
    gallery.select([4, 1, 3])
    assert gallery.selected == [1, 3, 4] and gallery.canFuse() and not gallery.canAccept()
    gallery.select([])
    assert not gallery.canAccept() and not gallery.canFuse()
    with pytest.raises(ValueError, match="no proposal 5"):
        gallery.select([2, 5])


def test_prompt_completion_completes_the_last_of_several_prompts():
    assert "spleen" in promptCompletions("spl")
    assert promptCompletions("liver; spl")[0] == "liver; spleen"
    assert all(c.startswith("liver,kidney;  ") for c in promptCompletions("liver,kidney;  left k"))
    assert "liver,kidney;  left kidney" in promptCompletions("liver,kidney;  left k")
    assert len(promptCompletions("", limit=3)) == 3
