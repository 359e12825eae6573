"""Bad input, tried as a new user would (issue 26): real scans from ``../shared/data`` altered in a temporary
folder, given to ``textdiffseg`` and to the Python API. Each must end in a clear message, and nothing a user
had may be lost. ``docs/robustness.md`` lists every input tried with the message it gets.

Sampling runs use the tiny random model of ``conftest`` (``--steps 1 --proposals 2``): what is tested is
what happens around the model, not what it finds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from TextDiffSegLib import cli
from TextDiffSegLib.errors import InputImageError, ModelError, ScanWarning, SettingsError
from TextDiffSegLib.scan_checks import modality_warning
from TextDiffSegLib.segmenter import Segmenter
from TextDiffSegLib.volume import read_volume

FAST = ["--steps", "1", "--proposals", "2", "--progress", "none"]


def run(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def digest(path: Path) -> str:
    """The sha256 of a file, or of every file in a folder (names and bytes)."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    hasher = hashlib.sha256()
    for file in files:
        hasher.update(file.name.encode() + file.read_bytes())
    return hasher.hexdigest()


@pytest.fixture
def ct(shared_data, tmp_path) -> Path:
    """A user's real CT (TotalSegmentator's small example, 122 x 101 x 30 voxels), copied to a fresh folder."""
    path = tmp_path / "scan" / "ct.nii.gz"
    path.parent.mkdir()
    shutil.copy(shared_data / "totalseg_examples" / "example_ct_sm.nii.gz", path)
    return path


@pytest.fixture
def dicom(shared_data, tmp_path) -> Path:
    folder = tmp_path / "series"
    shutil.copytree(shared_data / "totalseg_examples" / "example_ct_dicom", folder)
    return folder


# --- 1-3: a user's file is never lost ---------------------------------------------------------


def _same_as_input(ct: Path, tmp_path: Path) -> dict[str, list]:
    """Arguments that name the input scan as an output, directly, through ``..`` or a symbolic link."""
    link = tmp_path / "link.nii.gz"
    link.symlink_to(ct)
    dotted = ct.parent / ".." / ct.parent.name / ct.name
    return {
        "output is the input": ["-o", ct],
        "output is the input through ..": ["-o", dotted],
        "output is a link to the input": ["-o", link],
        "uncertainty is the input": ["-o", tmp_path / "out.seg.nrrd", "--uncertainty", ct],
        "uncertainty through a link": ["-o", tmp_path / "out.seg.nrrd", "--uncertainty", link],
    }


@pytest.mark.parametrize("case", ["output is the input", "output is the input through ..", "output is a link to the input",
                                  "uncertainty is the input", "uncertainty through a link"])
def test_an_output_never_replaces_the_input(case, capsys, ct, tmp_path, tiny_model_dir):
    before = digest(ct)
    code, out, err = run(capsys, "segment", "-i", ct, "-p", "liver", "--model", tiny_model_dir, *FAST, "--overwrite",
                         *_same_as_input(ct, tmp_path)[case])
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "would destroy that input" in err and str(ct.name) in err
    assert digest(ct) == before
    assert not (tmp_path / "out.seg.nrrd").exists()


def test_nothing_is_written_inside_an_input_dicom_folder(capsys, dicom, tiny_model_dir):
    before = digest(dicom)
    code, _, err = run(capsys, "segment", "-i", dicom, "-p", "liver", "--model", tiny_model_dir, *FAST,
                       "-o", dicom / "out.seg.nrrd", "--overwrite")
    assert code == 2 and "inside the input folder" in err
    code, _, err = run(capsys, "segment", "-i", dicom, "-p", "liver", "--model", tiny_model_dir, *FAST,
                       "-o", dicom.parent / "out.seg.nrrd", "--proposals-dir", dicom / "proposals")
    assert code == 2 and "inside the input folder" in err
    assert digest(dicom) == before and not (dicom.parent / "out.seg.nrrd").exists()


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_two_outputs_are_never_one_file(overwrite, capsys, ct, tmp_path, tiny_model_dir):
    output = tmp_path / "out.nii.gz"
    code, _, err = run(capsys, "segment", "-i", ct, "-p", "liver", "--model", tiny_model_dir, *FAST, "-o", output,
                       "--uncertainty", output, *overwrite)
    assert code == 2 and "is named for two outputs" in err and "exists" not in err
    assert not output.exists()
    # A label map's sidecar of names is an output too: it may not be the uncertainty map either.
    code, _, err = run(capsys, "segment", "-i", ct, "-p", "liver", "--model", tiny_model_dir, *FAST, "-o", output,
                       "--uncertainty", tmp_path / "scan" / ".." / "out.json", *overwrite)
    assert code == 2 and "out.json are the same file" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan"]


def test_the_report_never_replaces_the_dataset(capsys, shared_data, tmp_path, tiny_model_dir):
    dataset = tmp_path / "dataset.json"
    shutil.copy(shared_data / "chaos_t2" / "dataset.json", dataset)
    code, _, err = run(capsys, "evaluate", "--data", dataset, "--model", tiny_model_dir, "--report", dataset, "--overwrite")
    assert code == 2 and "would destroy" in err
    assert dataset.read_bytes() == (shared_data / "chaos_t2" / "dataset.json").read_bytes()


# --- 4-7: one line, never a traceback ---------------------------------------------------------


def test_non_finite_voxels_are_replaced_and_counted(capsys, ct, tmp_path, tiny_model_dir):
    image = sitk.Cast(sitk.ReadImage(str(ct)), sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(image)
    array[0, :10, :10], array[-1, 0, :5] = np.nan, np.inf  # 105 voxels
    broken = sitk.GetImageFromArray(array)
    broken.CopyInformation(image)
    path = tmp_path / "float.mha"
    sitk.WriteImage(broken, str(path))
    code, out, err = run(capsys, "segment", "-i", path, "-p", "liver", "--model", tiny_model_dir, *FAST,
                         "-o", tmp_path / "out.seg.nrrd")
    assert code == 0, err
    assert "textdiffseg: warning: 105 voxels of the scan" in err and "NaN or infinite" in err
    assert f"lowest value ({array[np.isfinite(array)].min():g})" in err
    volume = read_volume(path)
    with pytest.raises(InputImageError, match="every voxel"):
        Segmenter.from_pretrained(tiny_model_dir).propose(volume.with_array(np.full_like(volume.array, np.nan)), "liver")
    assert np.isnan(volume.array).sum() == 100  # the caller's array is left as it was


def _overwrite_bytes(model_dir: Path, tmp_path: Path) -> Path:
    """A copy of the model whose weights file has 4 kB of its tensors overwritten with 0xFF (fp16 NaN), same size."""
    copy = tmp_path / "overwritten-model"
    shutil.copytree(model_dir, copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    header = 8 + struct.unpack("<Q", data[:8])[0]
    data[header + 1000: header + 5096] = b"\xff" * 4096
    weights.write_bytes(bytes(data))
    return copy


def test_weights_with_overwritten_bytes_are_a_broken_model(capsys, ct, tmp_path, tiny_model_dir):
    broken = _overwrite_bytes(tiny_model_dir, tmp_path)
    for progress in ("none", "json"):
        code, out, err = run(capsys, "segment", "-i", ct, "-p", "liver", "--model", broken, "--steps", "1",
                             "--progress", progress, "-o", tmp_path / "out.seg.nrrd")
        message = err if progress == "none" else json.loads(out)["message"]
        assert code == 2 and "overwritten-model" in message and "corrupt" in message and "NaN" in message
        assert "Traceback" not in err + out
    assert not (tmp_path / "out.seg.nrrd").exists()


def test_a_model_giving_non_finite_values_is_named(ct, tiny_model_dir):
    import torch

    segmenter = Segmenter.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for parameter in segmenter.model.parameters():  # weights broken after loading
            parameter.fill_(float("nan"))
    with pytest.raises(ModelError, match="tiny.*not numbers.*corrupt"):
        segmenter.propose(read_volume(ct), "liver", num_proposals=1, steps=1)


@pytest.mark.parametrize("progress", ["none", "json"])
def test_ctrl_c_stops_cleanly(progress, capsys, ct, tmp_path, tiny_model_dir, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    proposals = tmp_path / "new" / "proposals"
    monkeypatch.setattr(Segmenter, "propose_many", interrupted)
    code, out, err = run(capsys, "segment", "-i", ct, "-p", "liver", "--model", tiny_model_dir, "--progress", progress,
                         "-o", tmp_path / "out.seg.nrrd", "--proposals-dir", proposals)
    assert code == 130
    if progress == "json":
        assert json.loads(out) == {"type": "error", "message": "interrupted; nothing was written"} and err == ""
    else:
        assert err == "textdiffseg: error: interrupted; nothing was written\n" and out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan"]  # the proposals folder it made is gone again


def test_an_unexpected_failure_is_one_line_with_the_trace_in_a_file(capsys, ct, tmp_path, tiny_model_dir, monkeypatch):
    def failing(*args, **kwargs):
        raise RuntimeError("something\nunforeseen")

    monkeypatch.setattr(Segmenter, "propose_many", failing)
    code, out, err = run(capsys, "segment", "-i", ct, "-p", "liver", "--model", tiny_model_dir, "--progress", "json",
                         "-o", tmp_path / "out.seg.nrrd")
    assert code == 1 and err == ""
    event = json.loads(out)
    assert event["type"] == "error" and event["message"].startswith("unexpected RuntimeError: something unforeseen. ")
    trace = Path(event["message"].split("the full trace is in ")[1].split(":")[0])
    try:
        assert "Traceback" in trace.read_text() and "something" in trace.read_text()
    finally:
        trace.unlink()
    assert not (tmp_path / "out.seg.nrrd").exists()


# --- 8-11: nothing silently wrong -------------------------------------------------------------


def test_the_modality_check_is_quiet_on_the_real_scans(shared_data):
    """No false alarms: every kind of real scan here, with a model of its own modality."""
    scans = {"CT": [shared_data / "btcv/imagesTr/btcv_0005.nii.gz", shared_data / "btcv/imagesTr/btcv_0009.nii.gz",
                    shared_data / "totalseg_examples/example_ct_sm.nii.gz", shared_data / "totalseg_examples/example_ct_dicom"],
             "MR": [shared_data / "chaos_t2/imagesTr/chaos_t2_01.nii.gz", shared_data / "chaos_t2/imagesTr/chaos_t2_13.nii.gz",
                    shared_data / "totalseg_examples/example_mr_sm.nii.gz"]}
    for modality, paths in scans.items():
        other = "MR" if modality == "CT" else "CT"
        for path in paths:
            volume = read_volume(path)
            assert modality_warning(volume, modality, "m", []) is None, path
            assert f"is for {other}" in (modality_warning(volume, other, "m", []) or "")
    labels = read_volume(shared_data / "totalseg_examples/example_seg.nii.gz")
    assert "looks like a label map" in modality_warning(labels, "CT", "m", [])


def test_a_scan_of_the_other_modality_is_named_with_the_model_to_use(capsys, shared_data, tmp_path, tiny_model_dir):
    mr = shared_data / "chaos_t2/imagesTr/chaos_t2_01.nii.gz"
    code, out, err = run(capsys, "segment", "-i", mr, "-p", "liver", "--model", tiny_model_dir, *FAST,
                         "-o", tmp_path / "out.seg.nrrd")
    assert code == 0 and (tmp_path / "out.seg.nrrd").is_file()
    assert err.startswith("textdiffseg: warning: the scan does not look like a CT in Hounsfield units, but model 'tiny' is for CT")
    assert "--model universal-chaos-t2-lora" in err

    mr_model = tmp_path / "tiny-mr"
    shutil.copytree(tiny_model_dir, mr_model)
    config = json.loads((mr_model / "config.json").read_text())
    (mr_model / "config.json").write_text(json.dumps({**config, "modality": "MR"}))
    with pytest.warns(ScanWarning, match="looks like a CT in Hounsfield units.*is for MR.*--model universal-btcv"):
        Segmenter.from_pretrained(mr_model).propose(shared_data / "totalseg_examples/example_ct_sm.nii.gz", "liver", 1,
                                                    steps=1)
    with pytest.warns(ScanWarning, match="looks like a label map"):
        Segmenter.from_pretrained(tiny_model_dir).propose(shared_data / "totalseg_examples/example_seg.nii.gz", "liver",
                                                          1, steps=1)


def test_training_that_would_train_nothing_is_refused(capsys, shared_data, tmp_path):
    data = shared_data / "chaos_t2" / "dataset.json"
    for extra, words in ((["--steps", "0"], "the diffusion stage is set to 0 steps"),
                         (["--steps", "2", "--autoencoder-steps", "0"], "the autoencoder stage is set to 0 steps"),
                         (["--steps", "0", "--autoencoder-steps", "0"], "stage is set to 0 steps"),
                         (["--batch-size", "0"], "batch_size (--batch-size) must be a whole number of at least 1")):
        code, out, err = run(capsys, "train", "--data", data, "--output", tmp_path / "run", *extra)
        assert code == 2 and words in err and err.count("\n") == 1
        assert not (tmp_path / "run").exists()  # no run folder, let alone a model


def test_training_never_replaces_the_model_it_starts_from(capsys, shared_data, tmp_path, tiny_model_dir):
    start = Path(shutil.copytree(tiny_model_dir, tmp_path / "run" / "model"))
    before = digest(start)
    code, _, err = run(capsys, "train", "--data", shared_data / "chaos_t2" / "dataset.json", "--output", tmp_path / "run",
                       "--init-from", tmp_path / "run" / ".." / "run" / "model", "--steps", "1")
    assert code == 2 and "would replace the model it starts from" in err
    assert digest(start) == before and sorted(p.name for p in (tmp_path / "run").iterdir()) == ["model"]


@pytest.mark.parametrize("settings, error", [
    (dict(steps=0), "steps (--steps) must be at least 1, not 0"),
    (dict(num_proposals=0), "num_proposals (--proposals) must be at least 1"),
    (dict(seed=-3), "seed (--seed) must be at least 0"),
    (dict(seed="3"), "seed (--seed) must be a whole number, not '3' (str)"),
    (dict(num_proposals=2.0), "num_proposals (--proposals) must be a whole number, not 2.0 (float)"),
    (dict(steps=True), "steps (--steps) must be a whole number"),
])
def test_the_api_checks_its_settings(settings, error, ct, tiny_model_dir):
    segmenter = Segmenter.from_pretrained(tiny_model_dir)
    with pytest.raises(SettingsError) as raised:
        segmenter.propose(read_volume(ct), "liver", **settings)
    assert str(raised.value) == error or str(raised.value).startswith(error)
    assert isinstance(raised.value, ValueError) and isinstance(raised.value, TypeError)  # what Python code catches
    assert segmenter.propose(read_volume(ct), "liver", num_proposals=np.int64(1), seed=np.int32(2), steps=1).seeds == [2]


def _with_pixdim(ct: Path, tmp_path: Path, value: float) -> Path:
    """The CT as an uncompressed NIfTI whose header gives ``value`` as the x spacing (pixdim[1])."""
    path = tmp_path / f"pixdim-{value:g}.nii"
    sitk.WriteImage(sitk.ReadImage(str(ct)), str(path))
    data = bytearray(path.read_bytes())
    data[80:84] = struct.pack("<f", value)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("pixdim", [0.0, -3.0])
def test_a_voxel_spacing_that_is_not_positive_is_refused(pixdim, capsys, ct, tmp_path, tiny_model_dir):
    path = _with_pixdim(ct, tmp_path, pixdim)
    read_by_itk, original = sitk.ReadImage(str(path)), sitk.ReadImage(str(ct))
    if pixdim == 0:  # what ITK would have assumed, silently: 1 mm
        assert read_by_itk.GetSpacing()[0] == 1.0
    else:  # the x axis mirrored against the header's own orientation: left and right swapped
        assert read_by_itk.GetDirection()[0] == -original.GetDirection()[0]
    code, _, err = run(capsys, "segment", "-i", path, "-p", "liver", "--model", tiny_model_dir, *FAST,
                       "-o", tmp_path / "out.seg.nrrd")
    assert code == 2 and f"voxel spacing (pixdim) of ({pixdim}, 3.0, 3.0) mm" in err and "fix the header" in err


# --- 12-17: clear where it was unclear --------------------------------------------------------


def test_an_unwritable_output_fails_before_the_model_runs(capsys, ct, tiny_model_dir, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(Segmenter, "from_pretrained", never)
    code, _, err = run(capsys, "segment", "-i", ct, "-p", "liver", "--model", tiny_model_dir, *FAST,
                       "-o", "/proc/out.seg.nrrd")
    assert code == 2 and "/proc" in err and ("cannot be created" in err or "not writable" in err)


def test_a_missing_proposals_folder_is_created(capsys, ct, tmp_path, tiny_model_dir):
    proposals = tmp_path / "new" / "proposals"
    code, _, err = run(capsys, "segment", "-i", ct, "-p", "liver", "--model", tiny_model_dir, *FAST,
                       "-o", tmp_path / "out.seg.nrrd", "--proposals-dir", proposals)
    assert code == 0, err
    assert sorted(p.name for p in proposals.iterdir()) == ["liver_proposal1.seg.nrrd", "liver_proposal2.seg.nrrd"]


def test_a_label_map_names_its_values_beside_it(capsys, ct, tmp_path, tiny_model_dir):
    output = tmp_path / "organs.nii.gz"
    code, out, err = run(capsys, "segment", "-i", ct, "-p", "spleen", "-p", "LIVER", "-p", "left kidney",
                         "--model", tiny_model_dir, *FAST, "-o", output, "--allow-overlap")
    assert code == 0, err
    assert f"label names in {tmp_path / 'organs.json'}" in out
    names = json.loads((tmp_path / "organs.json").read_text())
    assert names["labels"] == {"background": 0, "spleen": 1, "liver": 2, "left kidney": 3}
    assert [s["structure"] for s in names["segments"]] == ["spleen", "liver", "kidney_left"]
    assert names["segments"][1]["terminology"].split("~")[2] == "SCT^10200004^Liver"
    assert names["segments"][0]["tags"]["TextDiffSeg.prompt"] == "spleen"
    # The names describe the values that are there: with --allow-overlap a later structure wins a shared voxel.
    assert set(np.unique(read_volume(output).array)) <= {0, 1, 2, 3}


def test_the_api_takes_what_users_pass(ct, tiny_model_dir):
    segmenter = Segmenter.from_pretrained(tiny_model_dir)
    volume = read_volume(ct)
    expected = segmenter.propose(volume, "liver", 1, steps=1).fused
    for given in (ct, str(ct), sitk.ReadImage(str(ct))):
        assert np.array_equal(segmenter.propose(given, "liver", 1, steps=1).fused, expected)
    with pytest.raises(InputImageError, match=r"cannot segment a ndarray.*Volume\(array, spacing="):
        segmenter.propose(volume.array, "liver")
    with pytest.raises(InputImageError, match="cannot segment a list"):
        segmenter.propose([1, 2], "liver")
    with pytest.raises(InputImageError, match="does not exist"):
        segmenter.propose(str(ct) + ".missing", "liver")


def test_evaluate_names_a_missing_label_map_before_any_work(capsys, shared_data, tmp_path, tiny_model_dir):
    chaos = shared_data / "chaos_t2"
    description = json.loads((chaos / "dataset.json").read_text())
    description["training"] = [{"image": str(chaos / "imagesTr/chaos_t2_01.nii.gz"), "label": str(tmp_path / "gone.nii.gz")}]
    dataset = tmp_path / "dataset.json"
    dataset.write_text(json.dumps(description))
    code, _, err = run(capsys, "evaluate", "--data", dataset, "--model", tiny_model_dir, "--report", tmp_path / "r.json")
    assert code == 2 and "chaos_t2_01's label map" in err and "gone.nii.gz" in err and "do not exist" in err
    assert "input image" not in err


def test_scan_warnings_reach_python_users_as_warnings(shared_data, tiny_model_dir):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Segmenter.from_pretrained(tiny_model_dir).propose(shared_data / "chaos_t2/imagesTr/chaos_t2_01.nii.gz", "liver", 1,
                                                          steps=1)
    scan_warnings = [w for w in caught if issubclass(w.category, ScanWarning)]
    assert len(scan_warnings) == 1 and "does not look like a CT" in str(scan_warnings[0].message)
    assert os.path.basename(scan_warnings[0].filename) == "test_bad_input.py"  # it points at the caller's line


def test_the_robustness_table_is_complete_and_nothing_was_lost():
    """docs/robustness.md, written by docs/robustness.py: every case kept every file, and the README counts them."""
    from conftest import REPO, markdown_rows

    rows = markdown_rows((REPO / "docs" / "robustness.md").read_text())
    assert len(rows) >= 78 and all(cells[-1] == "yes" for cells in rows.values())
    numbered = {cells[1]: cells[2] for cells in rows.values()}  # input -> exit status
    assert numbered["-o is the input, --overwrite"] == "2" and numbered["Ctrl-C (SIGINT) while sampling, --progress json"] == "130"
    assert f"lists {len(rows)} bad inputs" in " ".join((REPO / "README.md").read_text().split())
