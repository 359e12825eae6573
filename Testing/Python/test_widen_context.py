"""scripts/widen_context.py: more neighbouring slices for the image encoder, same outputs until trained."""

import json
import subprocess
import sys

import torch
from conftest import REPO, tiny_config

from TextDiffSegLib.families.universal import UniversalModel
from TextDiffSegLib.modelio import load_model, save_model


def _model_folder(path, **config):
    torch.manual_seed(0)
    folder = save_model(UniversalModel(tiny_config(**config)), path, half=False)
    (folder / "training.json").write_text(json.dumps({"settings": {}, "split": {}, "notes": "run"}))
    return folder


def _widen(output, model, context_slices):
    return subprocess.run([sys.executable, str(REPO / "scripts/widen_context.py"), str(output), str(model),
                           "--context-slices", str(context_slices)], capture_output=True, text=True)


def test_the_widened_encoder_computes_what_the_original_did(tmp_path):
    original = _model_folder(tmp_path / "a", context_slices=1)
    done = _widen(tmp_path / "wide", original, 2)
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
    done = _widen(tmp_path / "narrow", original, 1)
    assert done.returncode != 0 and "cannot remove" in done.stderr
    assert not (tmp_path / "narrow").exists()
