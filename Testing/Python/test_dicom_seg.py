"""DICOM SEG output (``dicom_seg``, and ``textdiffseg segment -o result.dcm``), read back with highdicom and pydicom:
the masks per segment and frame, each frame on its source image, the source series referred to, the terminology's
codes, and the model as the algorithm.

The example series in ../shared/data/totalseg_examples lost its SOP Class, SOP Instance, Study and Series Instance
UIDs to anonymisation, and a SEG cannot refer to a series without them (which one test checks). The other tests use
a copy with them restored (the SOP ones from each file's meta header, the study and series ones new), its files named
in an order that is not the slices' order.
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from TextDiffSegLib import __version__, cli, terminology
from TextDiffSegLib.dicom_seg import read_source_series, write_dicom_seg
from TextDiffSegLib.errors import OutputError
from TextDiffSegLib.outputs import SegmentOutput
from TextDiffSegLib.segmenter import Segmenter
from TextDiffSegLib.volume import Volume, read_volume

pytestmark = pytest.mark.realdata

FAST = ["--steps", "2", "--proposals", "2"]
STRUCTURES = ("liver", "spleen", "kidney_left")  # kidney_left has a type modifier (laterality)


# --- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def example_series(shared_data) -> Path:
    return shared_data / "totalseg_examples" / "example_ct_dicom"


@pytest.fixture(scope="module")
def series(example_series, tmp_path_factory) -> Path:
    """A copy of the example series with its UIDs restored, its files named in a shuffled order."""
    folder = tmp_path_factory.mktemp("series")
    study, series_uid = generate_uid(), generate_uid()
    files = sorted(example_series.iterdir())
    for number, file in zip(np.random.default_rng(0).permutation(len(files)), files):
        image = pydicom.dcmread(file)
        image.SOPClassUID = image.file_meta.MediaStorageSOPClassUID
        image.SOPInstanceUID = image.file_meta.MediaStorageSOPInstanceUID
        image.StudyInstanceUID, image.SeriesInstanceUID = study, series_uid
        image.save_as(folder / f"image{number:02d}")
    return folder


@pytest.fixture(scope="module")
def volume(series) -> Volume:
    return read_volume(series)


@pytest.fixture(scope="module")
def source(series, volume) -> list:
    return read_source_series(series, volume)


@pytest.fixture(scope="module")
def segments(volume) -> list[SegmentOutput]:
    """Three boxes (the first two overlap), each on some slices only, the first with tags."""
    boxes = [(slice(2, 9), slice(100, 220), slice(150, 300)), (slice(6, 14), slice(200, 260), slice(260, 330)),
             (slice(12, 20), slice(300, 420), slice(40, 130))]
    masks = []
    for where in boxes:
        mask = np.zeros(volume.array.shape, np.uint8)
        mask[where] = 1
        masks.append(mask)
    tags = [{"TextDiffSeg.prompt": "the liver", "TextDiffSeg.seed": "0"}, {}, {}]
    return [SegmentOutput(terminology.get_structure(name), mask, tag)
            for name, mask, tag in zip(STRUCTURES, masks, tags)]


@pytest.fixture(scope="module")
def seg_path(source, segments, tmp_path_factory) -> Path:
    return write_dicom_seg(tmp_path_factory.mktemp("seg") / "result.dcm", source, segments, "tiny-model")


def as_code(item) -> tuple[str, str, str]:
    return (item.CodingSchemeDesignator, item.CodeValue, item.CodeMeaning)


def run(capsys, *args) -> tuple[int, str, str]:
    """``textdiffseg ARGS`` in-process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def segment(capsys, model: Path, image: Path, output: Path, *extra, prompts=("liver", "spleen")):
    args = ["segment", "-i", image, "-o", output, "--model", model, "--progress", "none", *FAST, *extra]
    for prompt in prompts:
        args += ["-p", prompt]
    return run(capsys, *args)


# --- the source series ------------------------------------------------------------------------


def test_source_images_are_in_slice_order_whatever_the_files_order(series, volume, source):
    assert len(source) == volume.array.shape[0]
    heights = [float(image.ImagePositionPatient[2]) for image in source]  # the slice normal is +z here
    expected = [volume.origin[2] + k * volume.spacing[2] for k in range(len(source))]
    np.testing.assert_allclose(heights, expected, atol=1e-6)
    files_order = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2])
                   for f in sorted(series.iterdir())]
    assert files_order not in (sorted(files_order), sorted(files_order, reverse=True))  # nor does the files' order


def test_a_series_without_uids_is_refused(example_series):
    with pytest.raises(OutputError) as error:
        read_source_series(example_series, read_volume(example_series))
    message = str(error.value)
    assert "SeriesInstanceUID" in message and "SOPInstanceUID" in message and ".seg.nrrd" in message


def test_images_off_the_volume_grid_are_refused(series, volume):
    stretched = Volume(volume.array, (*volume.spacing[:2], volume.spacing[2] * 1.5), volume.origin, volume.direction)
    with pytest.raises(OutputError, match="do not lie one on each slice"):
        read_source_series(series, stretched)


# --- the SEG, read back -----------------------------------------------------------------------


def test_masks_read_back_per_segment_and_frame(seg_path, source, segments):
    seg = hd.seg.segread(seg_path)
    assert seg.SegmentationType == "BINARY"
    slice_of = {image.SOPInstanceUID: k for k, image in enumerate(source)}
    stored = set()
    for frame, item in zip(seg.pixel_array, seg.PerFrameFunctionalGroupsSequence):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        k = slice_of[item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        np.testing.assert_array_equal(frame, segments[number - 1].mask[k])
        stored.add((number, k))
    # A frame for every slice a segment has voxels on, and only those.
    assert stored == {(n, k) for n, s in enumerate(segments, 1) for k in range(len(source)) if s.mask[k].any()}
    pixels = seg.get_pixels_by_source_instance([image.SOPInstanceUID for image in source], segment_numbers=[1, 2, 3])
    np.testing.assert_array_equal(pixels, np.stack([s.mask for s in segments], axis=-1))


def test_frames_lie_on_their_source_images(seg_path, source):
    seg = hd.seg.segread(seg_path)
    by_uid = {image.SOPInstanceUID: image for image in source}
    for item in seg.PerFrameFunctionalGroupsSequence:
        image = by_uid[item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        np.testing.assert_allclose(item.PlanePositionSequence[0].ImagePositionPatient, image.ImagePositionPatient)
    shared = seg.SharedFunctionalGroupsSequence[0]
    np.testing.assert_allclose(shared.PlaneOrientationSequence[0].ImageOrientationPatient,
                               source[0].ImageOrientationPatient)
    np.testing.assert_allclose(shared.PixelMeasuresSequence[0].PixelSpacing, source[0].PixelSpacing)
    assert (seg.Rows, seg.Columns) == (source[0].Rows, source[0].Columns)


def test_the_source_series_is_referenced(seg_path, source):
    seg = hd.seg.segread(seg_path)
    (referenced,) = seg.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == source[0].SeriesInstanceUID != seg.SeriesInstanceUID
    assert sorted(i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence) == \
        sorted(image.SOPInstanceUID for image in source)
    assert seg.StudyInstanceUID == source[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == source[0].FrameOfReferenceUID


def test_segments_carry_the_terminology_and_the_model(seg_path, segments):
    seg = hd.seg.segread(seg_path)
    assert len(seg.SegmentSequence) == len(segments)
    for number, (description, written) in enumerate(zip(seg.SegmentSequence, segments), start=1):
        structure = written.structure
        assert description.SegmentNumber == number and description.SegmentLabel == structure.display_name
        assert as_code(description.SegmentedPropertyCategoryCodeSequence[0]) == structure.category
        (property_type,) = description.SegmentedPropertyTypeCodeSequence
        assert as_code(property_type) == structure.type
        modifiers = [as_code(m) for m in property_type.get("SegmentedPropertyTypeModifierCodeSequence", [])]
        assert modifiers == ([structure.type_modifier] if structure.type_modifier else [])
        assert description.SegmentAlgorithmType == "AUTOMATIC" and description.SegmentAlgorithmName == "tiny-model"
        (algorithm,) = description.SegmentationAlgorithmIdentificationSequence
        assert algorithm.AlgorithmName == "tiny-model" and algorithm.AlgorithmVersion == __version__
        assert "RecommendedDisplayCIELabValue" in description
    parameters = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters
    assert "TextDiffSeg.prompt=the liver" in parameters
    assert seg.Manufacturer == "TextDiffSeg" and seg.SoftwareVersions == __version__


def test_an_empty_segmentation_keeps_its_frames(source, volume, tmp_path):
    empty = SegmentOutput(terminology.get_structure("liver"), np.zeros(volume.array.shape, np.uint8))
    seg = hd.seg.segread(write_dicom_seg(tmp_path / "empty.dcm", source, [empty], "tiny-model"))
    assert seg.number_of_frames == len(source) and not seg.pixel_array.any()


def test_an_existing_file_is_kept_unless_overwrite(source, segments, tmp_path):
    path = tmp_path / "result.dcm"
    path.write_text("keep me")
    with pytest.raises(OutputError, match="exists; pass --overwrite"):
        write_dicom_seg(path, source, segments, "tiny-model")
    assert path.read_text() == "keep me"
    write_dicom_seg(path, source, segments, "tiny-model", overwrite=True)
    assert hd.seg.segread(path).SegmentSequence[0].SegmentLabel == "liver"


# --- textdiffseg segment -o result.dcm --------------------------------------------------------


def test_segment_writes_a_dicom_seg_from_a_dicom_folder(capsys, tmp_path, series, source, tiny_model_dir):
    proposals = tmp_path / "proposals"
    proposals.mkdir()
    code, out, err = segment(capsys, tiny_model_dir, series, tmp_path / "out.dcm", "--proposals-dir", proposals)
    assert code == 0, err
    assert f"wrote {tmp_path / 'out.dcm'}" in out
    code, _, err = segment(capsys, tiny_model_dir, series, tmp_path / "out.nii.gz")  # the same run, as a label map
    assert code == 0, err
    labels = read_volume(tmp_path / "out.nii.gz").array
    seg = hd.seg.segread(tmp_path / "out.dcm")
    assert [d.SegmentLabel for d in seg.SegmentSequence] == ["liver", "spleen"]
    assert {d.SegmentationAlgorithmIdentificationSequence[0].AlgorithmName for d in seg.SegmentSequence} == {"tiny"}
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source[0].SeriesInstanceUID
    pixels = seg.get_pixels_by_source_instance([image.SOPInstanceUID for image in source], segment_numbers=[1, 2])
    np.testing.assert_array_equal(pixels, np.stack([labels == 1, labels == 2], axis=-1))
    assert sorted(p.name for p in proposals.iterdir()) == [f"{s}_proposal{k}.dcm" for s in ("liver", "spleen")
                                                            for k in (1, 2)]
    assert hd.seg.segread(proposals / "spleen_proposal2.dcm").SegmentSequence[0].SegmentLabel == "spleen"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.dcm", "out.json", "out.nii.gz", "proposals"]


@pytest.mark.parametrize("given", ["nifti", "series without UIDs"])
def test_a_dicom_seg_needs_a_dicom_series_and_fails_before_the_model_runs(
        given, capsys, tmp_path, shared_data, example_series, tiny_model_dir, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the DICOM SEG output was checked")

    monkeypatch.setattr(Segmenter, "from_pretrained", never)
    image = shared_data / "totalseg_examples" / "example_ct_sm.nii.gz" if given == "nifti" else example_series
    code, out, err = segment(capsys, tiny_model_dir, image, tmp_path / "out.dcm")
    assert code == 2 and out == "" and err.count("\n") == 1, err
    words = ["is a file, not a DICOM series folder"] if given == "nifti" else ["lack", "SeriesInstanceUID"]
    for word in [*words, "out.dcm" if given == "nifti" else "DICOM SEG", ".seg.nrrd", ".nii.gz"]:
        assert word in err, f"{word!r} not in {err!r}"
    assert list(tmp_path.iterdir()) == []


def test_a_dicom_seg_is_never_written_inside_the_input_folder(capsys, series, tiny_model_dir):
    code, _, err = segment(capsys, tiny_model_dir, series, series / "out.dcm", prompts=("liver",))
    assert code == 2 and "inside the input folder" in err
    assert not (series / "out.dcm").exists()


def test_segment_keeps_an_existing_dcm_unless_overwrite(capsys, tmp_path, series, tiny_model_dir):
    output = tmp_path / "out.dcm"
    output.write_text("keep me")
    code, _, err = segment(capsys, tiny_model_dir, series, output, prompts=("liver",))
    assert code == 2 and "exists" in err and "--overwrite" in err
    assert output.read_text() == "keep me"
    code, _, err = segment(capsys, tiny_model_dir, series, output, "--overwrite", prompts=("liver",))
    assert code == 0, err
    assert hd.seg.segread(output).SegmentSequence[0].SegmentLabel == "liver"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.dcm"]


def test_an_ensemble_of_long_names_fits_dicoms_64_characters(source, segments, tmp_path):
    """DICOM's AlgorithmName (LO) holds 64 characters; an ensemble's name joins its models' names."""
    name = "universal-btcv,textdiffseg3d-btcv,progidiff-btcv,lcpdn-btcv,universal-chaos-t2-lora"
    seg = hd.seg.segread(write_dicom_seg(tmp_path / "ensemble.dcm", source, segments, name))
    (algorithm,) = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence
    assert algorithm.AlgorithmName == seg.SegmentSequence[0].SegmentAlgorithmName == name[:61] + "..."
    assert len(seg.SeriesDescription) == 64
