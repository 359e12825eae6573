"""scripts/average_models.py: the weight average ("model soup") that a bundled model may be."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, tiny_config

from TextDiffSegLib.families.universal import UniversalModel
from TextDiffSegLib.modelio import load_model, save_model


def _model_folder(path, seed, **config):
    torch.manual_seed(seed)
    folder = save_model(UniversalModel(tiny_config(**config)), path, half=False)
    (folder / "training.json").write_text(json.dumps({"settings": {}, "split": {}, "notes": "run"}))
    return folder


def _average(output, *models):
    return subprocess.run([sys.executable, str(REPO / "scripts/average_models.py"), str(output), *map(str, models)],
                          capture_output=True, text=True)


def test_the_average_of_two_models_holds_the_mean_of_their_weights(tmp_path):
    first, second = _model_folder(tmp_path / "a", 0), _model_folder(tmp_path / "b", 1)
    done = _average(tmp_path / "soup", first, second)
    assert done.returncode == 0, done.stderr
    soup = load_model(tmp_path / "soup").state_dict()
    a, b = load_model(first).state_dict(), load_model(second).state_dict()
    for key in a:
        torch.testing.assert_close(soup[key], ((a[key] + b[key]) / 2).half().float())
    notes = json.loads((tmp_path / "soup/training.json").read_text())["notes"]
    assert notes.startswith("run") and str(first) in notes and str(second) in notes


def test_models_of_other_architectures_are_refused(tmp_path):
    first, other = _model_folder(tmp_path / "a", 0), _model_folder(tmp_path / "b", 1, unet_channels=(8, 16, 24))
    done = _average(tmp_path / "soup", first, other)
    assert done.returncode != 0 and "configs differ" in done.stderr
    assert not (tmp_path / "soup").exists()


@pytest.mark.parametrize("option, value", [("project_to_masks", True), ("mirror_proposals", True), ("slice_smoothing", 1.0)])
def test_models_sampled_differently_are_refused(tmp_path, option, value):
    first, other = _model_folder(tmp_path / "a", 0), _model_folder(tmp_path / "b", 1, **{option: value})
    assert _average(tmp_path / "soup", first, other).returncode != 0


def test_adapter_folders_are_refused(tmp_path):
    first = _model_folder(tmp_path / "a", 0)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    tiny_config(adapter={"base": "a", "base_sha256": "0" * 64, "rank": 4, "alpha": 4.0}).save(adapter / "config.json")
    done = _average(tmp_path / "soup", first, adapter)
    assert done.returncode != 0 and "adapter" in done.stderr
