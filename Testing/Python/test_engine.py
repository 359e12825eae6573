"""The engine's core: configs, model folders, the sampler, geometry and the Segmenter."""

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage
from conftest import rotation, tiny_config

from TextDiffSegLib.errors import InputImageError, ModelError, PromptError, TextDiffSegError
from TextDiffSegLib.families.universal import UniversalConfig
from TextDiffSegLib.machine import resolve_device
from TextDiffSegLib.metrics import dice
from TextDiffSegLib.modelio import load_model, read_config
from TextDiffSegLib.preprocessing import from_model_grid, lateral_position, model_grid, normalize_intensity, to_model_grid
from TextDiffSegLib.sampler import make_scheduler, sample, windowed
from TextDiffSegLib.segmenter import Segmenter
from TextDiffSegLib.volume import Volume, read_volume

# --- configs and model folders ---------------------------------------------------------------


def test_config_round_trips_through_json(tmp_path):
    config = tiny_config(conditioning="learned")
    config.save(tmp_path / "config.json")
    assert read_config(tmp_path) == config


def test_config_with_unknown_field_is_refused():
    with pytest.raises(ModelError, match="colour"):
        UniversalConfig.from_dict({**tiny_config().to_dict(), "colour": "red"})


def test_missing_weights_are_reported(tiny_model_dir, tmp_path):
    shutil.copy(tiny_model_dir / "config.json", tmp_path)
    with pytest.raises(ModelError, match="no model.safetensors"):
        load_model(tmp_path)


def test_corrupt_weights_are_reported(tiny_model_dir, tmp_path):
    folder = shutil.copytree(tiny_model_dir, tmp_path / "model")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="corrupt"):
        load_model(folder)


def test_config_not_matching_weights_is_reported(tiny_model_dir, tmp_path):
    folder = shutil.copytree(tiny_model_dir, tmp_path / "model")
    values = json.loads((folder / "config.json").read_text())
    values["text_embed_dim"] *= 2
    (folder / "config.json").write_text(json.dumps(values))
    with pytest.raises(ModelError, match="does not match"):
        load_model(folder)


def test_folder_without_config_is_not_a_model(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        load_model(tmp_path)


# --- the sampler ---------------------------------------------------------------------------------


def _oracle(scheduler, target: torch.Tensor, prediction_type: str):
    """A denoiser that knows the clean sample, answering in the given parameterisation."""
    alphas = scheduler.alphas_cumprod

    def denoise(x, t):
        a = alphas[int(t)]
        epsilon = (x - a.sqrt() * target) / (1 - a).sqrt()
        if prediction_type == "sample":
            return target.expand_as(x)
        if prediction_type == "epsilon":
            return epsilon
        return a.sqrt() * epsilon - (1 - a).sqrt() * target

    return denoise


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
@pytest.mark.parametrize("prediction_type", ["sample", "epsilon", "v_prediction"])
def test_sampler_recovers_the_clean_sample_from_a_perfect_denoiser(kind, prediction_type):
    scheduler = make_scheduler(kind, 1000, prediction_type)
    target = torch.linspace(-1, 1, 16).reshape(1, 1, 4, 4)
    result = sample(_oracle(scheduler, target, prediction_type), scheduler, (3, 1, 4, 4), steps=4,
                    generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(result, target.expand(3, 1, 4, 4), atol=1e-3, rtol=0)


@pytest.mark.parametrize("prediction_type, pure_noise_at_the_end", [
    ("sample", True), ("v_prediction", True), ("epsilon", False)])
def test_schedule_ends_in_pure_noise_where_the_parameterisation_allows(prediction_type, pure_noise_at_the_end):
    for kind in ("ddpm", "ddim"):
        terminal = float(make_scheduler(kind, 1000, prediction_type).alphas_cumprod[-1])
        assert (terminal == 0.0) == pure_noise_at_the_end


def test_sampler_is_reproducible_per_seed():
    scheduler = make_scheduler("ddpm", 1000, "sample")
    denoise = lambda x, t: 0.5 * x  # noqa: E731
    run = lambda seed: sample(denoise, scheduler, (1, 1, 4, 4), 3, torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def test_unknown_scheduler_is_refused():
    with pytest.raises(ValueError, match="ddim, ddpm"):
        make_scheduler("euler", 1000, "sample")


def test_sliding_window_of_a_pointwise_function_is_exact():
    inputs = torch.randn(3, 2, 50, 37)
    out = windowed(lambda x: x + 1, inputs, window=(16, 16))
    torch.testing.assert_close(out, inputs + 1)


def test_sliding_window_in_3d_is_exact():
    inputs = torch.randn(1, 2, 11, 30, 21)
    out = windowed(lambda x: x * 2, inputs, window=(8, 16, 16))
    torch.testing.assert_close(out, inputs * 2)


def test_sliding_window_passes_small_inputs_whole():
    calls = []
    windowed(lambda x: calls.append(x.shape) or x, torch.zeros(2, 1, 10, 12), window=(16, 16))
    assert calls == [torch.Size([2, 1, 10, 12])]


# --- devices -------------------------------------------------------------------------------------


def test_one_device_vocabulary_is_resolved_at_the_edge():
    assert resolve_device("CPU") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(TextDiffSegError, match="unknown device 'gpu'; use auto, cpu, cuda, mps"):
        resolve_device("gpu")
    if not torch.backends.mps.is_available():
        with pytest.raises(TextDiffSegError, match="mps"):
            resolve_device("mps")


# --- geometry --------------------------------------------------------------------------------------


def _oblique(degrees_about_x: float, degrees_about_z: float) -> tuple[float, ...]:
    return tuple((rotation("z", degrees_about_z) @ rotation("x", degrees_about_x)).ravel())


@pytest.mark.realdata
@pytest.mark.parametrize("direction", [
    (1.0, 0, 0, 0, 1, 0, 0, 0, 1),
    (-1.0, 0, 0, 0, -1, 0, 0, 0, 1),
    (0, 1.0, 0, 0, 0, 1, 1, 0, 0),  # axes permuted
    _oblique(20, 15),  # oblique
])
def test_model_grid_round_trip_keeps_anatomy_in_place(shared_data, direction):
    """A liver mask sent to the model grid and back lands where it was, for any direction."""
    labels = read_volume(shared_data / "totalseg_examples/example_seg.nii.gz")
    liver = Volume((labels.array == 5).astype(np.uint8), labels.spacing, (10.0, -20.0, 30.0), direction)
    grid = model_grid(liver, (2.5, 2.5, 5.0))
    back = from_model_grid(to_model_grid(liver, grid, is_label=True), grid, liver) >= 0.5
    assert back.shape == liver.array.shape
    assert dice(back, liver.array) > 0.9


def test_model_grid_is_axis_aligned_and_covers_the_volume():
    volume = Volume(np.zeros((10, 20, 30), np.int16), (1.0, 2.0, 3.0), (5.0, 6.0, 7.0), _oblique(30, 10))
    grid = model_grid(volume, (2.0, 2.0, 2.0))
    assert grid.GetDirection() == (1, 0, 0, 0, 1, 0, 0, 0, 1)
    low = np.array(grid.GetOrigin()) - 1.0
    high = np.array(grid.TransformIndexToPhysicalPoint([s - 1 for s in grid.GetSize()])) + 1.0
    image = sitk.GetImageFromArray(volume.array)
    image.SetSpacing(volume.spacing), image.SetOrigin(volume.origin), image.SetDirection(volume.direction)
    for corner in np.ndindex(2, 2, 2):
        point = np.array(image.TransformIndexToPhysicalPoint([int(c * (s - 1)) for c, s in zip(corner, (30, 20, 10))]))
        assert np.all(point >= low) and np.all(point <= high)


def test_ct_is_windowed_and_mr_normalised_robustly():
    ct = normalize_intensity(np.array([-1000, -125, 75, 275, 2000]), "CT")
    np.testing.assert_allclose(ct, [0, 0, 0.5, 1, 1])
    mr = normalize_intensity(np.concatenate([np.linspace(0, 100, 1000), [1e6]]), "MR")
    assert mr.min() == 0 and mr.max() == 1 and 0.45 < np.median(mr) < 0.55


# --- the Segmenter ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_segmenter(tiny_model_dir):
    return Segmenter.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def small_ct(shared_data):
    return read_volume(shared_data / "totalseg_examples/example_ct_sm.nii.gz")


@pytest.mark.realdata
def test_propose_returns_proposals_on_the_input_grid(tiny_segmenter, small_ct):
    events = []
    result = tiny_segmenter.propose(small_ct, "Segment the left kidney in this CT", num_proposals=3, seed=7,
                                    callback=events.append)
    assert result.structure.name == "kidney_left"
    assert result.seeds == [7, 8, 9]
    assert len(result.proposals) == len(result.scores) == 3
    for array in (*result.proposals, result.mean_probability, result.fused, result.uncertainty):
        assert array.shape == small_ct.array.shape
    for array in (result.mean_probability, result.uncertainty):
        assert array.dtype == np.float32 and 0 <= array.min() and array.max() <= 1
    fractions = [e["fraction"] for e in events]
    assert fractions == sorted(fractions) and events[-1]["stage"] == "done"


@pytest.mark.realdata
def test_each_proposal_is_reproducible_from_its_seed(tiny_segmenter, small_ct):
    three = tiny_segmenter.propose(small_ct, "liver", num_proposals=3, seed=0)
    alone = [tiny_segmenter.propose(small_ct, "liver", num_proposals=1, seed=seed) for seed in (0, 1, 2)]
    for proposal, single in zip(three.proposals, alone):
        np.testing.assert_array_equal(proposal, single.proposals[0])
    mean = np.mean([single.mean_probability for single in alone], axis=0)
    np.testing.assert_allclose(three.mean_probability, mean, atol=1e-6)
    assert not np.allclose(alone[0].mean_probability, alone[1].mean_probability, atol=1e-4)


@pytest.mark.realdata
def test_fused_masks_of_several_structures_do_not_overlap_unless_asked(tiny_segmenter, small_ct):
    prompts = ["liver", "spleen"]
    overlapping = tiny_segmenter.propose_many(small_ct, prompts, num_proposals=2, separate=False)
    assert (overlapping[0].fused & overlapping[1].fused).any()  # the random model claims some voxels for both
    separated = tiny_segmenter.propose_many(small_ct, prompts, num_proposals=2)
    assert not (separated[0].fused & separated[1].fused).any()
    for before, after in zip(overlapping, separated):
        assert not (after.fused & ~before.fused.astype(bool)).any()  # only contested voxels are taken away
        assert ndimage.label(after.fused)[1] == 1
        for proposal_before, proposal_after in zip(before.proposals, after.proposals):
            np.testing.assert_array_equal(proposal_before, proposal_after)  # proposals are left as sampled


def test_a_structure_named_twice_is_refused(tiny_segmenter):
    scan = Volume(np.zeros((4, 32, 32), np.int16), (6.0, 6.0, 9.0), (0.0, 0.0, 0.0))
    with pytest.raises(PromptError, match="'liver' and 'the LIVER' both name liver"):
        tiny_segmenter.propose_many(scan, ["liver", "spleen", "the LIVER"])


def test_lateral_position_is_zero_at_the_middle_of_the_body_and_positive_towards_the_patients_left():
    slices = np.zeros((2, 4, 10), dtype=np.float32)
    slices[0, :, 2:5] = 0.5  # body in columns 2-4: its middle is column 3
    position = lateral_position(slices, spacing_x=2.5)
    np.testing.assert_allclose(position[0, 1], (np.arange(10) - 3) * 0.025)
    np.testing.assert_allclose(position[1, 1], (np.arange(10) - 4.5) * 0.025)  # no body: the slice's centre
    padded = lateral_position(np.pad(slices, ((0, 0), (0, 0), (7, 0))), spacing_x=2.5)
    np.testing.assert_allclose(padded[0, :, 7:], position[0])  # padding with air moves the map with the body


def test_structure_the_model_does_not_know_is_refused(tiny_segmenter):
    with pytest.raises(PromptError, match="cannot segment 'pancreas'.*liver"):
        tiny_segmenter.resolve("pancreas")


def test_a_2d_array_is_refused(tiny_segmenter):
    flat = Volume(np.zeros((20, 20), np.int16), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    with pytest.raises(InputImageError, match="3D"):
        tiny_segmenter.propose(flat, "liver")
