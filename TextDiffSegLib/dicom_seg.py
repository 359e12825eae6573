"""DICOM Segmentation (SEG) output: masks segmented from a DICOM series, written with highdicom as one SEG
object that refers to that series' images, with each segment's terminology codes and the model that made it.

- ``check_dicom_seg_output(path, input_path, overwrite)``: refuses, before any work, a SEG output for an
  input that is no DICOM series folder, or an output path that may not be written.
- ``read_source_series(folder, reference)``: the headers of the series' images, one per slice of the
  volume read from the folder (``volume.read_volume``), in slice order.
- ``write_dicom_seg(path, source, segments, algorithm_name)``: writes the SEG, atomically.
"""

from __future__ import annotations

import os
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes

from . import __version__
from .errors import OutputError
from .outputs import SegmentOutput
from .volume import Volume, check_output_path, dicom_series_files, write_atomically

MANUFACTURER = "TextDiffSeg"
#: highdicom requires a device serial number; software has none.
DEVICE_SERIAL_NUMBER = "none"
#: The SEG's series number, above the numbers scanners usually give their series.
SERIES_NUMBER = 1000

#: What a SEG refers to in each source image; anonymisation sometimes empties these.
_REFERENCED_ATTRIBUTES = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
                          "FrameOfReferenceUID", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
#: How far an image may be off a slice of the volume read from its series: its position in voxels, its
#: orientation in direction cosines, its pixel spacing as a fraction.
_TOLERANCE = 0.01
_INSTEAD = "write OUTPUT.seg.nrrd (3D Slicer) or OUTPUT.nii.gz (label map) instead"


def check_dicom_seg_output(path: str | os.PathLike, input_path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Raise ``OutputError`` where the input is a file (a SEG refers to the DICOM series it segments, which
    only a series folder gives), or ``path`` may not be written (see ``volume.check_output_path``)."""
    if Path(input_path).is_file():
        raise OutputError(f"cannot write {path}: a DICOM SEG refers to the DICOM series it segments, and the input "
                          f"{input_path} is a file, not a DICOM series folder; give the series' folder as the input, "
                          f"or {_INSTEAD}")
    return check_output_path(path, overwrite)


def read_source_series(folder: str | os.PathLike, reference: Volume) -> list:
    """The headers (``pydicom.Dataset``, without pixels) of the series ``read_volume`` read from ``folder``,
    one per slice of ``reference`` (the volume it read), in slice order.

    Each image goes to the slice its position (ImagePositionPatient) falls on, whatever the order of the files.
    Raises ``OutputError`` where an image lacks what a SEG refers to (UIDs, position, orientation, spacing),
    is a multi-frame image, or does not lie on a slice of ``reference`` (unevenly spaced or tilted slices,
    which the volume was read past).
    """
    folder = Path(folder)
    try:
        images = [pydicom.dcmread(file, stop_before_pixels=True) for file in dicom_series_files(folder)]
    except (pydicom.errors.InvalidDicomError, OSError) as exc:
        raise OutputError(f"cannot read the DICOM series in {folder} for a DICOM SEG: {exc}") from None
    missing = sorted({name for image in images for name in _REFERENCED_ATTRIBUTES if not image.get(name)})
    if missing:
        raise OutputError(f"the images of the DICOM series in {folder} lack {', '.join(missing)} (anonymisation may "
                          f"have emptied them), which a DICOM SEG must refer to; {_INSTEAD}")
    if any(int(image.get("NumberOfFrames") or 1) > 1 for image in images):
        raise OutputError(f"the DICOM series in {folder} holds multi-frame images; TextDiffSeg writes a DICOM SEG for "
                          f"a series of single-frame images only; {_INSTEAD}")
    by_slice = {}
    for image in images:
        slice_index = _slice_index(image, reference)
        if slice_index is None or slice_index in by_slice:
            raise OutputError(f"the images of the DICOM series in {folder} do not lie one on each slice of the volume "
                              f"read from it (unevenly spaced or tilted slices?), so a DICOM SEG would misplace the "
                              f"masks; {_INSTEAD}")
        by_slice[slice_index] = image
    return [by_slice[k] for k in range(reference.array.shape[0])]


def _slice_index(image, reference: Volume) -> int | None:
    """The slice (z index) of ``reference`` that the image is, or None where it is none of them: its first
    pixel must lie on the slice's first voxel, and its rows, columns, orientation and pixel spacing must match."""
    depth, rows, columns = reference.array.shape
    direction = np.reshape(reference.direction, (3, 3))
    spacing = np.asarray(reference.spacing, dtype=float)
    index = np.linalg.solve(direction * spacing, np.asarray(image.ImagePositionPatient, float) - reference.origin)
    slice_index = int(round(index[2]))
    on_grid = (np.all(np.abs(index - [0, 0, slice_index]) < _TOLERANCE) and 0 <= slice_index < depth
               and (int(image.Rows), int(image.Columns)) == (rows, columns)
               and np.allclose(np.asarray(image.ImageOrientationPatient, float), direction[:, :2].T.ravel(),
                               atol=_TOLERANCE)
               # PixelSpacing is (between rows, between columns): (y, x).
               and np.allclose(np.asarray(image.PixelSpacing, float), spacing[[1, 0]], rtol=_TOLERANCE))
    return slice_index if on_grid else None


def write_dicom_seg(path: str | os.PathLike, source: list, segments: list[SegmentOutput], algorithm_name: str,
                    overwrite: bool = False) -> Path:
    """Write ``segments`` as a binary DICOM SEG referring to ``source`` (``read_source_series``), atomically.

    Segment k (from 1) is ``segments[k - 1]``: labelled with its display name, coded with its structure's
    category, type and type modifier (``terminology``), coloured with its structure's colour, and made
    automatically by the algorithm ``algorithm_name`` (the model), version the package's, with the segment's
    tags as its parameters. Masks are ``[z, y, x]`` on the source grid: slice k on ``source[k]``; frames
    without any segment are left out. Raises ``OutputError`` as ``volume.write_atomically`` does,
    ``ValueError`` if a mask is not on the source grid. Returns the path.
    """
    path = check_output_path(path, overwrite)
    shape = (len(source), int(source[0].Rows), int(source[0].Columns))
    for segment in segments:
        if np.shape(segment.mask) != shape:
            raise ValueError(f"mask of {segment.display_name!r} has shape {np.shape(segment.mask)}, not the DICOM "
                             f"series' {shape}")
    algorithm_name = _long_string(algorithm_name)  # an ensemble's: its models' names, in full in each segment's tags
    descriptions = [_segment_description(number, segment, algorithm_name)
                    for number, segment in enumerate(segments, start=1)]
    pixels = np.stack([np.asarray(segment.mask) != 0 for segment in segments], axis=-1)  # [slice, row, column, segment]
    seg = hd.seg.Segmentation(
        source_images=source,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MANUFACTURER,
        software_versions=__version__,
        device_serial_number=DEVICE_SERIAL_NUMBER,
        series_description=_long_string(f"TextDiffSeg {algorithm_name}"),
        omit_empty_frames=bool(pixels.any()),  # all empty: every frame is kept (highdicom would warn, then do so)
    )
    return write_atomically(path, lambda temp_path: seg.save_as(temp_path), overwrite)


def _segment_description(number: int, segment: SegmentOutput, algorithm_name: str):
    """highdicom's description of one segment: label, terminology codes, colour and algorithm."""
    structure = segment.structure
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=segment.display_name,
        segmented_property_category=_coded(structure.category),
        segmented_property_type=_coded(structure.type),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=algorithm_name, family=codes.cid7162.ArtificialIntelligence, version=__version__,
            parameters=dict(segment.tags) or None),
        display_color=hd.color.CIELabColor.from_rgb(*structure.color),
    )
    if structure.type_modifier is not None:  # highdicom takes no modifier: it goes inside the type's code item
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            _coded(structure.type_modifier)]
    return description


def _long_string(text: str) -> str:
    """``text`` as a DICOM LO value: 64 characters at most, cut with "..." where longer."""
    return text if len(text) <= 64 else text[:61] + "..."


def _coded(code: tuple[str, str, str]):
    """A terminology table code (coding scheme, code value, code meaning) as a highdicom coded concept."""
    scheme, value, meaning = code
    return hd.sr.CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)
