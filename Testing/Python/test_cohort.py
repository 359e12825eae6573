"""A cohort: ``textdiffseg segment -i FOLDER|LIST.txt -o OUT_FOLDER`` segments every scan with one model, skips
what an earlier run wrote, goes on past a scan that fails and lists it, and splits over processes with
``--num-parts/--part-id``. Real scans (TotalSegmentator's small CT as NIfTI and as a DICOM series, a crop of a
BTCV CT as MHA) and the tiny model of ``conftest`` (``--steps 2 --proposals 2``), about a second a scan."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import SimpleITK as sitk
from test_dicom_seg import example_series, series  # noqa: F401 - fixtures: a DICOM series with its UIDs

from TextDiffSegLib import cli
from TextDiffSegLib.cohort import part

FAST = ["--steps", "2", "--proposals", "2"]
SCANS = ["btcv", "ct", "series"]  # the outputs' names; broken.nii.gz fails


@pytest.fixture
def cohort(shared_data, tmp_path) -> Path:
    """A folder of three real scans (NIfTI, MHA, a DICOM series folder) and a corrupt file."""
    folder = tmp_path / "cohort"
    folder.mkdir()
    shutil.copy(shared_data / "totalseg_examples" / "example_ct_sm.nii.gz", folder / "ct.nii.gz")
    shutil.copytree(shared_data / "totalseg_examples" / "example_ct_dicom", folder / "series")
    btcv = sitk.ReadImage(str(shared_data / "btcv" / "imagesTr" / "btcv_0005.nii.gz"))
    sitk.WriteImage(btcv[::4, ::4, 40:64], str(folder / "btcv.mha"))
    (folder / "broken.nii.gz").write_bytes(b"no image" * 50)
    (folder / "notes.md").write_text("not a scan, left out")
    return folder


def segment(capsys, tiny_model_dir, source, output, *extra) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main([str(a) for a in ["segment", "-i", source, "-o", output, "-p", "liver", "--model", tiny_model_dir,
                                      *FAST, "--progress", "none", *extra]])
    out, err = capsys.readouterr()
    return code, out, err


def outputs(folder: Path) -> dict[str, int]:
    """The files in ``folder`` by name, with their modification times."""
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} if folder.is_dir() else {}


def test_a_folder_is_segmented_once_and_a_failure_listed(capsys, tiny_model_dir, cohort, tmp_path):
    out = tmp_path / "out" / "segmentations"  # created
    code, stdout, err = segment(capsys, tiny_model_dir, cohort, out)
    assert code == 2
    assert sorted(outputs(out)) == [f"{name}.seg.nrrd" for name in SCANS]
    assert "4 scans: 3 segmented, 0 skipped" in stdout and "1 failed" in stdout
    assert all(f"wrote {out / name}.seg.nrrd" in stdout for name in SCANS)
    failed = [line for line in err.splitlines() if line.startswith("textdiffseg: failed: ")]
    assert failed == [line for line in failed if str(cohort / "broken.nii.gz") in line and "cannot read" in line]
    assert len(failed) == 1

    before = outputs(out)
    code, stdout, err = segment(capsys, tiny_model_dir, cohort, out)
    assert code == 2 and outputs(out) == before  # nothing new, nothing rewritten
    assert "4 scans: 0 segmented, 3 skipped (written before" in stdout and "1 failed" in stdout


def test_a_stopped_run_resumes_and_overwrite_segments_again(capsys, tiny_model_dir, cohort, tmp_path):
    (cohort / "broken.nii.gz").unlink()
    out = tmp_path / "out"
    out.mkdir()
    (out / "ct.seg.nrrd").write_text("a user's file")  # as if written before: kept without --overwrite
    code, stdout, _ = segment(capsys, tiny_model_dir, cohort, out, "--progress", "json")
    events = [json.loads(line) for line in stdout.splitlines()]
    assert code == 0 and (out / "ct.seg.nrrd").read_text() == "a user's file"
    assert [(e["type"], Path(e["scan"]).name) for e in events if e["type"] in ("result", "skipped")] == \
        [("result", "btcv.mha"), ("skipped", "ct.nii.gz"), ("result", "series")]
    assert events[-1] == {"type": "cohort", "segmented": 2, "skipped": 1, "failed": []}

    code, _, _ = segment(capsys, tiny_model_dir, cohort, out, "--overwrite")
    assert code == 0 and (out / "ct.seg.nrrd").read_bytes().startswith(b"NRRD")


def test_two_parts_cover_the_folder_once(capsys, tiny_model_dir, cohort, tmp_path):
    out = tmp_path / "out"
    seen = []
    for part_id in (0, 1):
        before = outputs(out)
        code, stdout, err = segment(capsys, tiny_model_dir, cohort, out, "--num-parts", 2, "--part-id", part_id)
        assert f"part {part_id} of 2: 2 scans:" in stdout
        seen += [name for name in outputs(out) if name not in before]
        seen += [Path(line.split(": ")[2]).name for line in err.splitlines() if line.startswith("textdiffseg: failed:")]
    assert sorted(seen) == ["broken.nii.gz", *(f"{name}.seg.nrrd" for name in SCANS)]
    assert sorted(a for k in range(3) for a in part(list(range(10)), 3, k)) == list(range(10))


@pytest.mark.parametrize("numbers, words", [((2, 2), ["--part-id must be from 0 to 1", "not 2"]),
                                            ((0, 0), ["--num-parts must be 1 or more", "not 0"]),
                                            ((2, -1), ["--part-id must be from 0 to 1", "not -1"])])
def test_part_numbers_out_of_range_are_refused(capsys, tiny_model_dir, cohort, tmp_path, numbers, words):
    code, _, err = segment(capsys, tiny_model_dir, cohort, tmp_path / "out", "--num-parts", numbers[0],
                           "--part-id", numbers[1])
    assert code == 2 and err.count("\n") == 1 and all(word in err for word in words), err
    assert not (tmp_path / "out").exists()


def test_a_list_of_scans_with_proposals_and_dicom_seg(capsys, tiny_model_dir, cohort, series, tmp_path):
    listed = tmp_path / "lists" / "cohort.txt"
    listed.parent.mkdir()
    relative = os.path.relpath(series, listed.parent)
    listed.write_text(f"# a DICOM series by a relative path, and a scan by its absolute path\n{relative}\n\n"
                      f"   {cohort / 'ct.nii.gz'}\n")
    out = tmp_path / "out"
    code, stdout, err = segment(capsys, tiny_model_dir, listed, out, "--format", "dcm", "--proposals-dir", out / "p")
    assert code == 2 and "2 scans: 1 segmented, 0 skipped" in stdout
    assert sorted(outputs(out)) == ["p", f"{series.name}.dcm"]
    assert sorted(outputs(out / "p")) == [series.name]
    assert sorted(outputs(out / "p" / series.name)) == ["liver_proposal1.dcm", "liver_proposal2.dcm"]
    assert f"textdiffseg: failed: {cohort / 'ct.nii.gz'}: cannot write" in err and "is a file, not a DICOM series" in err


def test_cohort_mistakes_are_refused_before_any_work(capsys, tiny_model_dir, cohort, tmp_path):
    twice = tmp_path / "twice.txt"
    (tmp_path / "other").mkdir()
    shutil.copy(cohort / "ct.nii.gz", tmp_path / "other" / "ct.nii.gz")
    twice.write_text(f"{cohort / 'ct.nii.gz'}\n{tmp_path / 'other' / 'ct.nii.gz'}\n")
    cases = [((twice, tmp_path / "out"), ["have the same name, 'ct'", "rename one"]),
             ((cohort, cohort), ["is the input folder", "a folder of their own"]),
             ((tmp_path / "other" / "ct.nii.gz", tmp_path / "out.seg.nrrd", "--num-parts", 2), ["for a cohort"]),
             ((tmp_path / "absent.txt", tmp_path / "out"), ["cannot read the list of scans", "absent.txt"])]
    for arguments, words in cases:
        code, out, err = segment(capsys, tiny_model_dir, *arguments)
        assert code == 2 and out == "" and all(word in err for word in words), err
    assert not (tmp_path / "out").exists()


def test_the_readme_states_the_cohort_benchmark():
    """The README's cohort figures are those of ``benchmarks/cohort.py``'s last run."""
    root = Path(__file__).resolve().parents[2]
    figures = json.loads((root / "benchmarks" / "results" / "cohort.json").read_text())
    flat = " ".join((root / "README.md").read_text().split())
    assert figures["same_masks"] and figures["cases"] == 18
    assert (f"the cohort took {figures['cohort_seconds_per_scan']:.1f} s a scan against "
            f"{figures['loop_seconds_per_scan']:.1f} s for a new `textdiffseg segment` per scan (the loop "
            f"{figures['loop_over_cohort']:.2f} times as long)") in flat
