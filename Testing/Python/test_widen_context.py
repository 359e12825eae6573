"""scripts/widen_context.py: more neighbouring slices for a 2.5D model, same outputs until trained (each family's
``grown`` is checked on its own in its tests)."""

import json
import subprocess
import sys

import torch
from conftest import REPO, tiny_config

from TextDiffSegLib.families.universal import UniversalModel
from TextDiffSegLib.modelio import load_model, save_model


def _model_folder(path, model=None, **config):
    torch.manual_seed(0)
    folder = save_model(model or UniversalModel(tiny_config(**config)), path, half=False)
    (folder / "training.json").write_text(json.dumps({"settings": {}, "split": {}, "notes": "run"}))
    return folder


def _widen(output, model, *options):
    return subprocess.run([sys.executable, str(REPO / "scripts/widen_context.py"), str(output), str(model), *options],
                          capture_output=True, text=True)


def test_the_widened_encoder_computes_what_the_original_did(tmp_path):
    original = _model_folder(tmp_path / "a", context_slices=1)
    done = _widen(tmp_path / "wide", original, "--context-slices", "2")
    assert done.returncode == 0, done.stderr
    narrow, wide = load_model(original), load_model(tmp_path / "wide")
    assert wide.config.context_slices == 2
    slices = torch.rand(2, 5, 32, 32)
    with torch.no_grad():
        expected = narrow.image_encoder(slices[:, 1:4])
        torch.testing.assert_close(wide.image_encoder(slices), expected, rtol=1e-3, atol=1e-3)  # fp16 weights
        slices[:, [0, 4]] = torch.rand(2, 2, 32, 32)  # the new outer slices do not count until trained
        torch.testing.assert_close(wide.image_encoder(slices), expected, rtol=1e-3, atol=1e-3)
    notes = json.loads((tmp_path / "wide/training.json").read_text())["notes"]
    assert notes.startswith("run") and "from 1 to 2 neighbouring slices" in notes


def test_fewer_slices_are_refused(tmp_path):
    original = _model_folder(tmp_path / "a", context_slices=2)
    done = _widen(tmp_path / "narrow", original, "--context-slices", "1")
    assert done.returncode != 0 and "cannot remove" in done.stderr
    assert not (tmp_path / "narrow").exists()


def test_the_lateral_position_channel_starts_without_effect(tmp_path):
    original = _model_folder(tmp_path / "a", context_slices=1)
    done = _widen(tmp_path / "placed", original, "--lateral-position")
    assert done.returncode == 0, done.stderr
    plain, placed = load_model(original), load_model(tmp_path / "placed")
    assert placed.config.lateral_position and placed.config.context_slices == 1
    slices = torch.rand(2, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(placed.image_encoder(slices), plain.image_encoder(slices[:, :3]), rtol=1e-3, atol=1e-3)
    assert "given the lateral position channel" in json.loads((tmp_path / "placed/training.json").read_text())["notes"]

    # Widening it further keeps the position's weights; asking for nothing new is refused.
    assert _widen(tmp_path / "wide", tmp_path / "placed", "--context-slices", "2").returncode == 0
    wide = load_model(tmp_path / "wide")
    assert wide.config.lateral_position and wide.config.context_slices == 2
    with torch.no_grad():
        widened_input = torch.cat([torch.rand(2, 1, 32, 32), slices[:, :3], torch.rand(2, 1, 32, 32), slices[:, 3:]], 1)
        torch.testing.assert_close(wide.image_encoder(widened_input), placed.image_encoder(slices), rtol=1e-3, atol=1e-3)
    again = _widen(tmp_path / "again", tmp_path / "placed", "--lateral-position")
    assert again.returncode != 0 and "already has that input" in again.stderr


def test_an_lcpdn_model_is_widened_and_a_family_without_slices_refused(tmp_path):
    from test_family_conformance import tiny_model

    original = _model_folder(tmp_path / "lcpdn", tiny_model("lcpdn"))
    done = _widen(tmp_path / "wide", original, "--context-slices", "1", "--lateral-position")
    assert done.returncode == 0, done.stderr
    wide = load_model(tmp_path / "wide")
    assert (wide.config.family, wide.config.context_slices, wide.config.lateral_position) == ("lcpdn", 1, True)
    assert wide.unet.config.in_channels == 4 * 4  # three slices and the position, folded by the stem of 2
    refused = _widen(tmp_path / "3d", _model_folder(tmp_path / "a3d", tiny_model("textdiffseg3d")), "--context-slices", "1")
    assert refused.returncode != 0 and "not a universal, LCPDN or ProGiDiff model" in refused.stderr
