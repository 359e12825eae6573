"""The LCPDN family's own parts, on tiny random models (the conformance suite checks what every family must do)."""

from __future__ import annotations

import contextlib
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import TINY_STRUCTURES, random_text
from test_family_conformance import dataset  # noqa: F401 (a fixture)
from torch import nn

from TextDiffSegLib.errors import DataError, ModelError
from TextDiffSegLib.families.lcpdn import (LTFR, CLIPPatchEncoder, CrossAttentionFusion, LCPDNConfig, LCPDNModel,
                                           LCPDNPredictor, PatchEncoder, card_text, grown, pixel_tokens,
                                           replicated_tokens)
from TextDiffSegLib.families.lcpdn_training import LCPDNRecipe
from TextDiffSegLib.text_encoders import TextEmbedding
from TextDiffSegLib.training import TrainSettings

TINY = dict(name="tiny-lcpdn", structures=TINY_STRUCTURES, spacing=(6.0, 6.0, 9.0), window=(16, 16), default_steps=2,
            unet_channels=(8, 16), attention_heads=2, cross_attention=(False, True), encoder_channels=(8, 8),
            prompt_dim=8, classifier_channels=8)


def tiny(seed: int = 0, **overrides) -> LCPDNModel:
    torch.manual_seed(seed)
    return LCPDNModel(LCPDNConfig(**{**TINY, **overrides})).eval()


def test_the_defaults_are_lightweight_and_read_the_papers_timesteps():
    config = LCPDNConfig(name="default", structures=TINY_STRUCTURES)
    parameters = sum(p.numel() for p in LCPDNModel(config).parameters())
    assert 1.5e6 < parameters < 4.52e6  # the paper's LCPDN: 4.52 M
    assert config.timesteps(config.default_steps).tolist() == [50, 150, 250]
    assert config.timesteps(1).tolist() == [50]


def test_cprfl_prompts_the_timestep_embedding_from_text_tokens_attending_image_tokens():
    model, images = tiny(), torch.rand(3, 1, 32, 32)
    visual = model.image_encoder(images)
    assert isinstance(model.image_encoder, PatchEncoder) and visual.shape == (3, 4, 8)  # 16-pixel patches
    prompt = random_text(tokens=5)
    out = model.prompt(prompt.tokens.expand(3, -1, -1), prompt.mask.expand(3, -1), visual)
    assert out.shape == (3, 4 * 8)  # diffusers' timestep-embedding width: 4 x the first level's
    assert model.unet.config.class_embed_type == "identity"
    # Eqs. 1-3 by hand: softmax(QK^T / sqrt(D)) V, tanh(Z) * Q, the mean over the tokens.
    query, key, value = model.prompt.query(prompt.tokens[0]), model.prompt.key(visual[0]), model.prompt.value(visual[0])
    attended = torch.softmax(query @ key.T / 8 ** 0.5, -1) @ value
    expected = model.prompt.to_timestep_embedding((torch.tanh(attended) * query).mean(0))
    torch.testing.assert_close(out[0], expected)
    # Padding tokens do not count in the mean.
    padded = model.prompt(torch.cat([prompt.tokens, torch.randn(1, 2, 384)], 1),
                          torch.cat([prompt.mask, torch.zeros(1, 2)], 1), visual[:1])
    torch.testing.assert_close(padded[0], out[0])
    # The prompt reaches the U-Net: another image changes its features.
    noisy = torch.randn(1, 1, 32, 32)
    first = model.diffuse(noisy, images[:1], torch.tensor(50), prompt)[1][-1]
    assert not torch.allclose(first, model.diffuse(noisy, images[1:2], torch.tensor(50), prompt)[1][-1])


@pytest.mark.parametrize("stem", [1, 2])
def test_the_unet_gives_a_noise_prediction_and_one_feature_map_per_decoder_block(stem):
    model = tiny(stem=stem)
    assert model.unet.config.in_channels == model.unet.config.out_channels == stem ** 2  # slices folded by the stem
    noisy = torch.randn(2, 1, 32, 24)
    prediction, features = model.diffuse(noisy, torch.rand(2, 1, 32, 24), torch.tensor([50, 250]), random_text())
    assert prediction.shape == noisy.shape  # unfolded back to the slice
    # The decoder blocks' outputs (upsampled within the U-Net) on the folded slice's grid.
    assert [f.shape for f in features] == [(2, 16, 32 // stem, 24 // stem), (2, 8, 32 // stem, 24 // stem)]
    assert model.segment(noisy, torch.rand(2, 1, 32, 24), torch.tensor(50), random_text()).shape == (2, 1, 32, 24)


def test_text_tokens_are_replicated_or_truncated_to_the_visual_tokens():
    tokens = torch.arange(5.0).view(1, 5, 1).repeat(2, 1, 1)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert replicated_tokens(tokens, mask, 7)[..., 0].tolist() == [[0, 1, 2, 0, 1, 2, 0], [0, 1, 2, 3, 4, 0, 1]]
    assert replicated_tokens(tokens, mask, 2)[..., 0].tolist() == [[0, 1], [0, 1]]


def test_ltfr_gates_between_fused_and_visual_features_and_multiplies_by_the_visual_features():
    torch.manual_seed(0)
    fusion, features, prompt = LTFR(8, 384), torch.randn(2, 8, 4, 6), random_text(tokens=3)
    tokens, mask = prompt.tokens.expand(2, -1, -1), prompt.mask.expand(2, -1)
    out = fusion(features, tokens, mask)
    assert out.shape == features.shape
    visual = pixel_tokens(features)
    aligned = replicated_tokens(fusion.align_text(tokens), mask, 24)
    mixed, weight = fusion.mix(visual, aligned)
    assert weight.shape == (2, 24, 1) and 0 < weight.min() and weight.max() < 1  # one lambda per position
    joined = torch.cat([visual, aligned], -1)
    torch.testing.assert_close(mixed, weight * fusion.mlp(joined) + (1 - weight) * visual)  # eq. 9
    torch.testing.assert_close(out, (mixed * visual).transpose(1, 2).reshape(features.shape))  # eq. 10
    assert not fusion(torch.zeros_like(features), tokens, mask).any()  # no visual features, nothing fused


def test_the_ablations_change_the_modules_as_the_papers_table_2():
    full = tiny()
    assert {"image_encoder", "prompt"} <= dict(full.named_children()).keys()
    assert all(isinstance(f, LTFR) for f in full.fusions)
    without_cprfl = tiny(cprfl=False)
    assert not {"image_encoder", "prompt"} & dict(without_cprfl.named_children()).keys()
    assert without_cprfl.unet.config.class_embed_type is None
    noisy, image, prompt = torch.randn(1, 1, 16, 16), torch.rand(1, 1, 16, 16), random_text()
    assert without_cprfl.segment(noisy, image, torch.tensor(50), prompt).shape == (1, 1, 16, 16)
    attention = tiny(fusion="cross_attention")
    assert all(isinstance(f, CrossAttentionFusion) for f in attention.fusions)
    assert not any(isinstance(m, LTFR) for m in attention.modules())
    assert any(isinstance(m, nn.MultiheadAttention) for m in attention.fusions.modules())
    assert attention.segment(noisy, image, torch.tensor(50), prompt).shape == (1, 1, 16, 16)
    assert "without CPRFL" in card_text(without_cprfl.config)[2]
    assert "cross-attention in place of LTFR" in card_text(attention.config)[2]
    assert "folded 2 x 2 pixels into channels" in card_text(attention.config)[1]
    assert len(card_text(tiny(stem=1).config)) == 1  # the paper's pixel-space U-Net: nothing to add


def test_the_config_refuses_what_the_family_cannot_do():
    for options, message in ((dict(conditioning="learned"), "conditioning must be 'text'"),
                             (dict(window=(18, 18)), "multiple of 4"), (dict(fusion="sum"), "fusion must be"),
                             (dict(stem=0), "stem, unet_layers"),
                             (dict(context_slices=-1), "context_slices must be 0 or more"),
                             (dict(timestep_range=(300, 50)), "timestep_range"),
                             (dict(cross_attention=(True,)), "cross_attention must say")):
        with pytest.raises(ModelError, match=message):
            LCPDNConfig(**{**TINY, **options})


@pytest.mark.parametrize("inputs", [dict(), dict(context_slices=1, lateral_position=True)],
                         ids=["one slice", "neighbours and position"])
@pytest.mark.parametrize("shape", [(3, 40, 36), (40, 16, 16)], ids=["sliding windows", "two slice batches"])
def test_proposals_are_probabilities_of_the_scans_shape_and_reproduce_by_seed(shape, inputs):
    predictor = LCPDNPredictor(tiny(**inputs), torch.device("cpu"))
    assert predictor.size_multiple == (1, 4, 4) and not predictor.mirrors  # the stem of 2, one downsampling
    prepared = predictor.prepare(np.random.default_rng(0).random(shape, dtype=np.float32), (6.0, 6.0, 9.0))
    assert prepared.shape == (shape[0], predictor.config.image_in_channels, *shape[1:])
    condition = predictor.condition(random_text(), 0)
    steps = []
    first = predictor.sample(prepared, condition, 3, 2, "ddim", lambda step, total: steps.append((step, total)))
    assert first.shape == shape and first.dtype == np.float32 and 0 <= first.min() and first.max() <= 1
    assert steps[-1][0] == steps[-1][1] == 2 * -(-shape[0] // 32)  # two timesteps per batch of 32 slices
    np.testing.assert_array_equal(first, predictor.sample(prepared, condition, 3, 2, "ddim", lambda *a: None))
    assert not np.array_equal(first, predictor.sample(prepared, condition, 4, 2, "ddim", lambda *a: None))


# --- a CLIP vision model from a local folder -------------------------------------------------------------------


@pytest.fixture
def clip_vision_folder(tmp_path):
    """A tiny random CLIP vision model saved with ``save_pretrained``."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(5)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     image_size=32, patch_size=8)).save_pretrained(tmp_path / "clip")
    return tmp_path / "clip"


def test_a_clip_vision_folder_gives_the_frozen_image_encoder(clip_vision_folder):
    from transformers import CLIPVisionModel

    model = tiny(clip_vision=str(clip_vision_folder))
    assert isinstance(model.image_encoder, CLIPPatchEncoder) and model.prompt.key.in_features == 16
    saved = CLIPVisionModel.from_pretrained(clip_vision_folder).state_dict()
    assert all(torch.equal(saved[name], value) for name, value in model.image_encoder.clip.state_dict().items())
    assert not any(p.requires_grad for p in model.image_encoder.parameters())
    recipe = LCPDNRecipe(model.train(), settings(), trainer())
    assert not {id(p) for p in model.image_encoder.parameters()} & {id(p) for p in recipe.trainable_parameters()}
    calls = []
    model.image_encoder.clip.register_forward_hook(lambda module, inputs, output: calls.append(inputs))
    images = torch.rand(2, 1, 16, 16)
    model.segment(torch.randn(2, 1, 16, 16), images, torch.tensor(50), random_text())
    assert len(calls) == 1
    assert model.image_encoder(images).shape == (2, 1 + (32 // 8) ** 2, 16)  # the class token and 16 patches


def test_a_missing_clip_vision_folder_is_refused(tmp_path):
    with pytest.raises(ModelError, match="has no config.json"):
        tiny(clip_vision=str(tmp_path))


def test_neighbouring_slices_and_the_lateral_position_are_read_by_the_unet_and_the_patch_encoder():
    model = tiny(context_slices=1, lateral_position=True)
    assert (model.unet.config.in_channels, model.unet.config.out_channels) == (4 * 4, 3 * 4)  # folded by the stem
    assert "1 neighbouring slice each side and the lateral position" in card_text(model.config)[1]
    noisy, image, timestep = torch.randn(2, 3, 32, 24), torch.rand(2, 4, 32, 24), torch.tensor([50, 250])
    with torch.no_grad():
        prediction, _ = model.diffuse(noisy, image, timestep, random_text())
        assert prediction.shape == noisy.shape  # the noise of the slice and of each neighbour
        logits = model.segment(noisy, image, timestep, random_text())
        assert logits.shape == (2, 1, 32, 24)
        for changed in (noisy.clone(), image.clone()):  # a neighbour in the U-Net's input; the position
            changed[:, -1] += 1
            arguments = (changed, image) if changed.shape[1] == 3 else (noisy, changed)
            assert not torch.allclose(model.segment(*arguments, timestep, random_text()), logits)


@pytest.mark.parametrize("start, wider", [(dict(), dict(context_slices=1, lateral_position=True)),
                                          (dict(context_slices=1, lateral_position=True), dict(context_slices=2))],
                         ids=["one slice to three and the position", "three slices to five"])
def test_a_grown_model_segments_as_the_model_it_grew_from(start, wider):
    model = tiny(**start)
    bigger = grown(model, LCPDNConfig(**{**TINY, **start, **wider})).eval()
    old, new = model.config, bigger.config
    image = torch.rand(2, new.image_in_channels, 32, 32)
    noisy = torch.randn(2, new.slice_channels, 32, 32)
    kept = list(range(new.context_slices - old.context_slices, new.context_slices + old.context_slices + 1))
    old_image = torch.cat([image[:, kept], image[:, new.slice_channels:][:, :int(old.lateral_position)]], 1)
    timestep, prompt = torch.tensor([50, 250]), random_text()
    with torch.no_grad():
        torch.testing.assert_close(bigger.segment(noisy, image, timestep, prompt),
                                   model.segment(noisy[:, kept], old_image, timestep, prompt))
        prediction, _ = bigger.diffuse(noisy, image, timestep, prompt)
        torch.testing.assert_close(prediction[:, kept], model.diffuse(noisy[:, kept], old_image, timestep, prompt)[0])
        assert not prediction[:, [c for c in range(new.slice_channels) if c not in kept]].any()  # new slices: zero


# --- training ----------------------------------------------------------------------------------------------------


def trainer() -> SimpleNamespace:
    return SimpleNamespace(device=torch.device("cpu"), autocast=contextlib.nullcontext)


def settings(**overrides) -> TrainSettings:
    values = dict(crop=(16, 16), autoencoder_steps=2, diffusion_steps=3, lr=1e-2)
    return TrainSettings(data="", output="", **{**values, **overrides})


def test_training_denoises_the_images_first_then_segments_with_ce_and_dice():
    model = tiny().train()
    with pytest.raises(DataError, match="multiples of 4"):  # the stem of 2 and one downsampling
        LCPDNRecipe(model, settings(crop=(15, 15)), trainer())
    with pytest.raises(DataError, match="uniformly over the whole schedule; --high-noise-share is for"):
        LCPDNRecipe(model, settings(high_noise_share=0.5), trainer())
    recipe = LCPDNRecipe(model, settings(), trainer())
    assert [(s.name, s.steps, s.new_models_only, s.averaged) for s in recipe.stages()] == [
        ("denoiser", 2, True, False), ("segmentation", 3, False, True)]
    recipe.text = TextEmbedding(torch.randn(4, 3, 384), torch.ones(4, 3), torch.randn(4, 384))
    batch = (torch.rand(2, 1, 16, 16), (torch.rand(2, 1, 16, 16) > 0.5).float(), torch.tensor([0, 3]))
    denoiser, segmentation = recipe.stages()
    denoiser.loss(batch).backward()
    with_gradients = {name.split(".")[0] for name, p in model.named_parameters() if p.grad is not None}
    assert with_gradients == {"unet", "image_encoder", "prompt"}
    model.zero_grad(set_to_none=True)
    segmentation.loss(batch).backward()
    assert all(p.grad is not None for name, p in model.named_parameters()
               if not name.startswith(("unet.conv_norm_out", "unet.conv_out")))  # the noise prediction is not read


def test_training_noises_the_slice_and_its_neighbours_and_reads_the_position_clean():
    model = tiny(context_slices=1, lateral_position=True).train()
    recipe = LCPDNRecipe(model, settings(), trainer())
    recipe.text = TextEmbedding(torch.randn(4, 3, 384), torch.ones(4, 3), torch.randn(4, 384))
    images = torch.rand(2, 4, 16, 16)
    seen = []
    diffuse = model.diffuse
    model.diffuse = lambda noisy, image, *args: seen.append((noisy, image)) or diffuse(noisy, image, *args)
    batch = (images, (torch.rand(2, 1, 16, 16) > 0.5).float(), torch.tensor([0, 3]))
    for stage in recipe.stages():
        assert torch.isfinite(stage.loss(batch))
    for noisy, image in seen:
        assert noisy.shape == (2, 3, 16, 16) and torch.equal(image, images)


def test_the_segmentation_loss_prices_a_false_positive_by_its_size_not_as_a_miss():
    """Dice over the batch: a sample without the structure, answered with a few stray pixels, costs little. With a
    Dice per sample it cost as much as missing the structure outright, and LCPDN's first run answered every prompt
    but the liver's with an empty mask."""
    recipe = LCPDNRecipe(tiny(), settings(), trainer())
    recipe.text = TextEmbedding(torch.randn(2, 3, 384), torch.ones(2, 3), torch.randn(2, 384))
    masks = torch.zeros(2, 1, 16, 16)
    masks[0, :, 4:12, 4:12] = 1  # the first sample has the structure, the second none
    stray = masks * 20 - 10
    stray[1, :, 0, :2] = 10  # two stray pixels where the structure is absent
    missed = torch.full_like(masks, -10.0)  # nothing anywhere
    segmentation = recipe.stages()[1]

    def loss(logits):
        recipe.model.segment = lambda *args: logits
        return segmentation.loss((torch.rand(2, 1, 16, 16), masks, torch.tensor([0, 1]))).item()

    assert loss(stray) < 0.1 and loss(missed) > 0.5


def test_the_segmentation_loss_prices_a_missed_small_structure_as_a_missed_large_one():
    """Beside a large structure found, a small one missed costs about half a missed Dice (the mean over the two
    structures), not the small one's share of the batch's pixels."""
    recipe = LCPDNRecipe(tiny(), settings(), trainer())
    recipe.text = TextEmbedding(torch.randn(2, 3, 384), torch.ones(2, 3), torch.randn(2, 384))
    masks = torch.zeros(2, 1, 16, 16)
    masks[0, :, 2:14, 2:14] = 1  # a large structure
    masks[1, :, 7:9, 7:9] = 1  # a small one, 36 times smaller
    found_large_only = masks * 20 - 10
    found_large_only[1] = -10
    recipe.model.segment = lambda *args: found_large_only
    loss = recipe.stages()[1].loss((torch.rand(2, 1, 16, 16), masks, torch.tensor([0, 1]))).item()
    assert loss > 0.5


@pytest.mark.filterwarnings("ignore::TextDiffSegLib.errors.ScanWarning")  # the synthetic scan is not a real CT
def test_textdiffseg_train_family_lcpdn_writes_a_model_the_segmenter_samples(dataset, tmp_path, capsys):  # noqa: F811
    from TextDiffSegLib import cli
    from TextDiffSegLib.modelio import load_model
    from TextDiffSegLib.segmenter import Segmenter
    from TextDiffSegLib.volume import read_volume

    options = ["spacing=6,6,9", "window=16,16", "unet_channels=8,16", "attention_heads=2", "cross_attention=false,true",
               "encoder_channels=8,8", "prompt_dim=8", "classifier_channels=8", "default_steps=2"]
    output = tmp_path / "run"
    assert cli.main(["train", "--family", "lcpdn", "--data", str(dataset), "--output", str(output), "--steps", "2",
                     "--autoencoder-steps", "2", "--batch-size", "2", "--crop", "16", "--device", "cpu",
                     *[arg for option in options for arg in ("--model-option", option)]]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {output / 'model'} (its ")
    model = load_model(output / "model")
    assert model.config.family == "lcpdn" and model.config.unet_channels == (8, 16)
    assert "timesteps read by default" in (output / "model" / "README.md").read_text()
    scan = read_volume(json.loads(dataset.read_text())["training"][0]["image"])
    result = Segmenter(model, "tiny-lcpdn", torch.device("cpu")).propose(scan, "liver", num_proposals=2, steps=2)
    assert result.fused.shape == scan.array.shape and len(result.proposals) == 2
    assert 0 <= result.mean_probability.min() and result.mean_probability.max() <= 1
