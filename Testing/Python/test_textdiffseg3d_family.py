"""The TextDiffSeg 3D family's own parts, on tiny configs (the conformance suite checks what every family must do)."""

from __future__ import annotations

import contextlib
import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import TINY_STRUCTURES, random_text

from TextDiffSegLib.datasets import PreparedCase
from TextDiffSegLib.errors import DataError
from TextDiffSegLib.families.base import stacked
from TextDiffSegLib.families.textdiffseg3d import (TextDiffSeg3DConfig, TextDiffSeg3DModel, TextDiffSeg3DPredictor,
                                                   card_text)
from TextDiffSegLib.families.textdiffseg3d_training import PatchSampler, TextDiffSeg3DRecipe
from TextDiffSegLib.preprocessing import lateral_position
from TextDiffSegLib.text_encoders import TextEmbedding
from TextDiffSegLib.training import TrainSettings


def tiny(**overrides) -> TextDiffSeg3DModel:
    values = dict(name="tiny-3d", structures=TINY_STRUCTURES, spacing=(6.0, 6.0, 9.0), window=(16, 16, 16),
                  default_steps=2, label_channels=(4, 8, 8), image_channels=(8, 8, 8), image_feature_channels=8,
                  attention_heads=2, unet_channels=(8, 8), unet_attention=(False, True))
    torch.manual_seed(0)
    model = TextDiffSeg3DModel(TextDiffSeg3DConfig(**{**values, **overrides})).eval()
    with torch.no_grad():  # MONAI starts the denoiser's last convolution at zero: a trained one reads its input
        for parameter in model.unet.out.parameters():
            parameter.normal_(std=0.1)
    return model


def test_every_part_works_on_the_latent_grid_four_times_coarser():
    model = tiny()
    image, mask = torch.rand(2, 1, 16, 16, 32), (torch.rand(2, 1, 16, 16, 32) > 0.5).float()
    features = model.image_encoder(image)
    latent = model.label_autoencoder.encode(mask)
    assert features.shape == (2, 8, 4, 4, 8) and latent.shape == (2, 4, 4, 4, 8)
    assert model.label_autoencoder.decode(latent).shape == mask.shape
    prompt = random_text()
    chosen = model.text_of(TextEmbedding(*(t.expand(2, *t.shape[1:]) for t in (prompt.tokens, prompt.mask,
                                                                                 prompt.pooled))),
                           torch.tensor([0, 1]))
    embedding = model.cross_modal(features, chosen.tokens, chosen.mask)
    assert embedding.shape == features.shape
    assert model.denoise(latent, torch.tensor(10), embedding).shape == latent.shape


def test_label_latents_are_standardised():
    """The encoder's last normalisation learns the training masks' statistics: their latents come out with
    mean 0 and standard deviation 1 per channel, as the noise they are mixed with."""
    encoder = tiny().label_autoencoder.train()
    torch.manual_seed(2)
    masks = [(torch.rand(4, 1, 8, 16, 16) > 0.7).float() for _ in range(100)]
    with torch.no_grad():
        encoder.encoder[-2].weight *= 100  # spread as a trained encoder's: random weights give near-constant latents
        for batch in masks:
            encoder.encode(batch)
        latents = encoder.eval().encode(torch.cat(masks[:20]))
    assert latents.mean(dim=(0, 2, 3, 4)).abs().max() < 0.1
    assert (latents.std(dim=(0, 2, 3, 4)) - 1).abs().max() < 0.1


@pytest.mark.parametrize("shape", [(32, 48, 64), (16, 16, 16)], ids=["windows that do not divide it", "one window"])
def test_a_volume_of_any_size_is_sampled_whole_and_by_seed(shape):
    predictor = TextDiffSeg3DPredictor(tiny(), torch.device("cpu"))
    assert predictor.size_multiple == (8, 8, 8)  # the segmenter pads scans to this
    image = np.random.default_rng(0).random(shape, dtype=np.float32)
    prepared = predictor.prepare(image, (6.0, 6.0, 9.0))
    assert prepared.shape == (1, 8, *(s // 4 for s in shape))
    condition = predictor.condition(random_text(), 0)
    steps = []
    first = predictor.sample(prepared, condition, 3, 2, "ddim", lambda step, total: steps.append((step, total)))
    assert first.shape == shape and first.dtype == np.float32 and 0 <= first.min() and first.max() <= 1
    assert steps == [(1, 2), (2, 2)]
    np.testing.assert_array_equal(first, predictor.sample(prepared, condition, 3, 2, "ddim", lambda *a: None))
    assert not np.array_equal(first, predictor.sample(prepared, condition, 4, 2, "ddim", lambda *a: None))


def test_padding_tokens_are_not_read():
    model, features = tiny(), torch.rand(1, 8, 4, 4, 4)
    prompt = random_text(tokens=3)
    padded_tokens = torch.cat([prompt.tokens, 100 * torch.randn(1, 2, 384)], dim=1)
    padded_mask = torch.cat([prompt.mask, torch.zeros(1, 2)], dim=1)
    torch.testing.assert_close(model.cross_modal(features, prompt.tokens, prompt.mask),
                               model.cross_modal(features, padded_tokens, padded_mask))


def test_the_prompt_steers_the_embedding():
    model, features = tiny(), torch.rand(1, 8, 4, 4, 4)
    one = random_text()
    other = TextEmbedding(-one.tokens, one.mask, one.pooled)
    assert not torch.allclose(model.cross_modal(features, one.tokens, one.mask),
                              model.cross_modal(features, other.tokens, other.mask))


def test_a_learned_embedding_per_structure_is_a_one_token_text():
    model = tiny(conditioning="learned")
    learnt = model.text_of(None, torch.tensor([2, 0]))
    assert learnt.tokens.shape == (2, 1, 384) and learnt.mask.tolist() == [[1.0], [1.0]]
    torch.testing.assert_close(learnt.tokens[0, 0], model.structure_tokens.weight[2])
    torch.testing.assert_close(learnt.pooled, learnt.tokens[:, 0])


def test_the_denoiser_reads_the_pooled_prompt_only_where_the_config_asks():
    latent, embedding, timestep = torch.randn(2, 4, 4, 4, 4), torch.randn(2, 8, 4, 4, 4), torch.tensor(10)
    one, other = torch.randn(1, 384), torch.randn(1, 384)
    with torch.no_grad():
        model = tiny(prompt_in_denoiser=True)
        for parameter in model.unet.parameters():  # MONAI starts each residual branch at zero: a trained one reads
            if not parameter.any():                # the time embedding, and so the prompt
                parameter.normal_(std=0.1)
        assert not torch.allclose(model.denoise(latent, timestep, embedding, one),
                                  model.denoise(latent, timestep, embedding, other))
        torch.testing.assert_close(model.denoise(latent, timestep, embedding, one)[1:],
                                   model.denoise(latent[1:], timestep, embedding[1:], one))
        model = tiny()
        torch.testing.assert_close(model.denoise(latent, timestep, embedding, one),
                                   model.denoise(latent, timestep, embedding, other))
    assert "pooled embedding" in card_text(tiny(prompt_in_denoiser=True).config)[-1]


@pytest.mark.parametrize("prompt_in_denoiser", [False, True])
def test_training_wants_3d_patches_and_the_loss_trains_every_part(prompt_in_denoiser):
    model = tiny(prompt_in_denoiser=prompt_in_denoiser).train()
    trainer = SimpleNamespace(device=torch.device("cpu"), autocast=contextlib.nullcontext)
    settings = TrainSettings(data="", output="", crop=(32, 32), present_fraction=0.75, diffusion_steps=2, lr=1e-3)
    with pytest.raises(DataError, match=r"three sides \(z, y, x\).*--crop 16,16,16"):
        TextDiffSeg3DRecipe(model, settings, trainer)
    recipe = TextDiffSeg3DRecipe(model, dataclasses.replace(settings, crop=(16, 16, 16)), trainer)
    recipe.text = TextEmbedding(torch.randn(4, 3, 384), torch.ones(4, 3), torch.randn(4, 384))
    batch = (torch.rand(2, 1, 16, 16, 16), (torch.rand(2, 1, 16, 16, 16) > 0.5).float(), torch.tensor([0, 3]))
    optimiser = torch.optim.AdamW(model.parameters(), 1e-3)
    for _ in range(2):  # MONAI's U-Net starts with a zero output layer: what lies before it learns from step 2 on
        optimiser.zero_grad()
        loss = recipe.loss(batch)
        loss.backward()
        optimiser.step()
    assert torch.isfinite(loss)
    for part in ("image_encoder", "cross_attention", "label_autoencoder.encoder", "label_autoencoder.decoder", "unet"):
        gradients = [p.grad for name, p in model.named_parameters() if name.startswith(part)]
        assert gradients and all(g is not None for g in gradients) and any(g.abs().sum() > 0 for g in gradients), part


def test_the_lateral_position_is_read_beside_the_scan_measured_on_whole_slices():
    model = tiny(lateral_position=True)
    assert "left-right position" in card_text(model.config)[-1] and "left-right" not in " ".join(card_text(tiny().config))
    image = np.random.default_rng(0).random((16, 16, 16), dtype=np.float32)  # one window
    image[..., :5] = 0  # air on the patient's right: the body's middle is off the scan's centre
    prepared = TextDiffSeg3DPredictor(model, torch.device("cpu")).prepare(image, (6.0, 6.0, 9.0))
    with torch.no_grad():
        read = model.image_encoder(torch.from_numpy(np.stack([image, lateral_position(image, 6.0)]))[None])
    torch.testing.assert_close(prepared, read)

    # training patches carry it as a second channel, measured on the case's whole slices, not on the patch's
    case = PreparedCase("c", np.full((16, 16, 48), 200, np.uint8), np.ones((16, 16, 48), np.uint8), ("liver",))
    sampler = PatchSampler([case], ("liver",), (16, 16, 16), present_fraction=0.5, seed=0, position_spacing=6.0)
    starts = set()
    for _ in range(8):
        patch, mask, label = sampler._item()
        assert patch.shape == (2, 16, 16, 16) and mask.shape == (1, 16, 16, 16)
        start = patch[1, 0, 0, 0] / 0.06 + 23.5  # the body's middle: column 23.5 of the case's 48
        assert start == pytest.approx(round(start), abs=0.02)
        np.testing.assert_allclose(patch[1], np.broadcast_to((np.arange(16) + round(start) - 23.5) * 0.06, (16, 16, 16)),
                                   atol=2e-3)
        starts.add(round(start))
    assert starts - {16}  # where a patch measured its own middle, every start would look like 16

    recipe = TextDiffSeg3DRecipe(model.train(), TrainSettings(data="", output="", crop=(16, 16, 16), present_fraction=0.5,
                                                              diffusion_steps=1, lr=1e-3),
                                 SimpleNamespace(device=torch.device("cpu"), autocast=contextlib.nullcontext))
    recipe.text = TextEmbedding(torch.randn(4, 3, 384), torch.ones(4, 3), torch.randn(4, 384))
    assert torch.isfinite(recipe.loss(tuple(map(torch.as_tensor, stacked([sampler._item(), sampler._item()])))))


def test_the_decoded_mask_loss_prices_a_false_positive_by_its_size_and_a_missed_small_structure_as_a_large_one():
    masks = torch.zeros(3, 1, 8, 16, 16)
    masks[0, :, 2:6, 2:14, 2:14] = 1  # a large structure
    masks[1, :, 3:5, 7:9, 7:9] = 1  # a small one
    reconstructed = masks * 20 - 10  # the autoencoder perfect
    found = masks * 20 - 10
    stray = found.clone()
    stray[2, :, 0, 0, :2] = 10  # two stray voxels in the patch without the structure
    missed_small = found.clone()
    missed_small[1] = -10
    labels = torch.tensor([0, 1, 2])

    def loss(decoded):
        return TextDiffSeg3DRecipe.segmentation_loss(decoded, reconstructed, masks, labels).item()

    assert loss(stray) < 0.1 and loss(missed_small) > 0.4


def test_the_train_command_trains_and_the_model_segments(shared_data, tmp_path, capsys):
    """``textdiffseg train --family textdiffseg3d --crop Z,Y,X`` on two real CHAOS cases (tiny widths, 2 steps),
    then ``textdiffseg segment`` with the model it wrote."""
    import json

    from TextDiffSegLib import cli
    from TextDiffSegLib.modelio import read_config

    chaos = shared_data / "chaos_t2"
    description = json.loads((chaos / "dataset.json").read_text())
    description["training"] = [{"image": str(chaos / f"imagesTr/{case}.nii.gz"), "label": str(chaos / f"labelsTr/{case}.nii.gz")}
                               for case in ("chaos_t2_01", "chaos_t2_02")]
    dataset = tmp_path / "dataset.json"
    dataset.write_text(json.dumps(description))
    options = ["spacing=6,6,9", "window=16,16,16", "label_channels=4,8,8", "image_channels=8,8,8",
               "image_feature_channels=8", "attention_heads=2", "unet_channels=8,8", "unet_attention=false,true",
               "lateral_position=true", "prompt_in_denoiser=true"]
    output = tmp_path / "run"
    assert cli.main(["train", "--family", "textdiffseg3d", "--data", str(dataset), "--output", str(output),
                     "--steps", "2", "--batch-size", "2", "--crop", "16,16,16", "--device", "cpu",
                     *[arg for option in options for arg in ("--model-option", option)]]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {output / 'model'} (its ")
    config = read_config(output / "model")
    assert config.family == "textdiffseg3d" and config.window == (16, 16, 16) and config.modality == "MR"
    assert config.lateral_position and config.prompt_in_denoiser
    result = tmp_path / "liver.seg.nrrd"
    assert cli.main(["segment", "-i", str(chaos / "imagesTr/chaos_t2_05.nii.gz"), "-p", "liver", "-o", str(result),
                     "--model", str(output / "model"), "--proposals", "2", "--steps", "2", "--progress", "none"]) == 0
    assert result.is_file()


def test_a_training_masks_latent_does_not_depend_on_the_other_masks_of_its_batch():
    """The denoiser is trained to predict a patch's clean latent: it must be the patch's own, whatever the batch."""
    encoder = tiny().label_autoencoder.train()
    kidney, liver, empty = torch.zeros(3, 1, 1, 16, 16, 16)
    kidney[..., 6:10, 6:10, 6:10], liver[..., 2:14, 2:14, 2:14] = 1, 1
    with torch.no_grad():
        with_liver = encoder.encode(torch.cat([kidney, liver]))[:1]
        encoder.encoder[-1].momentum = 0.0  # (the running statistics, updated by every training batch, held still)
        with_empty = encoder.encode(torch.cat([kidney, empty]))[:1]
        alone = encoder.eval().encode(kidney)
    torch.testing.assert_close(with_liver, alone)
    torch.testing.assert_close(with_empty, alone)


def test_the_recipe_draws_timesteps_where_the_loss_is_high_and_checkpoints_their_losses():
    model = tiny().train()
    trainer = SimpleNamespace(device=torch.device("cpu"), autocast=contextlib.nullcontext)
    settings = TrainSettings(data="", output="", crop=(16, 16, 16), present_fraction=0.75, diffusion_steps=2, lr=1e-3)
    recipe = TextDiffSeg3DRecipe(model, settings, trainer)
    recipe.text = TextEmbedding(torch.randn(4, 3, 384), torch.ones(4, 3), torch.randn(4, 384))
    batch = (torch.rand(2, 1, 16, 16, 16), (torch.rand(2, 1, 16, 16, 16) > 0.5).float(), torch.tensor([0, 3]))
    with torch.no_grad():
        recipe.loss(batch)
    assert (~torch.isnan(recipe.state()["timestep_losses"])).sum() == 2  # each patch's loss kept with its timestep
    resumed = TextDiffSeg3DRecipe(tiny(), settings, trainer)
    resumed.load_state(recipe.state())
    torch.testing.assert_close(resumed.timesteps.losses, recipe.timesteps.losses, equal_nan=True)
    high = TextDiffSeg3DRecipe(tiny(), dataclasses.replace(settings, high_noise_share=0.5), trainer)
    assert (recipe.timesteps.high_noise_share, high.timesteps.high_noise_share) == (0.0, 0.5)
