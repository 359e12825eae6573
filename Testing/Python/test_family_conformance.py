"""What every model family must do, checked for each in ``FAMILIES`` (and for a tiny 3D family defined here,
which shows that the seam carries 3D windows through ``Segmenter`` and ``train``).

A family added later passes this file unchanged once ``TINY_FAMILIES`` names a tiny config and training
crop for it. Everything runs on a small synthetic dataset, in seconds.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import TINY_STRUCTURES, tiny_config
from scipy import ndimage
from torch import nn

from TextDiffSegLib.config import ModelConfig
from TextDiffSegLib.families import FAMILIES
from TextDiffSegLib.families.base import Family, Predictor, Recipe, SliceWiseConfig, Stage, normalisation_parameters
from TextDiffSegLib.modelio import load_model, save_model
from TextDiffSegLib.sampler import make_scheduler, sample, windowed
from TextDiffSegLib.segmenter import Segmenter
from TextDiffSegLib.training import LOG_NAME, TrainSettings, train
from TextDiffSegLib.volume import Volume

# --- a tiny 3D family: pixel-space diffusion of the mask in 3D windows ------------------------------


@dataclasses.dataclass
class Tiny3DConfig(ModelConfig):
    family: str = "tiny3d"
    channels: int = 8


class Tiny3DModel(nn.Module):
    def __init__(self, config: Tiny3DConfig):
        super().__init__()
        self.config, c = config, config.channels
        self.embedding = (nn.Linear(config.text_embed_dim, c) if config.conditioning == "text"
                          else nn.Embedding(len(config.structures), c))
        self.net = nn.Sequential(nn.Conv3d(2, c, 3, padding=1), nn.GroupNorm(4, c), nn.SiLU())
        self.out = nn.Conv3d(c, 1, 3, padding=1)
        self.window_shapes = []  # the input shapes the denoiser saw (3D windows)

    def forward(self, noisy, t, image, condition):
        self.window_shapes.append(tuple(noisy.shape[2:]))
        return self.out(self.net(torch.cat([noisy, image], 1)) + condition[:, :, None, None, None])


class Tiny3DPredictor(Predictor):
    def prepare(self, image, spacing):
        return torch.from_numpy(image)[None, None]

    def condition(self, text, index):
        return self.model.embedding(torch.tensor([index]) if text is None else text.pooled)

    def sample(self, prepared, condition, seed, steps, scheduler, on_step):
        scheduler = make_scheduler(scheduler, self.config.num_train_timesteps, self.config.prediction_type)

        def denoise(x, t):
            return windowed(lambda w: self.model(w[:, :1], t, w[:, 1:], condition), torch.cat([x, prepared], 1),
                            self.config.window)

        x = sample(denoise, scheduler, prepared.shape, steps, torch.Generator().manual_seed(seed), on_step=on_step)
        return ((x[0, 0] + 1) / 2).clamp(0, 1).numpy()


class Patches:
    """Random 3D patches of one structure's mask."""

    def __init__(self, cases, structures, crop, seed):
        self.cases, self.structures, self.crop, self.rng = cases, structures, crop, np.random.default_rng(seed)

    def batch(self, size):
        images, masks, labels = [], [], []
        for _ in range(size):
            case, label = self.cases[self.rng.integers(len(self.cases))], int(self.rng.integers(len(self.structures)))
            corner = [int(self.rng.integers(s - c + 1)) for s, c in zip(case.image.shape, self.crop)]
            window = tuple(slice(o, o + c) for o, c in zip(corner, self.crop))
            images.append(case.image[window][None] / np.float32(255))
            masks.append(case.mask(self.structures[label])[window][None].astype(np.float32))
            labels.append(label)
        return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(masks)), torch.tensor(labels)


class Tiny3DRecipe(Recipe):
    def batch_source(self, cases, structures, text):
        self.conditions = torch.arange(len(structures)) if text is None else text.pooled
        return Patches(cases, structures, tuple(self.settings.crop), self.settings.seed)

    def stages(self):
        return [Stage("denoiser", self.settings.diffusion_steps, self.settings.lr,
                      lambda: list(self.model.parameters()), self.loss, averaged=True)]

    def loss(self, batch):
        images, masks, labels = batch
        scheduler = make_scheduler("ddpm", self.config.num_train_timesteps, self.config.prediction_type)
        timesteps = torch.randint(0, self.config.num_train_timesteps, (len(labels),))
        clean = masks * 2 - 1
        noisy = scheduler.add_noise(clean, torch.randn_like(clean), timesteps)
        with self.trainer.autocast():
            prediction = self.model(noisy, timesteps, images, self.model.embedding(self.conditions[labels]))
        return nn.functional.mse_loss(prediction.float(), clean)


TINY3D = Family(Tiny3DConfig, Tiny3DModel, Tiny3DPredictor, Tiny3DRecipe,
                lora_targets=lambda model: [name for name, m in model.named_modules() if isinstance(m, nn.Conv3d)],
                retrained=normalisation_parameters, card_text=lambda config: ["pixel-space 3D diffusion"])

# --- the families checked, each with a tiny config and training crop ---------------------------------

TINY_FAMILIES = {
    "universal": (tiny_config, (32, 32)),
    "textdiffseg3d": (lambda **o: FAMILIES["textdiffseg3d"].config(**{**dict(
        name="tiny-3d", structures=TINY_STRUCTURES, spacing=(6.0, 6.0, 9.0), window=(16, 16, 16), default_steps=2,
        label_channels=(4, 8, 8), image_channels=(8, 8, 8), image_feature_channels=8, attention_heads=2,
        unet_channels=(8, 8), unet_attention=(False, True)), **o}), (16, 16, 16)),
    "progidiff": (lambda **o: FAMILIES["progidiff"].config(**{**dict(
        name="tiny-progidiff", structures=TINY_STRUCTURES, spacing=(6.0, 6.0, 9.0), window=(16, 16), default_steps=2,
        autoencoder_channels=(8, 8), unet_channels=(8, 16), attention_heads=2, cross_attention=(False, True),
        conditioning_channels=(8, 8, 8)), **o}), (16, 16)),
    "lcpdn": (lambda **o: FAMILIES["lcpdn"].config(**{**dict(
        name="tiny-lcpdn", structures=TINY_STRUCTURES, spacing=(6.0, 6.0, 9.0), window=(16, 16), default_steps=2,
        unet_channels=(8, 16), attention_heads=2, cross_attention=(False, True), encoder_channels=(8, 8), prompt_dim=8,
        classifier_channels=8), **o}), (16, 16)),
    "tiny3d": (lambda **o: Tiny3DConfig(**{**dict(name="tiny3d", structures=TINY_STRUCTURES, spacing=(6.0, 6.0, 9.0),
                                                   window=(8, 16, 16), default_steps=2), **o}), (8, 16, 16)),
}


@pytest.fixture(params=[*FAMILIES, "tiny3d"])
def family(request, monkeypatch) -> str:
    monkeypatch.setitem(FAMILIES, "tiny3d", TINY3D)
    if request.param not in TINY_FAMILIES:
        pytest.fail(f"add a tiny config and training crop for the family {request.param!r} to TINY_FAMILIES")
    return request.param


def tiny_model(family: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return FAMILIES[family].model(TINY_FAMILIES[family][0]()).eval()


SCAN = Volume(np.random.default_rng(0).integers(-200, 300, (12, 40, 36)).astype(np.int16), spacing=(6.0, 6.0, 9.0),
              origin=(0.0, 0.0, 0.0))


def test_save_and_load_give_the_same_outputs(family, tmp_path):
    model = tiny_model(family)
    before = Segmenter(model, "tiny", torch.device("cpu")).propose(SCAN, "liver", num_proposals=2, steps=2)
    folder = save_model(model, tmp_path / "model", half=False)
    after = Segmenter(load_model(folder), "tiny", torch.device("cpu")).propose(SCAN, "liver", num_proposals=2, steps=2)
    np.testing.assert_array_equal(before.mean_probability, after.mean_probability)


def test_outputs_are_probabilities_with_the_inputs_shape(family):
    segmenter = Segmenter(tiny_model(family), "tiny", torch.device("cpu"))
    steps = []
    result = segmenter.propose(SCAN, "spleen", num_proposals=2, steps=3, largest_component=False,
                               callback=lambda event: steps.append(event["message"]))
    for array in (*result.proposals, result.mean_probability, result.fused):
        assert array.shape == SCAN.array.shape
    assert 0 <= result.mean_probability.min() and result.mean_probability.max() <= 1
    assert any("step 1/" in message for message in steps)  # progress moves during sampling


def test_a_proposal_reproduces_from_its_seed_alone(family):
    segmenter = Segmenter(tiny_model(family), "tiny", torch.device("cpu"))
    three = segmenter.propose(SCAN, "liver", num_proposals=3, seed=4, steps=2)
    alone = segmenter.propose(SCAN, "liver", num_proposals=1, seed=5, steps=2)
    np.testing.assert_array_equal(three.proposals[1], alone.proposals[0])


def test_adapter_rules_name_layers_of_the_model(family):
    model = tiny_model(family)
    rules = FAMILIES[family]
    targets, retrained = rules.lora_targets(model), rules.retrained(model)
    assert targets and set(targets) <= dict(model.named_modules()).keys()
    assert set(retrained) <= dict(model.named_parameters()).keys()


# --- the slice-wise families' sampling options (families.base.SliceWiseConfig) ---------------------------

SLICE_WISE = [name for name, rules in FAMILIES.items() if issubclass(rules.config, SliceWiseConfig)]


def slice_wise_pair(family: str, **options) -> tuple[Segmenter, Segmenter]:
    """Segmenters of the same tiny weights, without and with ``options``."""
    plain = tiny_model(family)
    optioned = FAMILIES[family].model(TINY_FAMILIES[family][0](**options)).eval()
    optioned.load_state_dict(plain.state_dict())
    return Segmenter(plain, "tiny", torch.device("cpu")), Segmenter(optioned, "tiny", torch.device("cpu"))


@pytest.mark.parametrize("family", SLICE_WISE)
def test_odd_seeds_are_sampled_on_the_mirrored_scan_and_mirrored_back(family):
    # A grid every tiny model takes without padding (32 in-plane), so mirroring the scan before sampling
    # and the result after it must give exactly the proposal of the mirrored scan.
    rng = np.random.default_rng(0)
    scan = Volume(rng.integers(-200, 300, (6, 32, 32)).astype(np.int16), (6.0, 6.0, 9.0), (0.0, 0.0, 0.0))
    mirrored_scan = scan.with_array(np.ascontiguousarray(scan.array[:, ::-1]))
    without_mirror, with_mirror = slice_wise_pair(family, mirror_proposals=True)
    even_seed, odd_seed = (with_mirror.propose(scan, "liver", num_proposals=1, seed=seed).mean_probability for seed in (0, 1))
    np.testing.assert_array_equal(even_seed, without_mirror.propose(scan, "liver", num_proposals=1, seed=0).mean_probability)
    of_mirrored_scan = without_mirror.propose(mirrored_scan, "liver", num_proposals=1, seed=1).mean_probability
    np.testing.assert_allclose(odd_seed, of_mirrored_scan[:, ::-1], atol=1e-6)
    assert not np.allclose(odd_seed, of_mirrored_scan, atol=1e-3)
    both = with_mirror.propose(scan, "liver", num_proposals=2, seed=0).mean_probability
    np.testing.assert_allclose(both, (even_seed + odd_seed) / 2, atol=1e-6)  # each still reproducible from its seed


@pytest.mark.parametrize("family", SLICE_WISE)
def test_slice_smoothing_smooths_each_proposal_along_z_only(family):
    # The scan is on the tiny models' grid (6 x 6 x 9 mm, 32 x 32 in-plane), so the smoothed proposal
    # must be the unsmoothed one filtered along z. A random model's probabilities differ little
    # between slices, hence the small tolerances.
    rng = np.random.default_rng(1)
    scan = Volume(rng.integers(-200, 300, (8, 32, 32)).astype(np.int16), (6.0, 6.0, 9.0), (0.0, 0.0, 0.0))
    plain, smoothing = slice_wise_pair(family, slice_smoothing=1.0)
    sampled = plain.propose(scan, "liver", num_proposals=1, largest_component=False).mean_probability
    smoothed = smoothing.propose(scan, "liver", num_proposals=1, largest_component=False).mean_probability
    expected = ndimage.gaussian_filter1d(sampled, 1.0, axis=0, mode="nearest")
    np.testing.assert_allclose(smoothed, expected, rtol=0, atol=1e-6)
    assert np.abs(smoothed - sampled).max() > 2e-5


def test_the_slice_wise_families_are_the_three_that_sample_slice_by_slice():
    assert sorted(SLICE_WISE) == ["lcpdn", "progidiff", "universal"]


# --- training ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Three synthetic CTs on the tiny grid, with a box for each of the tiny models' structures."""
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(1)
    cases = []
    for index in range(3):
        image = rng.integers(-100, 100, (12, 40, 36)).astype(np.int16)
        label = np.zeros(image.shape, np.uint8)
        label[2:9, 5:20, 4:18], label[3:8, 22:35, 20:30], label[6:10, 25:32, 4:10], label[6:10, 25:32, 12:18] = 1, 2, 3, 4
        image[label > 0] += 50 * label[label > 0]
        for name, array in (("image", image), ("label", label)):
            itk = sitk.GetImageFromArray(array)
            itk.SetSpacing((6.0, 6.0, 9.0))
            sitk.WriteImage(itk, str(folder / f"{name}{index}.nii.gz"))
        cases.append({"image": str(folder / f"image{index}.nii.gz"), "label": str(folder / f"label{index}.nii.gz")})
    path = folder / "dataset.json"
    labels = {"0": "background", **{str(value): name for value, name in enumerate(TINY_STRUCTURES, 1)}}
    path.write_text(json.dumps({"name": "boxes", "modality": "CT", "labels": labels, "training": cases}))
    return path


def _settings(family, dataset, output, **overrides) -> TrainSettings:
    config, crop = TINY_FAMILIES[family]
    options = {k: v for k, v in config().to_dict().items() if k not in ("family", "name", "modality", "structures",
                                                                       "adapter", "latent_scale")}
    values = dict(data=str(dataset), output=str(output), family=family, batch_size=2, crop=crop, autoencoder_steps=2,
                  diffusion_steps=2, lr=1e-2, ema_decay=0.0, precision="fp32", cache_dir=str(output / "cache"),
                  model_options=options)
    return TrainSettings(**{**values, **overrides})


def _log(output) -> list[dict]:
    with (output / LOG_NAME).open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_two_training_steps_give_a_finite_loss_and_move_the_weights(family, dataset, tmp_path):
    base = save_model(tiny_model(family), tmp_path / "base")
    folder = train(_settings(family, dataset, tmp_path / "run", init_from=str(base)))
    rows = _log(tmp_path / "run")
    assert len(rows) == 2 and all(math.isfinite(float(row["loss"])) for row in rows)
    before, after = load_model(base).state_dict(), load_model(folder).state_dict()
    assert any(not torch.equal(before[name], after[name]) for name in before)


def test_resuming_continues_the_loss_log(family, dataset, tmp_path):
    train(_settings(family, dataset, tmp_path, checkpoint_every=1))
    first = _log(tmp_path)
    train(_settings(family, dataset, tmp_path, diffusion_steps=4, checkpoint_every=1))
    rows = _log(tmp_path)
    assert rows[:len(first)] == first
    last = rows[-1]["stage"]
    assert [int(row["step"]) for row in rows if row["stage"] == last] == [1, 2, 3, 4]


def test_the_3d_family_samples_and_trains_in_3d_windows(monkeypatch, dataset, tmp_path):
    monkeypatch.setitem(FAMILIES, "tiny3d", TINY3D)
    model = tiny_model("tiny3d")
    result = Segmenter(model, "tiny", torch.device("cpu")).propose(SCAN, "liver", num_proposals=1, steps=2)
    assert result.fused.shape == SCAN.array.shape
    assert set(model.window_shapes) >= {(8, 16, 16)}  # the 12 x 40 x 36 grid went through in 3D windows
    folder = train(_settings("tiny3d", dataset, tmp_path))
    assert load_model(folder).config.family == "tiny3d"
