"""The universal family: its config's checks, its model folder, and how its predictor samples (mask
projection, channels-last layout, the lateral position). Mirrored proposals and slice smoothing, which
every slice-wise family has, are checked in test_family_conformance."""

import numpy as np
import pytest
import torch
from conftest import tiny_config

from TextDiffSegLib.errors import ModelError
from TextDiffSegLib.families.universal import UniversalModel
from TextDiffSegLib.modelio import load_model, save_model
from TextDiffSegLib.preprocessing import lateral_position, normalize_intensity
from TextDiffSegLib.segmenter import Segmenter
from TextDiffSegLib.volume import Volume, read_volume


@pytest.fixture(scope="module")
def small_ct(shared_data):
    return read_volume(shared_data / "totalseg_examples/example_ct_sm.nii.gz")


@pytest.mark.parametrize("field, value, message", [
    ("modality", "PET", "modality"),
    ("structures", (), "structures"),
    ("unet_channels", (8, 12, 16), "multiples of 8"),
    ("prediction_type", "noise", "prediction_type"),
    ("window", (36, 36), "multiple of 16"),
    ("window", (16, 32, 32), "two in-plane sizes"),
    ("slice_smoothing", -1.0, "slice_smoothing must be 0 or more"),
])
def test_invalid_config_is_refused_with_the_reason(field, value, message):
    with pytest.raises(ModelError, match=message):
        tiny_config(**{field: value})


def test_mask_projection_needs_a_clean_latent_prediction():
    with pytest.raises(ModelError, match="project_to_masks needs prediction_type 'sample'"):
        tiny_config(project_to_masks=True, prediction_type="epsilon")


def test_model_folder_round_trip_gives_the_same_outputs(tmp_path):
    torch.manual_seed(1)
    model = UniversalModel(tiny_config()).eval()
    save_model(model, tmp_path, half=False)
    loaded = load_model(tmp_path)
    latent = torch.randn(2, 4, 8, 8)
    assert torch.equal(model.decode_mask(latent), loaded.decode_mask(latent))


@pytest.mark.realdata
def test_learned_structure_embedding_works_without_a_text_encoder(tmp_path, small_ct):
    folder = save_model(UniversalModel(tiny_config(conditioning="learned", text_encoder="/nonexistent")), tmp_path)
    result = Segmenter.from_pretrained(folder).propose(small_ct, "spleen", num_proposals=1)
    assert result.fused.shape == small_ct.array.shape


@pytest.mark.realdata
def test_mask_projection_runs_after_every_step_but_the_last(small_ct, monkeypatch):
    torch.manual_seed(0)
    model = UniversalModel(tiny_config(project_to_masks=True)).eval()
    timesteps, projected_at = [], []
    denoise, project = model.denoise, model.project_to_mask
    monkeypatch.setattr(model, "denoise", lambda x, t, *rest: timesteps.append(int(t)) or denoise(x, t, *rest))
    monkeypatch.setattr(model, "project_to_mask", lambda latent: projected_at.append(timesteps[-1]) or project(latent))
    Segmenter(model, "tiny", torch.device("cpu")).propose(small_ct, "liver", num_proposals=1, steps=3)
    assert len(set(timesteps)) == 3
    assert set(projected_at) == set(timesteps) - {min(timesteps)}
    assert projected_at.count(max(timesteps)) == timesteps.count(max(timesteps))


def test_the_model_runs_channels_last_with_the_default_layouts_results():
    """The segmenter keeps its convolution weights channels-last (faster on a CPU) and samples what the
    default layout samples."""
    rng = np.random.default_rng(2)
    scan = Volume(rng.integers(-200, 300, (4, 32, 32)).astype(np.int16), (6.0, 6.0, 9.0), (0.0, 0.0, 0.0))
    torch.manual_seed(0)
    segmenter = Segmenter(UniversalModel(tiny_config()).eval(), "tiny", torch.device("cpu"))
    convolutions = [m.weight for m in segmenter.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convolutions and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
                                for w in convolutions if w.shape[1] > 1 and w.shape[-1] > 1)  # else both layouts agree
    channels_last = segmenter.propose(scan, "liver", num_proposals=1, steps=2).mean_probability
    segmenter.model.to(memory_format=torch.contiguous_format)
    default = segmenter.propose(scan, "liver", num_proposals=1, steps=2).mean_probability
    np.testing.assert_allclose(channels_last, default, atol=1e-5)


def test_the_image_encoder_is_given_the_lateral_position_of_each_slice():
    rng = np.random.default_rng(2)
    scan = Volume(rng.integers(-1000, 300, (3, 32, 32)).astype(np.int16), (6.0, 6.0, 9.0), (0.0, 0.0, 0.0))
    torch.manual_seed(0)
    segmenter = Segmenter(UniversalModel(tiny_config(lateral_position=True)).eval(), "tiny", torch.device("cpu"))
    inputs = []
    segmenter.model.image_encoder.register_forward_hook(lambda module, args, output: inputs.append(args[0]))
    segmenter.propose(scan, "liver", num_proposals=1)
    (slices,) = inputs
    assert slices.shape == (3, 4, 32, 32)
    expected = lateral_position(normalize_intensity(scan.array, "CT"), 6.0)
    np.testing.assert_allclose(slices[:, 3].numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(slices[:, 1].numpy(), normalize_intensity(scan.array, "CT"), atol=1e-6)
