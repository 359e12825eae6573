"""The ``textdiffseg`` command: segment, evaluate and models, in-process through ``cli.main`` and once
through the installed console script.

Most runs use the tiny random model of ``conftest`` (``--steps 2 --proposals 2``) so that each takes
about a second. Its probabilities sit near 0.5155 everywhere, so every thresholded mask is full and
every seed gives the same masks; ``balanced_model_dir`` shifts them so that they straddle 0.5, which
makes the masks depend on the seed (what the seed tests need).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
import slicerio.segmentation
from conftest import balanced_copy

from TextDiffSegLib import cli, terminology
from TextDiffSegLib.machine import device_name
from TextDiffSegLib.model_card import TRAINING_RECORD, VOLUME_RANGES
from TextDiffSegLib.registry import default_model_name
from TextDiffSegLib.volume import Volume, read_volume

FAST = ["--steps", "2", "--proposals", "2"]
TOL = 1e-5
realdata = pytest.mark.realdata


# --- helpers ----------------------------------------------------------------------------------


def run(capsys, *args) -> tuple[int, str, str]:
    """``textdiffseg ARGS`` in-process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def segment(capsys, model: Path, image: Path, output: Path, *extra, prompts=("liver",)):
    args = ["segment", "-i", image, "-o", output, "--model", model, "--progress", "none", *FAST, *extra]
    for prompt in prompts:
        args += ["-p", prompt]
    return run(capsys, *args)


def leftovers(folder: Path) -> list[str]:
    """Temporary folders a writer left behind (there must be none)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".tmp-"))


def assert_same_geometry(actual: Volume, expected: Volume) -> None:
    assert actual.array.shape == expected.array.shape
    np.testing.assert_allclose(actual.spacing, expected.spacing, atol=TOL, rtol=0)
    np.testing.assert_allclose(actual.origin, expected.origin, atol=TOL, rtol=0)
    np.testing.assert_allclose(actual.direction, expected.direction, atol=TOL, rtol=0)


def ijk_to_lps(volume: Volume) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3] = np.reshape(volume.direction, (3, 3)) * np.asarray(volume.spacing)
    matrix[:3, 3] = volume.origin
    return matrix


def write_image(path: Path, array: np.ndarray, spacing=None, origin=None) -> Path:
    image = sitk.GetImageFromArray(array, isVector=False)
    if spacing is not None:
        image.SetSpacing(spacing)
    if origin is not None:
        image.SetOrigin(origin)
    sitk.WriteImage(image, str(path))
    return path


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_ct(tmp_path_factory) -> Path:
    """A small synthetic CT (no real data needed): 12 x 40 x 44 voxels, 4 x 4 x 6 mm, off-centre origin."""
    rng = np.random.default_rng(0)
    array = rng.integers(-200, 300, (12, 40, 44)).astype(np.int16)
    return write_image(tmp_path_factory.mktemp("ct") / "small_ct.nii.gz", array, (4.0, 4.0, 6.0), (-80.0, 20.5, 100.0))


@pytest.fixture(scope="module")
def balanced_model_dir(tiny_model_dir, small_ct, tmp_path_factory) -> Path:
    """The tiny model with its probabilities shifted to straddle 0.5 (``conftest.balanced_copy``)."""
    return balanced_copy(tiny_model_dir, read_volume(small_ct), tmp_path_factory.mktemp("models") / "balanced")


@pytest.fixture
def ct(shared_data) -> Path:
    return shared_data / "totalseg_examples" / "example_ct_sm.nii.gz"


# --- segment: outputs -------------------------------------------------------------------------


@realdata
def test_segment_writes_a_slicer_segmentation(capsys, tmp_path, ct, balanced_model_dir):
    output = tmp_path / "result.seg.nrrd"
    code, out, err = segment(capsys, balanced_model_dir, ct, output, "--seed", "7", prompts=("liver", "L kidney"))
    assert code == 0, err
    assert f"wrote {output}" in out and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.seg.nrrd"]

    volume = read_volume(ct)
    segmentation = slicerio.read_segmentation(str(output))
    np.testing.assert_allclose(segmentation["ijkToLPS"], ijk_to_lps(volume), atol=TOL)
    assert segmentation["voxels"].shape[-3:] == tuple(reversed(volume.array.shape))  # [i, j, k]
    geometry = {p["name"]: p["value"] for p in segmentation["conversionParameters"]}["Reference image geometry"]
    x, y, z = reversed(volume.array.shape)
    assert geometry.endswith(f";0;{x - 1};0;{y - 1};0;{z - 1};")

    segments = segmentation["segments"]
    structures = [terminology.get_structure("liver"), terminology.get_structure("kidney_left")]
    assert [s["name"] for s in segments] == ["liver", "left kidney"]
    assert [s["id"] for s in segments] == ["liver", "kidney_left"]
    for read, structure, prompt in zip(segments, structures, ("liver", "L kidney")):
        np.testing.assert_allclose(read["color"], np.array(structure.color) / 255.0, atol=TOL)
        assert read["terminology"] == slicerio.segmentation.terminology_entry_from_string(terminology.terminology_entry(structure))
        assert read["terminology"]["type"] == list(structure.type)
        assert read["tags"]["TextDiffSeg.prompt"] == prompt
        assert read["tags"]["TextDiffSeg.model"] == "tiny"
        assert read["tags"]["TextDiffSeg.seed"] == "7"
        assert read["tags"]["TextDiffSeg.proposal"] == "fused"
        assert read["tags"]["TextDiffSeg.proposals"] == "2"
        assert read["tags"]["TextDiffSeg.fusion"] == "mean"
        assert read["tags"]["TextDiffSeg.samplingScale"] == "1"  # no second look: the model has no training record
    assert segments[1]["terminology"]["typeModifier"] == list(structures[1].type_modifier)
    masks = [slicerio.segment_mask(segmentation, s["id"]).T for s in segments]  # back to [z, y, x]
    assert all(0 < m.sum() < m.size for m in masks)  # the balanced model gives partial masks

    # The same run as a label map: values follow the prompt order, the later prompt winning overlaps.
    labelmap_path = tmp_path / "result.nii.gz"
    code, _, err = segment(capsys, balanced_model_dir, ct, labelmap_path, "--seed", "7", prompts=("liver", "L kidney"))
    assert code == 0, err
    labels = read_volume(labelmap_path)
    np.testing.assert_array_equal(labels.array == 2, masks[1])
    np.testing.assert_array_equal(labels.array == 1, masks[0] & ~masks[1])


def test_fused_segments_are_kept_apart_unless_overlap_is_allowed(capsys, tmp_path, small_ct, balanced_model_dir):
    def segment_masks(name: str, *extra) -> list[np.ndarray]:
        code, _, err = segment(capsys, balanced_model_dir, small_ct, tmp_path / name, *extra, prompts=("liver", "spleen"))
        assert code == 0, err
        segmentation = slicerio.read_segmentation(str(tmp_path / name))
        return [slicerio.segment_mask(segmentation, s["id"]) for s in segmentation["segments"]]

    liver, spleen = segment_masks("apart.seg.nrrd")
    assert liver.any() and spleen.any() and not (liver & spleen).any()
    liver, spleen = segment_masks("overlapping.seg.nrrd", "--allow-overlap")
    assert (liver & spleen).any()  # the balanced model claims some voxels for both


@realdata
def test_segment_writes_a_labelmap_with_the_input_geometry(capsys, tmp_path, shared_data, tiny_model_dir):
    image = shared_data / "totalseg_examples" / "example_mr_sm.nii.gz"
    output = tmp_path / "labels.nii.gz"
    code, out, err = segment(capsys, tiny_model_dir, image, output, "--allow-overlap", prompts=("spleen; liver",))
    assert code == 0, err
    labels = read_volume(output)
    assert_same_geometry(labels, read_volume(image))
    assert labels.array.dtype == np.uint8
    # The tiny model's masks are full and allowed to overlap; in a label map the later prompt (liver,
    # label 2) wins every voxel.
    assert set(np.unique(labels.array)) == {2}
    assert "spleen: " in out and "liver: " in out


@realdata
def test_segment_reads_a_dicom_folder(capsys, tmp_path, shared_data, tiny_model_dir):
    folder = shared_data / "totalseg_examples" / "example_ct_dicom"
    output = tmp_path / "dicom.seg.nrrd"
    code, _, err = segment(capsys, tiny_model_dir, folder, output)
    assert code == 0, err
    volume = read_volume(folder)
    segmentation = slicerio.read_segmentation(str(output))
    np.testing.assert_allclose(segmentation["ijkToLPS"], ijk_to_lps(volume), atol=TOL)
    assert segmentation["voxels"].shape[-3:] == tuple(reversed(volume.array.shape))


def test_segment_writes_proposals_and_uncertainty(capsys, tmp_path, small_ct, balanced_model_dir):
    proposals = tmp_path / "proposals"
    proposals.mkdir()
    output = tmp_path / "fused.seg.nrrd"
    code, _, err = segment(capsys, balanced_model_dir, small_ct, output, "--seed", "3", "--proposals", "3",
                           "--proposals-dir", proposals, "--uncertainty", tmp_path / "uncertainty.nii.gz",
                           prompts=("liver", "spleen"))
    assert code == 0, err
    volume = read_volume(small_ct)
    names = sorted(p.name for p in proposals.iterdir())
    assert names == [f"{s}_proposal{k}.seg.nrrd" for s in ("liver", "spleen") for k in (1, 2, 3)]
    for k in (1, 2, 3):
        segmentation = slicerio.read_segmentation(str(proposals / f"spleen_proposal{k}.seg.nrrd"))
        np.testing.assert_allclose(segmentation["ijkToLPS"], ijk_to_lps(volume), atol=TOL)
        (read,) = segmentation["segments"]
        assert read["name"] == "spleen"
        assert read["tags"]["TextDiffSeg.proposal"] == str(k)
        assert read["tags"]["TextDiffSeg.seed"] == str(3 + k - 1)
        assert read["tags"]["TextDiffSeg.proposals"] == "3"
    # One uncertainty map per prompt when there are several, each a float map on the input grid.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "fused.seg.nrrd", "proposals", "uncertainty_liver.nii.gz", "uncertainty_spleen.nii.gz"]
    for name in ("liver", "spleen"):
        uncertainty = read_volume(tmp_path / f"uncertainty_{name}.nii.gz")
        assert_same_geometry(uncertainty, volume)
        assert uncertainty.array.dtype == np.float32
        assert 0 <= uncertainty.array.min() and uncertainty.array.max() <= 1
        assert uncertainty.array.max() > 0.5  # the balanced model's proposals disagree

    # A single prompt writes the uncertainty exactly where asked; label-map proposals are .nii.gz.
    single = tmp_path / "single"
    single.mkdir()
    code, _, err = segment(capsys, balanced_model_dir, small_ct, single / "fused.nii.gz", "--proposals-dir", single,
                           "--uncertainty", single / "u.mha")
    assert code == 0, err
    assert sorted(p.name for p in single.iterdir()) == ["fused.json", "fused.nii.gz", "liver_proposal1.json",  # label names
                                                        "liver_proposal1.nii.gz", "liver_proposal2.json",
                                                        "liver_proposal2.nii.gz", "u.mha"]
    assert_same_geometry(read_volume(single / "u.mha"), volume)
    assert read_volume(single / "liver_proposal2.nii.gz").array.dtype == np.uint8


def test_progress_json(capsys, tmp_path, small_ct, tiny_model_dir):
    output = tmp_path / "out.nii.gz"
    code, out, err = run(capsys, "segment", "-i", small_ct, "-p", "liver", "-p", "left kidney", "-o", output,
                         "--model", tiny_model_dir, *FAST, "--uncertainty", tmp_path / "u.nii.gz", "--progress", "json")
    assert code == 0, err
    assert err == ""  # no bar, no warnings: the output is for a program to read
    events = [json.loads(line) for line in out.splitlines()]
    assert len(events) >= 4
    progress, result = events[:-1], events[-1]
    assert all(e["type"] == "progress" for e in progress)
    assert all(isinstance(e["message"], str) and e["stage"] for e in progress)
    fractions = [e["fraction"] for e in progress]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    assert result["type"] == "result"
    assert result["output"] == str(output) and output.is_file()
    assert result["uncertainty"] == [str(tmp_path / "u_liver.nii.gz"), str(tmp_path / "u_kidney_left.nii.gz")]
    assert result["proposals"] == []
    assert [s["structure"] for s in result["structures"]] == ["liver", "kidney_left"]
    assert [s["prompt"] for s in result["structures"]] == ["liver", "left kidney"]
    assert all(s["seeds"] == [0, 1] and len(s["scores"]) == 2 for s in result["structures"])


def test_a_result_far_outside_the_training_sizes_is_flagged(capsys, tmp_path, small_ct, size_checked_model_dir):
    """The model's record says its training livers measured over a million ml: the liver found gets a warning
    on stderr (the kidney, without a recorded range, none), and in JSON mode a warning field."""
    code, _, err = run(capsys, "segment", "-i", small_ct, "-p", "liver", "-p", "left kidney", "-o", tmp_path / "a.nii.gz",
                       "--model", size_checked_model_dir, *FAST, "--progress", "none")
    assert code == 0, err
    assert err.count("warning:") == 1 and "warning: the liver found measures" in err
    code, out, err = run(capsys, "segment", "-i", small_ct, "-p", "liver", "-p", "left kidney", "-o", tmp_path / "b.nii.gz",
                         "--model", size_checked_model_dir, *FAST, "--progress", "json")
    assert code == 0 and err == ""
    liver, kidney = json.loads(out.splitlines()[-1])["structures"]
    assert liver["warning"].startswith("the liver found measures") and kidney["warning"] is None


def test_an_organ_far_larger_than_the_training_cases_is_looked_at_again_unless_told_not_to(
        capsys, tmp_path, small_ct, balanced_model_dir):
    """The record says the training livers measured at most 0.001 ml, so the liver the balanced model
    finds is far larger: it is sampled again on a coarser grid (the progress says so), unless
    ``--no-second-look``; the result states the grid scale that was kept."""
    model = _copy_model(tmp_path, balanced_model_dir, "tiny-livers")
    (model / TRAINING_RECORD).write_text(json.dumps({VOLUME_RANGES: {"liver": [0.0001, 0.001]}}))

    def liver_run(output: str, *extra) -> tuple[list[dict], dict]:
        code, out, err = run(capsys, "segment", "-i", small_ct, "-p", "liver", "-o", tmp_path / output, "--model", model,
                             *FAST, "--progress", "json", *extra)
        assert code == 0, err
        lines = [json.loads(line) for line in out.splitlines()]
        return [line["message"] for line in lines if line["type"] == "progress"], lines[-1]["structures"][0]

    messages, liver = liver_run("a.nii.gz")
    again = [re.search(r"liver: larger than any the model was trained on; sampling it again on a grid ([0-9.]+) times "
                       r"coarser", message) for message in messages]
    (factor,) = [float(match.group(1)) for match in again if match]
    assert liver["fused_voxels"] > 0 and factor > 1
    assert liver["sampling_scale"] in (1.0, pytest.approx(factor, abs=0.005))  # kept where it found more
    assert liver["warning"].startswith("the liver found measures")
    messages, liver = liver_run("b.nii.gz", "--no-second-look")
    assert not any("sampling it again" in message for message in messages) and liver["sampling_scale"] == 1


def test_an_error_in_json_mode_is_a_json_line(capsys, tmp_path, small_ct, tiny_model_dir):
    output = tmp_path / "out.nii.gz"
    code, out, err = run(capsys, "segment", "-i", small_ct, "-p", "gallblader", "-o", output,
                         "--model", tiny_model_dir, *FAST, "--progress", "json")
    assert code == 2
    (line,) = out.splitlines()
    event = json.loads(line)
    assert event["type"] == "error" and "gallbladder" in event["message"]
    assert "Traceback" not in err and not output.exists()


def test_seeds_make_runs_reproducible(capsys, tmp_path, small_ct, balanced_model_dir):
    def proposals_of(seed: int, name: str):
        folder = tmp_path / name
        folder.mkdir()
        code, _, err = segment(capsys, balanced_model_dir, small_ct, folder / "fused.nii.gz", "--seed", seed,
                               "--proposals-dir", folder, "--uncertainty", folder / "u.nii.gz")
        assert code == 0, err
        return [read_volume(folder / f).array for f in ("fused.nii.gz", "liver_proposal1.nii.gz",
                                                        "liver_proposal2.nii.gz", "u.nii.gz")]

    first, again, other = proposals_of(11, "a"), proposals_of(11, "b"), proposals_of(12, "c")
    for x, y in zip(first, again):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(first[1], first[2])  # proposals of one run differ (seeds 11 and 12)
    np.testing.assert_array_equal(first[2], other[1])  # proposal k uses seed + k
    assert not np.array_equal(first[1], other[1])
    assert not np.array_equal(first[0], other[0]) and not np.array_equal(first[3], other[3])


def test_overwrite(capsys, tmp_path, small_ct, tiny_model_dir):
    output = tmp_path / "out.seg.nrrd"
    output.write_text("old")
    code, _, err = segment(capsys, tiny_model_dir, small_ct, output)
    assert code == 2 and "exists" in err and "--overwrite" in err
    assert output.read_text() == "old"
    code, _, err = segment(capsys, tiny_model_dir, small_ct, output, "--overwrite")
    assert code == 0, err
    assert slicerio.read_segmentation(str(output))["segments"][0]["name"] == "liver"
    assert leftovers(tmp_path) == []


# --- segment: errors --------------------------------------------------------------------------


def _image_2d(tmp_path):
    return write_image(tmp_path / "slice.nii.gz", np.zeros((40, 44), np.int16))


def _image_4d(tmp_path):
    image = sitk.JoinSeries([sitk.GetImageFromArray(np.zeros((6, 20, 22), np.int16))] * 3)
    sitk.WriteImage(image, str(tmp_path / "series.nii.gz"))
    return tmp_path / "series.nii.gz"


def _garbage(tmp_path):
    path = tmp_path / "garbage.nii.gz"
    path.write_bytes(b"this is not an image" * 10)
    return path


def _text_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not an image")
    return path


def _empty_folder(tmp_path, name="empty"):
    (tmp_path / name).mkdir()
    return tmp_path / name


def _copy_model(tmp_path, model, name):
    return Path(shutil.copytree(model, tmp_path / name))


def _corrupt_weights(tmp_path, model):
    weights = _copy_model(tmp_path, model, "corrupt") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return weights.parent


def _missing_weights(tmp_path, model):
    copy = _copy_model(tmp_path, model, "incomplete")
    (copy / "model.safetensors").unlink()
    return copy


def _corrupt_config(tmp_path, model):
    copy = _copy_model(tmp_path, model, "broken")
    (copy / "config.json").write_text("{ not json")
    return copy


def _mismatched_config(tmp_path, model):
    copy = _copy_model(tmp_path, model, "mismatched")
    config = json.loads((copy / "config.json").read_text())
    config["text_embed_dim"] *= 2
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def _existing_file(tmp_path, name):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("keep me")
    return path


# case: (arguments to replace, given the work folder and the model folder; words the message must hold).
# Arguments: input, prompt, model, output (default: a fresh folder beside the work folder), extra.
ERROR_CASES = {
    "missing input": (lambda t, m: {"input": t / "absent.nii.gz"}, ["absent.nii.gz", "does not exist"]),
    "unreadable input": (lambda t, m: {"input": _garbage(t)}, ["garbage.nii.gz", "cannot read"]),
    "unsupported input": (lambda t, m: {"input": _text_file(t)}, ["notes.txt", "unsupported file type", ".nii.gz"]),
    "2D image": (lambda t, m: {"input": _image_2d(t)}, ["2D image", "3D"]),
    "4D image": (lambda t, m: {"input": _image_4d(t)}, ["4D image", "3D"]),
    "empty DICOM folder": (lambda t, m: {"input": _empty_folder(t)}, ["no DICOM series"]),
    "empty prompt": (lambda t, m: {"prompt": ""}, ["empty prompt", "liver"]),
    "blank prompts": (lambda t, m: {"prompt": " ; "}, ["empty prompt", "liver"]),
    "misspelt prompt": (lambda t, m: {"prompt": "gallblader"}, ["gallblader", "Did you mean: gallbladder"]),
    "prompt the model does not know": (lambda t, m: {"prompt": "aorta"}, ["cannot segment", "aorta", "liver"]),
    "same structure twice": (lambda t, m: {"prompt": "liver; hepar"}, ["'hepar'", "liver", "once"]),
    "missing model folder": (lambda t, m: {"model": t / "no-model"}, ["no-model", "does not exist"]),
    "unknown model name": (lambda t, m: {"model": "no-such-model"}, ["unknown model", "universal-btcv"]),
    "folder that is no model": (lambda t, m: {"model": t}, ["not a TextDiffSeg model folder", "config.json"]),
    "corrupt weights": (lambda t, m: {"model": _corrupt_weights(t, m)}, ["model.safetensors", "corrupt"]),
    "missing weights": (lambda t, m: {"model": _missing_weights(t, m)}, ["model.safetensors", "incomplete"]),
    "corrupt config": (lambda t, m: {"model": _corrupt_config(t, m)}, ["config.json", "corrupt"]),
    "config not matching weights": (lambda t, m: {"model": _mismatched_config(t, m)},
                                    ["does not match", "config.json", "wrong shape"]),
    "output exists": (lambda t, m: {"output": _existing_file(t, "result.seg.nrrd")}, ["exists", "--overwrite"]),
    "output folder missing": (lambda t, m: {"output": t / "absent" / "out.seg.nrrd"}, ["absent", "does not exist"]),
    "output is a folder": (lambda t, m: {"output": _empty_folder(t, "folder.seg.nrrd")}, ["is a folder", "file name"]),
    "unsupported output": (lambda t, m: {"output": t / "out.png"}, ["out.png", "unsupported file type", ".seg.nrrd"]),
    "unsupported uncertainty file": (lambda t, m: {"extra": ["--uncertainty", t / "u.png"]},
                                     ["u.png", "unsupported file type", ".nii.gz"]),
    "uncertainty exists": (lambda t, m: {"extra": ["--uncertainty", _existing_file(t, "u.nii.gz")]},
                           ["u.nii.gz", "exists", "--overwrite"]),
    "proposals folder is a file": (lambda t, m: {"extra": ["--proposals-dir", _existing_file(t, "p.txt")]},
                                   ["p.txt", "is a file, not a folder"]),
    "output under a file": (lambda t, m: {"output": _existing_file(t, "p.txt") / "out.seg.nrrd"},
                            ["p.txt", "is a file, not a folder"]),
    "proposals folder under a file": (lambda t, m: {"extra": ["--proposals-dir", _existing_file(t, "p.txt") / "new"]},
                                      ["p.txt", "is a file, not a folder"]),
    "a proposal exists": (lambda t, m: {"extra": ["--proposals-dir", _existing_file(t, "p/liver_proposal2.seg.nrrd").parent]},
                          ["liver_proposal2.seg.nrrd", "exists", "--overwrite"]),
    "unknown device": (lambda t, m: {"extra": ["--device", "tpu"]}, ["tpu", "cpu"]),
}


@pytest.mark.parametrize("case", ERROR_CASES, ids=list(ERROR_CASES))
def test_segment_errors(case, capsys, tmp_path, small_ct, tiny_model_dir):
    make, words = ERROR_CASES[case]
    work = tmp_path / "work"
    work.mkdir()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    given = {"input": small_ct, "prompt": "liver", "model": tiny_model_dir, "output": out_dir / "result.seg.nrrd",
             "extra": [], **make(work, tiny_model_dir)}
    # Files only: a folder's time changes where it was tried for writing (a temporary folder made and removed).
    before = {p: p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file()}
    code, out, err = run(capsys, "segment", "-i", given["input"], "-p", given["prompt"], "-o", given["output"],
                         "--model", given["model"], *FAST, "--progress", "none", *given["extra"])
    assert code == 2
    assert err.startswith("textdiffseg: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and out == ""
    for word in words:
        assert word in err, f"{word!r} not in {err!r}"
    assert sorted(p.name for p in out_dir.iterdir()) == []  # nothing written, no .tmp-* left
    assert leftovers(work) == []
    assert {p: p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file()} == before  # no file in it changed


def test_a_write_failing_half_way_removes_what_the_run_wrote(capsys, tmp_path, small_ct, tiny_model_dir, monkeypatch):
    from TextDiffSegLib import outputs
    from TextDiffSegLib.errors import OutputError

    written = []

    def failing_write_scalar(path, volume, overwrite=False):  # the second uncertainty map fails (disk full, say)
        if written:
            raise OutputError(f"could not write {path}: No space left on device")
        written.append(path)
        return real_write_scalar(path, volume, overwrite)

    real_write_scalar = outputs.write_scalar
    monkeypatch.setattr(outputs, "write_scalar", failing_write_scalar)
    proposals = tmp_path / "proposals"
    proposals.mkdir()
    code, _, err = segment(capsys, tiny_model_dir, small_ct, tmp_path / "out.seg.nrrd", "--uncertainty",
                           tmp_path / "u.nii.gz", "--proposals-dir", proposals, prompts=("liver", "spleen"))
    assert code == 2 and "No space left on device" in err
    assert len(written) == 1  # the first map was written, then removed with the segmentation
    assert sorted(p.name for p in tmp_path.iterdir()) == ["proposals"] and list(proposals.iterdir()) == []


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes to read-only folders anyway")
def test_read_only_output_folder(capsys, tmp_path, small_ct, tiny_model_dir):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        code, _, err = segment(capsys, tiny_model_dir, small_ct, folder / "out.seg.nrrd")
    finally:
        folder.chmod(0o700)
    assert code == 2 and "not writable" in err
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("option, value", [("--proposals", "0"), ("--proposals", "-1"), ("--steps", "0"),
                                           ("--steps", "-1"), ("--seed", "-1")])
def test_counts_must_be_positive(option, value, capsys, tmp_path, small_ct):
    """The API's one rule (``check_sampling_settings``), applied before the model loads; a seed may be 0."""
    code, out, err = run(capsys, "segment", "-i", small_ct, "-p", "liver", "-o", tmp_path / "o.nii.gz",
                         "--model", tmp_path / "no-model-needed", option, value)
    assert code == 2 and out == ""
    assert err == f"textdiffseg: error: {option[2:]}".replace("proposals", "num_proposals") + \
        f" ({option}) must be at least {0 if option == '--seed' else 1}, not {value}\n"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("option", ["--proposals", "--steps", "--seed"])
def test_counts_must_be_whole_numbers(option, capsys, tmp_path, small_ct):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["segment", "-i", str(small_ct), "-p", "liver", "-o", str(tmp_path / "o.nii.gz"), option, "two"])
    assert exit_info.value.code == 2
    assert f"argument {option}: invalid int value: 'two'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cuda_asked_for_without_a_gpu(capsys, tmp_path, small_ct, tiny_model_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    code, _, err = segment(capsys, tiny_model_dir, small_ct, tmp_path / "o.nii.gz", "--device", "cuda")
    assert code == 2 and "no CUDA GPU" in err and "--device cpu" in err
    assert list(tmp_path.iterdir()) == []


# --- models -----------------------------------------------------------------------------------


def test_models(capsys):
    code, out, _ = run(capsys, "models", "--json")
    assert code == 0
    models = json.loads(out)
    assert isinstance(models, list) and models
    for model in models:
        assert {"name", "family", "structures", "modality"} <= set(model)
        assert isinstance(model["structures"], list) and model["modality"] in ("CT", "MR")
    assert models[0]["name"] == default_model_name() == "universal-btcv"  # the default first
    assert models[0]["family"] == "universal"

    code, out, _ = run(capsys, "models")
    assert code == 0 and "universal-btcv" in out and "universal" in out


# --- evaluate ---------------------------------------------------------------------------------


@pytest.fixture
def btcv_dataset(shared_data, tmp_path) -> Path:
    """A dataset.json in tmp_path naming two BTCV cases by absolute path."""
    btcv = shared_data / "btcv"
    description = json.loads((btcv / "dataset.json").read_text())
    description["training"] = [{"image": str(btcv / "imagesTr" / f"btcv_{n}.nii.gz"),
                                 "label": str(btcv / "labelsTr" / f"btcv_{n}.nii.gz")} for n in ("0005", "0006")]
    path = tmp_path / "data" / "dataset.json"
    path.parent.mkdir()
    path.write_text(json.dumps(description))
    return path


@realdata
def test_evaluate(capsys, tmp_path, btcv_dataset, tiny_model_dir, size_checked_model_dir, shared_data):
    """The tiny model, with a training record that flags every liver it finds (``size_checked_model_dir``)."""
    report_path = tmp_path / "report.json"
    code, out, err = run(capsys, "evaluate", "--data", btcv_dataset, "--structures", "liver,spleen", "--model",
                         size_checked_model_dir, "--proposals", "2", "--steps", "2", "--report", report_path)
    assert code == 0, err
    assert f"wrote {report_path}" in out and "mean dice" in out
    assert "(size warning): btcv_0005 liver, btcv_0006 liver" in out
    report = json.loads(report_path.read_text())
    assert report["model"] == "tiny"
    assert report["num_cases"] == 2 and report["cases"] == ["btcv_0005", "btcv_0006"]
    assert report["num_proposals"] == 2 and report["steps"] == 2
    assert report["seconds_per_case"] > 0
    assert report["device"] == f"cpu ({device_name('cpu')})"  # the CPU's model name, as the benchmarks record it
    assert list(report["structures"]) == ["liver", "spleen"]
    for name, scores in report["structures"].items():
        for metric in ("dice", "single_dice", "oracle_dice", "randtop3_dice", "nsd"):
            assert 0 <= scores[metric] <= 1, (name, metric)
        assert scores["oracle_dice"] >= scores["single_dice"] - 1e-12
        assert scores["hd95_mm"] >= 0
    assert report["mean_dice"] == pytest.approx(np.mean([s["dice"] for s in report["structures"].values()]))
    rows = report["rows"]
    assert len(rows) == 2 * 2
    assert {(r["case"], r["structure"]) for r in rows} == {(c, s) for c in report["cases"] for s in ("liver", "spleen")}
    for row in rows:
        assert 0 <= row["dice"] <= 1 and 0 <= row["nsd"] <= 1 and row["hd95_mm"] >= 0
    for name in ("liver", "spleen"):
        dices = [r["dice"] for r in rows if r["structure"] == name]
        assert report["structures"][name]["dice"] == pytest.approx(np.mean(dices))

    assert report["separate"] is True and report["second_look"] is True
    assert all(row["sampling_scale"] == 1.0 for row in rows)  # the livers found are far smaller than the record's
    assert [row["size_warning"] for row in rows] == [row["structure"] == "liver" for row in rows]
    assert report["size_warnings"] == ["btcv_0005 liver", "btcv_0006 liver"]

    # The report's Dice is that of what `segment` writes for the same case, seed, settings and prompts.
    image = shared_data / "btcv" / "imagesTr" / "btcv_0005.nii.gz"
    code, _, err = segment(capsys, tiny_model_dir, image, tmp_path / "liver.nii.gz", prompts=("liver", "spleen"))
    assert code == 0, err
    mask = read_volume(tmp_path / "liver.nii.gz").array == 1
    reference = read_volume(shared_data / "btcv" / "labelsTr" / "btcv_0005.nii.gz").array == 6  # 6: liver
    expected = 2 * (mask & reference).sum() / (mask.sum() + reference.sum())
    (row,) = [r for r in rows if r["case"] == "btcv_0005" and r["structure"] == "liver"]
    assert row["dice"] == pytest.approx(expected)

    # The report is not overwritten unless asked.
    code, _, err = run(capsys, "evaluate", "--data", btcv_dataset, "--model", tiny_model_dir, "--report", report_path)
    assert code == 2 and "exists" in err and "--overwrite" in err
    assert leftovers(tmp_path) == []


@realdata
@pytest.mark.parametrize("args, words", [
    (["--cases", "btcv_0005,btcv_9999"], ["btcv_9999", "unknown case", "btcv_0006"]),
    (["--structures", "liver,aorta"], ["aorta", "cannot evaluate", "liver"]),  # the tiny model has no aorta
    (["--structures", "liver,gallblader"], ["gallblader", "Did you mean: gallbladder"]),
    (["--split", "validation"], ["validation", "dataset.json"]),
])
def test_evaluate_errors(args, words, capsys, tmp_path, btcv_dataset, tiny_model_dir):
    report_path = tmp_path / "report.json"
    code, _, err = run(capsys, "evaluate", "--data", btcv_dataset, "--model", tiny_model_dir, *FAST,
                       "--report", report_path, *args)
    assert code == 2 and "Traceback" not in err
    message = err.splitlines()[-1]
    assert message.startswith("textdiffseg: error: ")
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert not report_path.exists() and leftovers(tmp_path) == []


def test_evaluate_missing_dataset(capsys, tmp_path, tiny_model_dir):
    code, _, err = run(capsys, "evaluate", "--data", tmp_path / "none.json", "--model", tiny_model_dir,
                       "--report", tmp_path / "r.json")
    assert code == 2 and "none.json" in err and "cannot read" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# --- the installed console script -------------------------------------------------------------


def _console_script() -> str:
    beside = Path(sys.executable).with_name("textdiffseg")
    script = str(beside) if beside.is_file() else shutil.which("textdiffseg")
    if script is None:
        pytest.fail("the textdiffseg console script is not installed: pip install -e .")
    return script


def test_console_script(tmp_path, small_ct, tiny_model_dir):
    script = _console_script()
    environment = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    output = tmp_path / "out.seg.nrrd"
    done = subprocess.run([script, "segment", "-i", str(small_ct), "-p", "liver", "-o", str(output), "--model",
                           str(tiny_model_dir), *FAST, "--progress", "json"],
                          capture_output=True, text=True, timeout=300, env=environment)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["type"] == "result"
    assert slicerio.read_segmentation(str(output))["segments"][0]["name"] == "liver"

    done = subprocess.run([script, "segment", "-i", str(small_ct), "-p", "gallblader", "-o", str(tmp_path / "x.nii.gz"),
                           "--model", str(tiny_model_dir)], capture_output=True, text=True, timeout=300, env=environment)
    assert done.returncode == 2
    assert done.stderr.startswith("textdiffseg: error: ") and "gallbladder" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "x.nii.gz").exists()
