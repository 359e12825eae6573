"""A cohort: many scans segmented in one run (``textdiffseg segment -i FOLDER|LIST.txt -o OUT_FOLDER``).

- ``is_cohort(input, output)``: whether a command line names a cohort rather than one scan.
- ``list_scans(source)``: the scans of a folder or of a list file, sorted.
- ``part(scans, num_parts, part_id)``: this process's share when several split a cohort, as nnU-Net does.
- ``scan_names(scans)``: each scan's name for its outputs, refused where two would share one.
- ``run_cohort(scans, is_done, segment)``: segment each scan that is not done yet, going on past failures.

Everything here is plain Python: the command line (``cli``) wires it to the segmenter and the writers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import InputImageError, SettingsError
from .volume import volume_extension

LIST_SUFFIX = ".txt"

#: Endings of the file names ``-o`` takes for one scan; an ``-o`` without one of them is a cohort's folder.
SINGLE_OUTPUT_EXTENSIONS = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".dcm")


def is_cohort(input_path: str | os.PathLike, output: str | os.PathLike) -> bool:
    """A cohort is a folder or a ``.txt`` list given as the input with an ``-o`` that is no segmentation file
    name (a folder); anything else is one scan, as it always was (a DICOM series folder with ``-o x.seg.nrrd``)."""
    if Path(output).name.lower().endswith(SINGLE_OUTPUT_EXTENSIONS):
        return False
    return Path(input_path).is_dir() or Path(input_path).name.lower().endswith(LIST_SUFFIX)


def list_scans(source: str | os.PathLike, exclude: tuple[Path, ...] = ()) -> list[Path]:
    """The scans of a cohort, sorted: in a folder, its NIfTI, NRRD and MHA files and its subfolders (each a DICOM
    series; hidden entries and the folders in ``exclude``, such as the run's output folders, are left out); in
    a list file, one path per line (blank lines and lines starting with ``#`` ignored, relative paths relative to
    the list's folder). Raises ``InputImageError`` where there is none, or the list cannot be read."""
    source = Path(source)
    if source.is_dir():
        excluded = {Path(os.path.realpath(folder)) for folder in exclude}
        scans = [entry for entry in source.iterdir() if not entry.name.startswith(".")
                 and (volume_extension(entry) is not None and entry.is_file()
                      or entry.is_dir() and Path(os.path.realpath(entry)) not in excluded)]
        if not scans:
            raise InputImageError(
                f"no scans found in the folder {source}: a cohort folder holds NIfTI, NRRD or MHA files, or folders "
                "each holding a DICOM series (a folder holding one DICOM series is one scan: give -o a file name "
                "such as result.seg.nrrd)")
        return sorted(scans)
    try:
        lines = source.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputImageError(f"cannot read the list of scans {source}: {getattr(exc, 'strerror', None) or exc}; "
                              "a list is a text file of one scan path per line") from None
    scans = {source.parent / line.strip() for line in lines if line.strip() and not line.strip().startswith("#")}
    if not scans:
        raise InputImageError(f"the list {source} names no scans: write one scan path per line")
    return sorted(scans)


def part(scans: list[Path], num_parts: int, part_id: int) -> list[Path]:
    """Part ``part_id`` of ``num_parts`` of the sorted ``scans``: every ``num_parts``-th scan from the
    ``part_id``-th, so that the parts 0 to ``num_parts - 1`` together hold each scan once. Raises
    ``SettingsError`` for numbers out of range."""
    if num_parts < 1:
        raise SettingsError(f"--num-parts must be 1 or more (the number of processes sharing the cohort), not {num_parts}")
    if not 0 <= part_id < num_parts:
        raise SettingsError(f"--part-id must be from 0 to {num_parts - 1} (with --num-parts {num_parts}; the first "
                            f"part is 0, as SLURM_ARRAY_TASK_ID counts with --array=0-{num_parts - 1}), not {part_id}")
    return sorted(scans)[part_id::num_parts]


def scan_names(scans: list[Path]) -> dict[Path, str]:
    """Each scan's name for its outputs: a file's name without its extension, a folder's name. Raises
    ``InputImageError`` where two scans have the same name (their outputs would be one file)."""
    names: dict[str, Path] = {}
    for scan in scans:
        extension = volume_extension(scan)
        name = scan.name[: -len(extension)] if extension else scan.name
        if name in names:
            raise InputImageError(f"the scans {names[name]} and {scan} have the same name, {name!r}, and their outputs "
                                  "would be one file: rename one, or segment them in runs with different -o folders")
        names[name] = scan
    return {scan: name for name, scan in names.items()}


@dataclass
class CohortRun:
    """What became of each scan of a run: segmented now, skipped (done before), or failed (with the error)."""

    segmented: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, Exception]] = field(default_factory=list)


def run_cohort(scans: list[Path], is_done: Callable[[Path], bool], segment: Callable[[Path], object],
               progress: Callable[[Path, str, Exception | None], None] = lambda *done: None) -> CohortRun:
    """Call ``segment(scan)`` for each scan not ``is_done``; an ``Exception`` it raises fails that scan alone (an
    interrupt stops the run). ``progress(scan, outcome, error)`` follows each scan, the outcome "segmented",
    "skipped" or "failed" (with the error; else None)."""
    run = CohortRun()
    for scan in scans:
        if is_done(scan):
            run.skipped.append(scan)
            progress(scan, "skipped", None)
            continue
        try:
            segment(scan)
        except Exception as error:  # noqa: BLE001 - reported with the scan at the end of the run
            run.failed.append((scan, error))
            progress(scan, "failed", error)
        else:
            run.segmented.append(scan)
            progress(scan, "segmented", None)
    return run
