"""A 3D image as plain data: voxels plus the geometry that places them in patient space.

Besides the ``Volume`` dataclass this module reads and writes volumes:

- ``read_volume(path)`` reads NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``), MetaImage
  (``.mha``, ``.mhd``) files, or a folder holding a DICOM series. Anything that is not a 3D scalar
  volume raises ``InputImageError`` with a message a user can act on.
- ``dicom_series_files(folder)`` lists the files of the DICOM series ``read_volume`` reads from a folder.
- ``write_volume(path, volume)`` writes the same file formats, atomically (see ``write_atomically``).
- ``to_sitk`` / ``from_sitk`` convert to and from ``SimpleITK.Image``; ``as_volume`` takes whatever a
  user passes for a scan (a path, a ``Volume`` or a ``SimpleITK.Image``).
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from .errors import InputImageError, OutputError

#: File name endings ``read_volume`` and ``write_volume`` accept (lower case; matched case-insensitively).
VOLUME_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")

SUPPORTED_INPUTS = "a 3D scalar volume (NIfTI, NRRD, MHA or a DICOM series folder)"


@dataclass
class Volume:
    """Voxels and geometry, in SimpleITK's conventions.

    ``array`` is indexed ``[z, y, x]`` (as ``SimpleITK.GetArrayFromImage`` returns it);
    ``spacing`` and ``origin`` are ``(x, y, z)`` in mm, in LPS patient coordinates;
    ``direction`` is the 3x3 direction-cosine matrix, row-major, 9 floats.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    def with_array(self, array: np.ndarray) -> "Volume":
        """The same geometry holding other voxels (for example a mask of this image)."""
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} differs from the volume's {self.array.shape}")
        return Volume(array, self.spacing, self.origin, self.direction)


# --- conversion -------------------------------------------------------------------------------


def to_sitk(volume: Volume) -> sitk.Image:
    """A ``SimpleITK.Image`` with the volume's voxels (copied) and geometry.

    Boolean arrays become ``uint8`` and ``float16`` arrays ``float32`` (SimpleITK has neither type).
    """
    array = np.asarray(volume.array)
    if array.ndim != 3:
        raise ValueError(f"a Volume array must be 3D [z, y, x], got shape {array.shape}")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    elif array.dtype == np.float16:
        array = array.astype(np.float32)
    image = sitk.GetImageFromArray(array, isVector=False)
    image.SetSpacing([float(v) for v in volume.spacing])
    image.SetOrigin([float(v) for v in volume.origin])
    image.SetDirection([float(v) for v in volume.direction])
    return image


def from_sitk(image: sitk.Image, source: str = "the image") -> Volume:
    """A ``Volume`` holding a copy of a 3D scalar ``SimpleITK.Image``.

    Raises ``InputImageError`` for a 2D, 4D or multi-component (vector, RGB, complex) image; the
    message names the image by ``source`` (for example its path).
    """
    _check_3d_scalar(image.GetDimension(), image.GetNumberOfComponentsPerPixel(), source)
    spacing = image.GetSpacing()
    if not all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise InputImageError(f"{source} has a voxel spacing of {tuple(spacing)} mm; spacings must be positive. "
                              "Fix the image's header (its voxel size) and try again")
    return Volume(
        array=sitk.GetArrayFromImage(image),
        spacing=tuple(float(v) for v in image.GetSpacing()),
        origin=tuple(float(v) for v in image.GetOrigin()),
        direction=tuple(float(v) for v in image.GetDirection()),
    )


# --- reading ----------------------------------------------------------------------------------


def as_volume(image: "Volume | sitk.Image | str | os.PathLike") -> Volume:
    """The scan a user passed, as a ``Volume``: a ``Volume`` itself, a ``SimpleITK.Image``, or a file or
    DICOM folder path (read with ``read_volume``). Anything else raises ``InputImageError`` saying what to pass."""
    if isinstance(image, Volume):
        return image
    if isinstance(image, sitk.Image):
        return from_sitk(image, "the SimpleITK image")
    if isinstance(image, (str, os.PathLike)):
        return read_volume(image)
    hint = (" A numpy array has no voxel spacing or position: wrap it as Volume(array, spacing=(x, y, z), "
            "origin=(x, y, z)) with the scan's real geometry, or pass the file it came from."
            if isinstance(image, np.ndarray) else "")
    raise InputImageError(f"cannot segment a {type(image).__name__}: pass the scan as a file or DICOM folder path, a "
                          f"TextDiffSegLib.volume.Volume or a SimpleITK.Image.{hint}")


def read_volume(path: str | os.PathLike, what: str = "input image") -> Volume:
    """Read a 3D scalar volume from a file or from a folder holding a DICOM series.

    For a folder, the DICOM series with the most files is read (subfolders are not searched).
    Raises ``InputImageError`` if the path is missing, unreadable, not a supported format, or not a
    3D scalar volume (2D, 4D and vector/RGB images are refused; a 3D image of one slice is fine), or if
    its header gives a voxel spacing that is not positive. Messages call the file ``what`` (for example
    "label map").
    """
    path = Path(path)
    if not path.exists():
        raise InputImageError(f"{what} {path} does not exist")
    if path.is_dir():
        return _read_dicom_folder(path)
    extension = volume_extension(path)
    if extension is None:
        hint = " (for DICOM, give the folder that holds the series)" if path.suffix.lower() in (".dcm", ".ima") else ""
        raise InputImageError(
            f"cannot read {path}: unsupported file type{hint}; TextDiffSeg expects {SUPPORTED_INPUTS}, "
            f"as a file ending in {', '.join(VOLUME_EXTENSIONS)}"
        )
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        _check_3d_scalar(reader.GetDimension(), reader.GetNumberOfComponents(), str(path))
        if extension in (".nii", ".nii.gz"):
            _check_nifti_header(path)
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputImageError(
            f"cannot read {path}: {_sitk_reason(exc)}; it may be corrupt or not a {extension} image. "
            f"TextDiffSeg expects {SUPPORTED_INPUTS}"
        ) from None
    return from_sitk(image, str(path))


def _read_dicom_folder(folder: Path) -> Volume:
    """The DICOM series with the most files in ``folder``, as a volume."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(dicom_series_files(folder))
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputImageError(f"cannot read the DICOM series in {folder}: {_sitk_reason(exc)}") from None
    return from_sitk(image, f"the DICOM series in {folder}")


def dicom_series_files(folder: str | os.PathLike) -> list[str]:
    """The files of the DICOM series ``read_volume`` reads from ``folder``: the series with the most files
    (subfolders are not searched). Raises ``InputImageError`` where the folder holds no DICOM series."""
    folder = Path(folder)
    warnings_were_shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # GDCM warns on stderr when there is no series
    try:
        series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
        series = [sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid) for sid in series_ids]
    except RuntimeError as exc:
        raise InputImageError(f"cannot read the DICOM folder {folder}: {_sitk_reason(exc)}") from None
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings_were_shown)
    series = [files for files in series if files]
    if not series:
        raise InputImageError(
            f"no DICOM series found in the folder {folder} (subfolders are not searched); "
            f"TextDiffSeg expects {SUPPORTED_INPUTS}"
        )
    return list(max(series, key=len))


def _check_3d_scalar(dimension: int, components: int, what: str) -> None:
    """Raise ``InputImageError`` unless the image is 3D with one component per voxel."""
    if dimension != 3:
        raise InputImageError(f"{what} is a {dimension}D image; TextDiffSeg expects {SUPPORTED_INPUTS}")
    if components != 1:
        raise InputImageError(
            f"{what} has {components} components per voxel (a vector, RGB or complex image); "
            f"TextDiffSeg expects {SUPPORTED_INPUTS}"
        )


def _sitk_reason(exc: Exception) -> str:
    """The useful end of a SimpleITK exception message, without source files and object addresses."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Exception thrown in SimpleITK"):
        lines = lines[1:]
    lines = [re.sub(r"^.*?ERROR: (\w+\(0x[0-9a-fA-F]+\): )?", "", line) for line in lines]
    if not lines:
        return type(exc).__name__
    if len(lines) > 1 and lines[-1].startswith("Reason:"):
        # MetaImage appends a stale errno ("No such file or directory") to errors about existing files.
        if "No such file or directory" in lines[-1]:
            return lines[-2]
        return f"{lines[-2]} ({lines[-1]})"
    return lines[-1]


def _check_nifti_header(path: Path) -> None:
    """Raise ``InputImageError`` where ITK's NIfTI reader would silently read something else: a file
    holding fewer voxel bytes than its header promises (ITK fills the rest with zeros), or a voxel
    spacing (``pixdim``) that is not positive (ITK takes 0 as 1 mm, so the scan would be segmented at a
    wrong size, and a negative one as a mirrored axis, which swaps left and right).

    For ``.nii.gz`` the gzip trailer (uncompressed size modulo 2**32) is checked first; only if it
    disagrees is the stream decompressed to count. A header this cannot parse is left to ITK.
    """
    compressed = path.name.lower().endswith(".gz")
    try:
        opener = gzip.open if compressed else open
        with opener(path, "rb") as stream:
            header = stream.read(540)
        parsed = _nifti_header(header)
        if parsed is None:
            return
        expected, spacing = parsed
        if not all(np.isfinite(spacing) & (np.asarray(spacing) > 0)):
            raise InputImageError(
                f"cannot read {path}: its header gives a voxel spacing (pixdim) of {spacing} mm, which NIfTI requires to "
                "be positive (ITK would read 0 as 1 mm, and a negative spacing as an axis mirrored against the header's "
                "own orientation); fix the header's pixdim (the voxel size) and try again"
            )
        if not compressed:
            complete = path.stat().st_size >= expected
        else:
            with open(path, "rb") as raw:
                raw.seek(-4, os.SEEK_END)
                trailer_size = struct.unpack("<I", raw.read(4))[0]
            complete = trailer_size == expected % 2**32 or _stream_length_at_least(path, expected)
    except (OSError, EOFError, zlib.error, struct.error):
        complete = False
    if not complete:
        raise InputImageError(
            f"cannot read {path}: the file is truncated or corrupt (fewer voxels than its header describes); "
            f"TextDiffSeg expects {SUPPORTED_INPUTS}"
        )


def _nifti_header(header: bytes) -> tuple[int, tuple[float, float, float]] | None:
    """Bytes a NIfTI-1 or NIfTI-2 file needs (voxel offset plus voxel data) and its spacing (pixdim[1:4]),
    or None if not a NIfTI header."""
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            pixdim = struct.unpack(endian + "8f", header[76:108])
            offset = int(struct.unpack(endian + "f", header[108:112])[0])
            break
        if len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            dims = struct.unpack(endian + "8q", header[16:80])
            pixdim = struct.unpack(endian + "8d", header[104:168])
            offset = struct.unpack(endian + "q", header[168:176])[0]
            break
    else:
        return None
    if not 1 <= dims[0] <= 7 or bitpix <= 0:
        return None
    count = 1
    for size in dims[1 : dims[0] + 1]:
        count *= max(int(size), 1)
    return max(offset, 0) + count * bitpix // 8, tuple(float(v) for v in pixdim[1:4])


def _stream_length_at_least(path: Path, length: int) -> bool:
    """Whether the gzip file at ``path`` decompresses to at least ``length`` bytes."""
    remaining = length
    with gzip.open(path, "rb") as stream:
        while remaining > 0:
            chunk = stream.read(min(remaining, 1 << 24))
            if not chunk:
                return False
            remaining -= len(chunk)
    return True


def volume_extension(path: str | os.PathLike) -> str | None:
    """The supported volume extension ``path`` ends with (lower case), or None."""
    name = Path(path).name.lower()
    for extension in VOLUME_EXTENSIONS:
        if name.endswith(extension) and len(name) > len(extension):
            return extension
    return None


# --- writing ----------------------------------------------------------------------------------


def write_volume(path: str | os.PathLike, volume: Volume, overwrite: bool = False) -> Path:
    """Write a volume (any voxel type SimpleITK supports) to NIfTI, NRRD or MetaImage, atomically.

    The format follows the extension (see ``VOLUME_EXTENSIONS``); the file is compressed where the
    format allows. Raises ``OutputError`` if the path exists (unless ``overwrite``), its folder is
    missing or read-only, the extension is not supported, or writing fails. Returns the path.
    """
    path = Path(path)
    if volume_extension(path) is None:
        raise OutputError(f"cannot write {path}: unsupported file type; use one of {', '.join(VOLUME_EXTENSIONS)}")
    image = to_sitk(volume)
    write_atomically(path, lambda temp_path: sitk.WriteImage(image, str(temp_path), True), overwrite)
    return path


def check_output_path(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Raise ``OutputError`` unless ``path`` may be written: absent (or ``overwrite``) and in a folder where
    a file can really be created (tried, so that ``/proc`` or a full or read-only disk fails here, before
    any work)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path} is a folder; give a file name to write to")
    if path.exists() and not overwrite:
        raise OutputError(f"{path} exists; pass --overwrite or choose another path")
    check_folder(path.parent, f"cannot write {path}: ")
    return path


def check_folder(folder: Path, context: str = "") -> None:
    """Raise ``OutputError`` (its message starting with ``context``) unless files can be created in ``folder``."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise OutputError(f"{context}{existing} is a file, not a folder")
    if not folder.is_dir():
        raise OutputError(f"{context}the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{context}the folder {folder} is not writable")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".tmp-", dir=folder))
    except OSError as exc:
        raise OutputError(f"{context}files cannot be created in the folder {folder} ({exc.strerror or exc})") from None


def write_atomically(
    path: str | os.PathLike, write: Callable[[Path], object], overwrite: bool = False
) -> Path:
    """Run ``write(temp_path)`` then move the result to ``path``, so a failure leaves nothing behind.

    ``temp_path`` has the same file name as ``path`` (so writers that pick a format by extension work)
    inside a new hidden folder ``.tmp-*`` next to ``path``, on the same file system, so the final
    ``os.replace`` is atomic. Files the writer puts beside the main one (the data file of a detached
    ``.nhdr``/``.mhd`` header) are moved first and the main file last. The temporary folder is always
    removed. ``RuntimeError``/``OSError`` from the writer become ``OutputError``; other exceptions pass.
    """
    path = check_output_path(path, overwrite)
    folder = path.parent
    try:
        temp_folder = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder))
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        temp_path = temp_folder / path.name
        try:
            write(temp_path)
        except (RuntimeError, OSError) as exc:
            raise OutputError(f"could not write {path}: {_sitk_reason(exc)}") from exc
        if not temp_path.is_file():
            raise OutputError(f"could not write {path}: the writer produced no file")
        companions = [item for item in temp_folder.iterdir() if item.name != path.name]
        for item in companions:
            if (folder / item.name).exists() and not overwrite:
                raise OutputError(f"{folder / item.name} exists; pass --overwrite or choose another path")
        try:
            for item in companions:
                os.replace(item, folder / item.name)
            os.replace(temp_path, path)
        except OSError as exc:
            raise OutputError(f"could not write {path}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(temp_folder, ignore_errors=True)
    return path
