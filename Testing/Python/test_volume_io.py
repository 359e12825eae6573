"""Reading and writing volumes: every format round-trips voxels and geometry; bad input gives clear errors."""

from __future__ import annotations

import gzip
import itertools
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import rotation
from TextDiffSegLib import volume as volume_module
from TextDiffSegLib.errors import InputImageError, OutputError
from TextDiffSegLib.volume import (
    VOLUME_EXTENSIONS,
    Volume,
    from_sitk,
    read_volume,
    to_sitk,
    write_atomically,
    write_volume,
)

TOL = 1e-6


OBLIQUE = tuple((rotation("x", 20) @ rotation("z", -20)).ravel())


def oblique_volume(dtype=np.int16, shape=(7, 9, 11)) -> Volume:
    """A small volume with anisotropic spacing and a direction rotated ~20 degrees about two axes.

    Origin and spacing are exactly representable in float32, so NIfTI (which stores float32) keeps them.
    """
    rng = np.random.default_rng(0)
    if np.issubdtype(dtype, np.integer):
        array = rng.integers(-1000, 2000, shape).astype(dtype)
    else:
        array = rng.normal(size=shape).astype(dtype)
    return Volume(array, spacing=(0.75, 1.25, 3.0), origin=(-120.5, 35.25, 80.75), direction=OBLIQUE)


def assert_same_geometry(actual: Volume, expected: Volume, tol: float = TOL) -> None:
    assert actual.array.shape == expected.array.shape
    np.testing.assert_allclose(actual.spacing, expected.spacing, atol=tol, rtol=0)
    np.testing.assert_allclose(actual.origin, expected.origin, atol=tol, rtol=0)
    np.testing.assert_allclose(actual.direction, expected.direction, atol=tol, rtol=0)


def assert_same_volume(actual: Volume, expected: Volume) -> None:
    assert actual.array.dtype == expected.array.dtype
    np.testing.assert_array_equal(actual.array, expected.array)
    assert_same_geometry(actual, expected)


# --- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("extension", VOLUME_EXTENSIONS)
@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_round_trip_every_format_keeps_voxels_and_oblique_geometry(tmp_path, extension, dtype):
    original = oblique_volume(dtype)
    path = tmp_path / f"image{extension}"
    assert write_volume(path, original) == path
    assert_same_volume(read_volume(path), original)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("extension", [".nhdr", ".mhd"])
def test_detached_header_writes_its_data_file_beside_it(tmp_path, extension):
    write_volume(tmp_path / f"image{extension}", oblique_volume())
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 and f"image{extension}" in names


def test_sitk_conversion_round_trip():
    original = oblique_volume(np.float32)
    image = to_sitk(original)
    assert image.GetSize() == (11, 9, 7)
    assert_same_volume(from_sitk(image), original)
    assert to_sitk(original.with_array(original.array > 0)).GetPixelID() == sitk.sitkUInt8


def test_to_sitk_refuses_a_non_3d_array():
    with pytest.raises(ValueError):
        to_sitk(Volume(np.zeros((4, 4)), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)))


@pytest.mark.parametrize("extension", [".nrrd", ".nii.gz", ".mha"])
def test_single_slice_3d_image_is_a_volume(tmp_path, extension):
    image = sitk.Image([5, 4, 1], sitk.sitkInt16)
    image.SetSpacing((1.0, 1.0, 2.5))
    path = tmp_path / f"slice{extension}"
    sitk.WriteImage(image, str(path))
    volume = read_volume(path)
    assert volume.array.shape == (1, 4, 5)
    assert volume.spacing[2] == pytest.approx(2.5)


def test_read_accepts_str_and_upper_case_extension(tmp_path):
    original = oblique_volume()
    path = tmp_path / "IMAGE.NRRD"
    write_volume(str(path), original)
    assert_same_volume(read_volume(str(path)), original)


# --- real data --------------------------------------------------------------------------------


@pytest.mark.realdata
def test_dicom_series_folder_matches_its_nifti_conversion(shared_data):
    folder = shared_data / "totalseg_examples" / "example_ct_dicom"
    ct = read_volume(folder)
    assert ct.array.ndim == 3 and ct.array.shape[0] == 20
    seg = read_volume(shared_data / "totalseg_examples" / "example_seg_dicom.nii.gz")
    assert ct.array.shape == seg.array.shape
    np.testing.assert_allclose(ct.spacing, seg.spacing, atol=1e-4)
    # The NIfTI was converted with the y axis flipped, so compare directions up to the sign of each
    # axis, and the physical positions of the eight corner voxels as sets.
    np.testing.assert_allclose(
        np.abs(np.reshape(ct.direction, (3, 3))), np.abs(np.reshape(seg.direction, (3, 3))), atol=1e-4
    )
    ct_image, seg_image = to_sitk(ct), to_sitk(seg)

    def corners(image: sitk.Image) -> np.ndarray:
        size = image.GetSize()
        points = [
            image.TransformIndexToPhysicalPoint(index)
            for index in itertools.product(*[(0, n - 1) for n in size])
        ]
        return np.array(sorted(np.round(points, 2).tolist()))

    np.testing.assert_allclose(corners(ct_image), corners(seg_image), atol=1e-2)
    # The label map lies on the CT's voxels: resampling it onto the DICOM grid just flips it.
    resampled = sitk.Resample(seg_image, ct_image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    flip = [int(np.sign(a) != np.sign(b)) for a, b in zip(np.diag(np.reshape(ct.direction, (3, 3))),
                                                          np.diag(np.reshape(seg.direction, (3, 3))))]
    expected = seg.array[tuple(slice(None, None, -1) if f else slice(None) for f in reversed(flip))]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(resampled), expected)


@pytest.mark.realdata
def test_dicom_folder_with_two_series_reads_the_largest(shared_data, tmp_path):
    source = shared_data / "totalseg_examples" / "example_ct_dicom"
    files = sorted(source.iterdir())
    for file in files:
        shutil.copy(file, tmp_path / file.name)
    # A second, smaller series: three synthetic slices under their own SeriesInstanceUID.
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series_uid = "1.2.826.0.1.3680043.2.1125.42"
    for number in range(3):
        image = sitk.Image([16, 16], sitk.sitkInt16)
        for tag, value in {
            "0008|0060": "CT",
            "0020|000d": series_uid + ".1",
            "0020|000e": series_uid,
            "0008|0018": f"{series_uid}.{number + 2}",
            "0020|0013": str(number + 1),
            "0020|0032": f"0\\0\\{number * 2.0}",
            "0020|0037": "1\\0\\0\\0\\1\\0",
        }.items():
            image.SetMetaData(tag, value)
        writer.SetFileName(str(tmp_path / f"other{number}.dcm"))
        writer.Execute(image)
    assert len(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(tmp_path))) == 2
    assert read_volume(tmp_path).array.shape[0] == 20


@pytest.mark.realdata
@pytest.mark.parametrize("extension", [".nii.gz", ".nrrd"])
def test_btcv_case_round_trips(shared_data, tmp_path, extension):
    original = read_volume(shared_data / "btcv" / "imagesTr" / "btcv_0005.nii.gz")
    assert original.array.ndim == 3 and original.array.dtype == np.int16
    path = write_volume(tmp_path / f"case{extension}", original)
    assert_same_volume(read_volume(path), original)


# --- input errors -----------------------------------------------------------------------------


def assert_supported_formats_named(error: pytest.ExceptionInfo) -> None:
    assert "3D scalar volume (NIfTI, NRRD, MHA or a DICOM series folder)" in str(error.value)


def test_missing_path(tmp_path):
    with pytest.raises(InputImageError, match="does not exist"):
        read_volume(tmp_path / "nothing.nii.gz")


def test_corrupt_file(tmp_path):
    path = tmp_path / "corrupt.nii.gz"
    path.write_bytes(b"this is not an image" * 20)
    with pytest.raises(InputImageError, match="cannot read") as error:
        read_volume(path)
    assert_supported_formats_named(error)
    assert "Exception thrown in SimpleITK" not in str(error.value)
    assert error.value.__cause__ is None


@pytest.mark.parametrize("extension", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_truncated_file(tmp_path, extension):
    """ITK fills a truncated NIfTI with zeros without complaint; read_volume must refuse it."""
    path = tmp_path / f"image{extension}"
    write_volume(path, oblique_volume(shape=(20, 30, 40)))
    truncated = tmp_path / f"truncated{extension}"
    if extension == ".nii.gz":  # a valid gzip stream holding half the file
        data = gzip.decompress(path.read_bytes())
        truncated.write_bytes(gzip.compress(data[: len(data) // 2]))
    else:
        data = path.read_bytes()
        truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputImageError, match="cannot read") as error:
        read_volume(truncated)
    assert "No such file" not in str(error.value)


def test_cut_gzip_stream_is_refused(tmp_path):
    path = tmp_path / "image.nii.gz"
    write_volume(path, oblique_volume(shape=(20, 30, 40)))
    data = path.read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) - 100])
    with pytest.raises(InputImageError, match="truncated or corrupt"):
        read_volume(tmp_path / "cut.nii.gz")


def test_unsupported_extension(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(InputImageError, match="unsupported file type") as error:
        read_volume(path)
    assert_supported_formats_named(error)


def test_single_dicom_file_points_to_the_folder(tmp_path):
    path = tmp_path / "slice.dcm"
    path.write_bytes(b"\0" * 200)
    with pytest.raises(InputImageError, match="give the folder"):
        read_volume(path)


def test_folder_without_dicom(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(InputImageError, match="no DICOM series") as error:
        read_volume(tmp_path)
    assert_supported_formats_named(error)


def test_empty_folder(tmp_path):
    with pytest.raises(InputImageError, match="no DICOM series"):
        read_volume(tmp_path)


NOT_3D_SCALAR = {
    "2D image": lambda: sitk.Image([8, 8], sitk.sitkInt16),
    "4D image": lambda: sitk.Image([4, 4, 3, 2], sitk.sitkFloat32),
    "3 components": lambda: sitk.Image([4, 4, 3], sitk.sitkVectorFloat32, 3),
}


@pytest.mark.parametrize("extension", [".nrrd", ".nii.gz", ".mha"])
@pytest.mark.parametrize("message", list(NOT_3D_SCALAR))
def test_images_that_are_not_3d_scalar_volumes_are_refused(tmp_path, extension, message):
    path = tmp_path / f"image{extension}"
    sitk.WriteImage(NOT_3D_SCALAR[message](), str(path))
    with pytest.raises(InputImageError, match=message) as error:
        read_volume(path)
    assert_supported_formats_named(error)


def test_from_sitk_refuses_2d():
    with pytest.raises(InputImageError, match="2D image"):
        from_sitk(sitk.Image([4, 4], sitk.sitkUInt8))


# --- writing errors and atomicity -------------------------------------------------------------


def test_write_refuses_existing_file_unless_overwrite(tmp_path):
    path = tmp_path / "image.nrrd"
    write_volume(path, oblique_volume())
    replacement = oblique_volume(np.float32)
    with pytest.raises(OutputError, match="exists; pass --overwrite or choose another path"):
        write_volume(path, replacement)
    assert read_volume(path).array.dtype == np.int16
    write_volume(path, replacement, overwrite=True)
    assert_same_volume(read_volume(path), replacement)


def test_write_refuses_existing_data_file_of_detached_header(tmp_path):
    (tmp_path / "image.raw.gz").write_bytes(b"keep me")
    with pytest.raises(OutputError, match="image.raw.gz exists"):
        write_volume(tmp_path / "image.nhdr", oblique_volume())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.raw.gz"]
    assert (tmp_path / "image.raw.gz").read_bytes() == b"keep me"


def test_write_into_missing_folder(tmp_path):
    with pytest.raises(OutputError, match="does not exist"):
        write_volume(tmp_path / "missing" / "image.nrrd", oblique_volume())


def test_write_into_read_only_folder(tmp_path, monkeypatch):
    real_access = os.access
    monkeypatch.setattr(volume_module.os, "access", lambda p, mode: False if Path(p) == tmp_path else real_access(p, mode))
    with pytest.raises(OutputError, match="not writable"):
        write_volume(tmp_path / "image.nrrd", oblique_volume())


def test_write_onto_a_folder(tmp_path):
    (tmp_path / "image.nrrd").mkdir()
    with pytest.raises(OutputError, match="is a folder"):
        write_volume(tmp_path / "image.nrrd", oblique_volume(), overwrite=True)


def test_write_unsupported_extension(tmp_path):
    with pytest.raises(OutputError, match="unsupported file type"):
        write_volume(tmp_path / "image.png", oblique_volume())


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    real_write = sitk.WriteImage

    def write_half_then_fail(image, path, *args):
        real_write(image, path, *args)
        Path(path).write_bytes(Path(path).read_bytes()[:100])
        raise RuntimeError("Exception thrown in SimpleITK WriteImage: x.cxx:1:\nsitk::ERROR: No space left on device")

    monkeypatch.setattr(volume_module.sitk, "WriteImage", write_half_then_fail)
    with pytest.raises(OutputError, match="No space left on device"):
        write_volume(tmp_path / "image.nii.gz", oblique_volume())
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "image.nrrd"
    original = oblique_volume()
    write_volume(path, original)
    monkeypatch.setattr(volume_module.sitk, "WriteImage", lambda *args: (_ for _ in ()).throw(RuntimeError("disk full")))
    with pytest.raises(OutputError, match="disk full"):
        write_volume(path, oblique_volume(np.float32), overwrite=True)
    assert_same_volume(read_volume(path), original)
    assert [p.name for p in tmp_path.iterdir()] == ["image.nrrd"]


def test_write_atomically_cleans_up_after_any_exception(tmp_path):
    def write_then_break(path: Path) -> None:
        path.write_bytes(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(tmp_path / "out.seg.nrrd", write_then_break)
    assert list(tmp_path.iterdir()) == []


def test_write_atomically_keeps_the_real_extension(tmp_path):
    seen = []
    write_atomically(tmp_path / "out.seg.nrrd", lambda path: (seen.append(path), path.write_bytes(b"x")))
    assert seen[0].name == "out.seg.nrrd" and seen[0].parent.parent == tmp_path
    assert [p.name for p in tmp_path.iterdir()] == ["out.seg.nrrd"]
