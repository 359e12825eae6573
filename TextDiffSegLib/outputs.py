"""Writers for results: segmentations (Slicer ``.seg.nrrd`` or plain label maps) and scalar maps.

Every writer refuses an existing output unless ``overwrite=True``, checks that the output folder
exists and is writable, and writes atomically (see ``volume.write_atomically``): a failed run leaves
no half-written file behind.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import terminology
from .errors import OutputError
from .volume import Volume, check_output_path, to_sitk, write_atomically, write_volume

SEGMENTATION_EXTENSION = ".seg.nrrd"
LABELMAP_EXTENSIONS = (".nii.gz", ".nii", ".nrrd")
SCALAR_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha")

_RESERVED_TAGS = ("TerminologyEntry", "Segmentation.Status")
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_REFERENCE_GEOMETRY_DESCRIPTION = (
    "Image geometry description string determining the geometry of the labelmap that is created in "
    "course of conversion. Can be copied from a volume, using the button."
)


@dataclass
class SegmentOutput:
    """One segment to write: what it is, where it is, and how it was made.

    ``mask`` is a ``[z, y, x]`` array on the reference volume's grid (non-zero = inside).
    ``tags`` are stored with the segment in a ``.seg.nrrd`` (for example prompt, model, seed,
    proposal); keys must not contain ``:`` or ``|``. ``name`` overrides the structure's display name
    (for example ``"liver (2)"`` when ``"liver"`` is taken).
    """

    structure: terminology.Structure
    mask: np.ndarray
    tags: dict[str, str] = field(default_factory=dict)
    name: str | None = None

    @property
    def display_name(self) -> str:
        """The name shown to the user: the override if given, else the structure's display name."""
        return self.name or self.structure.display_name


def write_segmentation(
    path: str | os.PathLike, reference: Volume, segments: list[SegmentOutput], overwrite: bool = False
) -> Path:
    """Write segments on the reference grid; the format follows the extension of ``path``.

    - ``.seg.nrrd``: a 3D Slicer segmentation: one labelmap layer, or several (a 4D NRRD) where
      segments overlap, with each segment's ID, name, colour, label value, layer, extent and tags
      (``TerminologyEntry`` plus ``segment.tags``) in Slicer's header fields.
    - ``.nii``, ``.nii.gz``, ``.nrrd``: a plain label map (``uint8``, or ``uint16`` beyond 255
      segments) holding 1..N for the segments in the order given; where segments overlap, the later
      segment wins. Beside it, a sidecar ``.json`` (``labelmap_sidecar``) names each value, as
      nnU-Net's ``dataset.json`` does, with each segment's terminology, colour and tags.

    Raises ``OutputError`` for an existing path (unless ``overwrite``), a missing or read-only
    folder, an unsupported extension, or a failed write; ``ValueError`` if a mask is not on the
    reference grid or a tag key is malformed. Returns the path.
    """
    path = check_segmentation_path(path, overwrite)  # fail before the work; write_atomically checks again
    is_slicer = path.name.lower().endswith(SEGMENTATION_EXTENSION)
    masks = [_mask_on_grid(segment, reference) for segment in segments]  # checked, not copied
    if is_slicer:
        segmentation = _slicer_segmentation(reference, segments, masks)
        return write_atomically(path, lambda temp_path: _write_seg_nrrd(temp_path, segmentation), overwrite)
    image = to_sitk(reference.with_array(_labelmap(masks, reference.array.shape)))
    sidecar = json.dumps(_label_names(segments), indent=2) + "\n"

    def write_both(temp_path: Path) -> None:  # the sidecar lands first, the label map last (write_atomically)
        sitk.WriteImage(image, str(temp_path), True)
        labelmap_sidecar(temp_path).write_text(sidecar)

    return write_atomically(path, write_both, overwrite)


def labelmap_sidecar(path: str | os.PathLike) -> Path:
    """The JSON file beside a label map that names its values: ``result.nii.gz`` -> ``result.json``."""
    path = Path(path)
    extension = next(e for e in LABELMAP_EXTENSIONS if path.name.lower().endswith(e))
    return path.with_name(path.name[: -len(extension)] + ".json")


def _label_names(segments: list[SegmentOutput]) -> dict:
    """A label map's sidecar: ``labels`` maps names to values (nnU-Net's form), ``segments`` describes each value."""
    return {
        "labels": {"background": 0, **{segment.display_name: value for value, segment in enumerate(segments, start=1)}},
        "segments": [{"value": value, "name": segment.display_name, "structure": segment.structure.name,
                      "terminology": terminology.terminology_entry(segment.structure),
                      "color": list(segment.structure.color), "tags": dict(segment.tags)}
                     for value, segment in enumerate(segments, start=1)],
    }


def write_scalar(path: str | os.PathLike, volume: Volume, overwrite: bool = False) -> Path:
    """Write a scalar map (for example the uncertainty) as ``float32`` NRRD, NIfTI or MHA, atomically.

    Raises ``OutputError`` as ``write_segmentation`` does. Returns the path.
    """
    path = check_scalar_path(path, overwrite)
    return write_volume(path, volume.with_array(np.asarray(volume.array, dtype=np.float32)), overwrite)


def check_segmentation_path(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Raise ``OutputError`` unless ``write_segmentation`` could write ``path`` (its type, existence, folder)."""
    path = Path(path)
    name = path.name.lower()
    if not any(name.endswith(extension) for extension in (SEGMENTATION_EXTENSION, *LABELMAP_EXTENSIONS)):
        raise OutputError(
            f"cannot write {path}: unsupported file type for a segmentation; use {SEGMENTATION_EXTENSION} "
            f"(3D Slicer) or a label map ending in {', '.join(LABELMAP_EXTENSIONS)}"
        )
    if not name.endswith(SEGMENTATION_EXTENSION):
        check_output_path(labelmap_sidecar(path), overwrite)
    return check_output_path(path, overwrite)


def check_outputs_apart(inputs: list[str | os.PathLike], outputs: list[str | os.PathLike]) -> None:
    """Raise ``OutputError`` where an output would replace an input or another output of the same run.

    An input is a file (with the data file a ``.nhdr`` or ``.mhd`` header names) or a folder (a DICOM
    series: nothing may be written inside it). Paths are compared as the files they lead to, after
    symbolic links and ``..``, and existing files also by identity (hard links). A label map's sidecar
    ``.json`` counts as an output too. ``--overwrite`` replaces earlier results, never these.
    """
    def real(path) -> Path:
        return Path(os.path.realpath(path))

    outputs = [Path(p) for p in outputs]
    outputs += [labelmap_sidecar(p) for p in outputs if _is_labelmap(p)]
    input_paths = [real(p) for path in inputs for p in _input_files(Path(path))]
    seen: dict[Path, Path] = {}
    for output in outputs:
        resolved = real(output)
        for source in input_paths:
            inside = source.is_dir() and resolved.is_relative_to(source)
            if resolved == source or inside or _same_file(resolved, source):
                where = f"inside the input folder {source}" if inside else f"the input {source}"
                raise OutputError(f"{output} is {where}; writing there would destroy that input. "
                                  "Choose an output path outside the input")
        if resolved in seen:
            same = f"{output} is named for two outputs" if seen[resolved] == output else \
                f"{seen[resolved]} and {output} are the same file"
            raise OutputError(f"{same}; give each output its own path")
        seen[resolved] = output


def _is_labelmap(path: Path) -> bool:
    name = path.name.lower()
    return not name.endswith(SEGMENTATION_EXTENSION) and any(name.endswith(e) for e in LABELMAP_EXTENSIONS)


def _input_files(path: Path) -> list[Path]:
    """The files (or folder) an input consists of: the path, and the data file a detached header names."""
    files = [path]
    if path.is_file() and path.suffix.lower() in (".nhdr", ".mhd"):
        with open(path, "rb") as header:
            text = header.read(65536).decode("latin-1")
        match = re.search(r"^(?:data file|ElementDataFile)\s*[:=]\s*(.+?)\s*$", text, re.MULTILINE)
        if match and match.group(1) not in ("LOCAL", "LIST") and not match.group(1).startswith("LIST"):
            files.append(path.parent / match.group(1))
    return files


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist yet
        return False


def check_scalar_path(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Raise ``OutputError`` unless ``write_scalar`` could write ``path`` (its type, existence, folder)."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(SEGMENTATION_EXTENSION) or not any(name.endswith(ext) for ext in SCALAR_EXTENSIONS):
        raise OutputError(
            f"cannot write {path}: unsupported file type for a scalar map; use one of {', '.join(SCALAR_EXTENSIONS)}"
        )
    return check_output_path(path, overwrite)


# --- label maps -------------------------------------------------------------------------------


def _mask_on_grid(segment: SegmentOutput, reference: Volume) -> np.ndarray:
    """The segment's mask as an array (non-zero = inside), checked to lie on the reference grid."""
    mask = np.asarray(segment.mask)
    if mask.shape != reference.array.shape:
        raise ValueError(
            f"mask of {segment.display_name!r} has shape {mask.shape}, not the reference grid's {reference.array.shape}"
        )
    return mask


def _labelmap(masks: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """Label values 1..N in the order of ``masks``; a later mask overwrites an earlier one."""
    dtype = np.uint8 if len(masks) <= np.iinfo(np.uint8).max else np.uint16
    if len(masks) > np.iinfo(np.uint16).max:
        raise ValueError(f"a label map holds at most {np.iinfo(np.uint16).max} segments, got {len(masks)}")
    labels = np.zeros(shape, dtype=dtype)
    for value, mask in enumerate(masks, start=1):
        labels[mask != 0] = value
    return labels


# --- Slicer .seg.nrrd -------------------------------------------------------------------------


def _slicer_segmentation(reference: Volume, segments: list[SegmentOutput], masks: list[np.ndarray]) -> dict:
    """A slicerio segmentation dict (voxels indexed [i, j, k], or [layer, i, j, k]) for the segments."""
    ijk_to_lps = _ijk_to_lps(reference)
    shape_ijk = tuple(reversed(reference.array.shape))
    layers, placements = _pack_layers(masks, reference.array.shape)
    if len(layers) <= 1:
        voxels = (layers[0] if layers else np.zeros(reference.array.shape, np.uint8)).T
    else:
        # [z, y, x, layer] in C order is the file's byte order; its transpose is slicerio's [layer, i, j, k].
        voxels = np.stack(layers, axis=-1).T
    segmentation = {
        "voxels": voxels,
        "ijkToLPS": ijk_to_lps,
        "masterRepresentation": "Binary labelmap",
        "containedRepresentationNames": ["Binary labelmap"],
        "referenceImageExtentOffset": [0, 0, 0],
        # Written as a raw header field: slicerio's "conversionParameters" omits the closing "&"
        # without which Slicer (5.12) ignores the last parameter. Slicer keeps defaults for the others.
        "Segmentation_ConversionParameters": (
            f"Reference image geometry|{_reference_image_geometry(ijk_to_lps, shape_ijk)}|"
            f"{_REFERENCE_GEOMETRY_DESCRIPTION}&"
        ),
        "segments": [],
    }
    used_ids: set[str] = set()
    for segment, (layer, label, extent) in zip(segments, placements):
        segment_id = _unique_id(_header_text(segment.structure.name) or "Segment", used_ids)
        used_ids.add(segment_id)
        tags = {"TerminologyEntry": _header_text(terminology.terminology_entry(segment.structure))}
        for key, value in segment.tags.items():
            tags[_tag_key(key)] = _tag_value(value)
        segmentation["segments"].append(
            {
                "id": segment_id,
                "name": _header_text(segment.display_name),
                "nameAutoGenerated": False,
                "color": [round(channel / 255.0, 6) for channel in segment.structure.color],
                "colorAutoGenerated": False,
                "labelValue": label,
                "layer": layer,
                "extent": extent,
                "tags": tags,
            }
        )
    return segmentation


def _pack_layers(masks: list[np.ndarray], shape: tuple[int, ...]) -> tuple[list[np.ndarray], list[tuple]]:
    """Label layers ([z, y, x] uint8) holding the masks, and each mask's (layer, label value, extent).

    A mask goes to the first layer where it overlaps no earlier mask and a label value is free (at
    most 255 per layer), else to a new layer, as Slicer stores segments. Label values count from 1
    in each layer. Extents are Slicer's (i_min, i_max, j_min, j_max, k_min, k_max); every segment of
    a layer gets the layer's extent (the union of its segments'), as Slicer itself writes them: some
    Slicer versions read a layer with its first segment's extent, cropping the others.
    """
    layers: list[np.ndarray] = []
    labels_used: list[int] = []
    placements: list[list] = []
    for mask in masks:
        box = _bounding_box(mask)
        inside = None if box is None else mask[box] != 0
        for index, layer in enumerate(layers):
            if labels_used[index] < 255 and (box is None or not np.any(layer[box][inside])):
                break
        else:
            layers.append(np.zeros(shape, np.uint8))
            labels_used.append(0)
            index = len(layers) - 1
        labels_used[index] += 1
        if box is not None:
            layers[index][box][inside] = labels_used[index]
        placements.append([index, labels_used[index], box])
    for index in range(len(layers)):
        boxes = [box for layer, _, box in placements if layer == index and box is not None]
        extent = [0, -1, 0, -1, 0, -1]
        if boxes:
            extent = []
            for axis in (2, 1, 0):  # i = x, j = y, k = z
                extent += [min(b[axis].start for b in boxes), max(b[axis].stop for b in boxes) - 1]
        for placement in placements:
            if placement[0] == index:
                placement[2] = extent
    return layers, [tuple(placement) for placement in placements]


def _bounding_box(mask: np.ndarray) -> tuple[slice, slice, slice] | None:
    """The slices ([z, y, x]) enclosing the mask's non-zero voxels, or None for an empty mask."""
    box = []
    for axis in range(3):
        hits = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(3) if a != axis)))
        if hits.size == 0:
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def _write_seg_nrrd(path: Path, segmentation: dict) -> None:
    """Write a segmentation dict with slicerio (gzip level 1: masks compress well even so)."""
    import slicerio

    slicerio.write_segmentation(str(path), segmentation, compression_level=1)


def _ijk_to_lps(volume: Volume) -> np.ndarray:
    """The 4x4 matrix from voxel index (i, j, k) = (x, y, z) to LPS mm."""
    matrix = np.eye(4)
    matrix[:3, :3] = np.asarray(volume.direction, dtype=float).reshape(3, 3) * np.asarray(volume.spacing, dtype=float)
    matrix[:3, 3] = volume.origin
    return matrix


def _reference_image_geometry(ijk_to_lps: np.ndarray, shape_ijk: tuple[int, int, int]) -> str:
    """Slicer's serialised image geometry: the IJK-to-RAS matrix (row-major) then the extent, ';'-separated."""
    ijk_to_ras = _LPS_TO_RAS @ ijk_to_lps
    values = [repr(float(v)) for v in ijk_to_ras.ravel()]
    values += [str(v) for size in shape_ijk for v in (0, size - 1)]
    return "".join(f"{v};" for v in values)


def _unique_id(base: str, used: set[str]) -> str:
    """``base``, or ``base_2``, ``base_3``... whichever is not used yet."""
    candidate, number = base, 2
    while candidate in used:
        candidate, number = f"{base}_{number}", number + 1
    return candidate


def _header_text(text: str) -> str:
    """Text fit for a NRRD header line: ASCII (accents dropped, other characters as '?'), one line."""
    text = unicodedata.normalize("NFKD", str(text))
    text = "".join(c for c in text if not unicodedata.combining(c))
    text = re.sub(r"[\r\n\t]+", " ", text)
    return text.encode("ascii", "replace").decode("ascii")


def _tag_key(key: str) -> str:
    """A tag key, refused if Slicer could not read it back (``:`` and ``|`` delimit tags)."""
    key = _header_text(key)
    if not key or ":" in key or "|" in key:
        raise ValueError(f"segment tag key {key!r} must be non-empty without ':' or '|'")
    if key in _RESERVED_TAGS:
        raise ValueError(f"segment tag key {key!r} is reserved (it is set from the structure)")
    return key


def _tag_value(value: object) -> str:
    """A tag value fit for Slicer's ``key:value|`` list: ``|`` (the separator) becomes ``/``."""
    return _header_text(str(value)).replace("|", "/")
