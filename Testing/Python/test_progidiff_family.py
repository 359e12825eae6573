"""The ProGiDiff family's own parts, on tiny random models (the conformance suite checks what every family must do)."""

from __future__ import annotations

import contextlib
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_STRUCTURES, random_text
from diffusers import AutoencoderKL, UNet2DConditionModel
from test_family_conformance import _settings, dataset  # noqa: F401 (a fixture)
from torch import nn

from TextDiffSegLib.adaptation import add_adapter, save_adapter, weights_sha256
from TextDiffSegLib.errors import DataError, ModelError
from TextDiffSegLib.families.progidiff import (LATENT_CLAMP, PROMPT_TOKENS, ProGiDiffConfig, ProGiDiffModel,
                                               ProGiDiffPredictor, card_text, grown, lora_targets, prompt_tokens)
from TextDiffSegLib.families.progidiff_training import ProGiDiffRecipe
from TextDiffSegLib.losses import mask_loss, prompted_mask_loss
from TextDiffSegLib.model_card import TRAINED_PARAMETERS, TRAINING_RECORD
from TextDiffSegLib.modelio import load_model, save_model
from TextDiffSegLib.preprocessing import slice_stacks
from TextDiffSegLib.text_encoders import TASKS, TextEmbedding, load_text_encoder
from TextDiffSegLib.training import TrainSettings, train

TINY = dict(name="tiny-progidiff", structures=TINY_STRUCTURES, spacing=(6.0, 6.0, 9.0), window=(16, 16),
            default_steps=2, autoencoder_channels=(8, 8), unet_channels=(8, 16), attention_heads=2,
            cross_attention=(False, True), conditioning_channels=(8, 8, 8))


def tiny(seed: int = 0, **overrides) -> ProGiDiffModel:
    torch.manual_seed(seed)
    return ProGiDiffModel(ProGiDiffConfig(**{**TINY, **overrides})).eval()


def trainer() -> SimpleNamespace:
    return SimpleNamespace(device=torch.device("cpu"), autocast=contextlib.nullcontext)


def settings(**overrides) -> TrainSettings:
    values = dict(crop=(16, 16), init_from="", autoencoder_steps=2, autoencoder_lr=1e-3, diffusion_steps=3, lr=1e-2,
                  decoded_mask_weight=1.0)
    return TrainSettings(data="", output="", **{**values, **overrides})


def test_every_part_works_on_the_latent_grid():
    model, d = tiny(), 2  # two autoencoder levels: a latent grid twice as coarse
    image, mask = torch.rand(3, 1, 16, 24), (torch.rand(3, 1, 16, 24) > 0.5).float()
    latent = model.encode_mask(mask)
    features = model.conditioning_encoder(image)
    assert latent.shape == (3, 4, 16 // d, 24 // d) and features.shape == (3, 8, 16 // d, 24 // d)
    assert model.decode_mask(latent).shape == mask.shape
    tokens = prompt_tokens(random_text())
    assert tokens.shape == (1, PROMPT_TOKENS, 384)
    assert model.denoise(latent, torch.tensor(10), tokens, features).shape == latent.shape
    assert model.denoise(latent, torch.randint(0, 1000, (3,)), tokens.expand(3, -1, -1)).shape == latent.shape


def test_the_paper_defaults_build_a_small_model_on_an_8_times_coarser_grid():
    config = ProGiDiffConfig(name="default", structures=TINY_STRUCTURES)
    model = ProGiDiffModel(config)
    assert config.downsampling == 8 and config.size_multiple == 32 and config.window == (192, 192)
    assert config.conditioning_channels == (16, 32, 64, 128, 256) and config.prediction_type == "epsilon"
    widths = [m.out_channels for m in model.conditioning_encoder.modules() if isinstance(m, nn.Conv2d)]
    assert widths[0] == 16 and {32, 64, 128} <= set(widths) and widths[-1] == 256
    assert sum(p.numel() for p in model.parameters()) * 2 < 12e6  # fp16 bytes


def test_a_prompt_reaches_the_model_the_same_alone_and_padded_in_a_batch():
    """Sampling encodes one prompt; training pads several to the longest: zeroed padding and a fixed length make
    their tokens identical, as the ControlNet cannot mask padding."""
    alone = random_text(tokens=3)
    padded = TextEmbedding(torch.cat([alone.tokens, torch.randn(1, 4, 384)], 1),
                           torch.cat([alone.mask, torch.zeros(1, 4)], 1), alone.pooled)
    torch.testing.assert_close(prompt_tokens(alone), prompt_tokens(padded))
    assert not prompt_tokens(alone)[0, 3:].any()


def test_a_zero_initialised_controlnet_leaves_the_backbone_unchanged():
    model = tiny()
    with torch.no_grad():  # a trained backbone, and the ControlNet started from it
        for parameter in model.unet.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
        model.start_controlnet_from_backbone()
    controlnet = dict(model.controlnet.named_parameters())
    assert all(torch.equal(controlnet[f"down_blocks.{name}"], p) for name, p in model.unet.down_blocks.named_parameters())
    latent, tokens = torch.randn(2, 4, 8, 8), prompt_tokens(random_text())
    features = 10 * torch.randn(2, 8, 8, 8)
    alone = model.denoise(latent, torch.tensor(500), tokens)
    torch.testing.assert_close(model.denoise(latent, torch.tensor(500), tokens, features), alone, rtol=0, atol=0)
    with torch.no_grad():  # once its zero convolutions have learnt, the image steers the backbone
        for parameter in model.controlnet.controlnet_down_blocks.parameters():
            parameter.normal_(std=0.1)
        model.controlnet.controlnet_cond_embedding.weight.normal_(std=0.1)
    assert not torch.allclose(model.denoise(latent, torch.tensor(500), tokens, features), alone)


@pytest.mark.parametrize("shape", [(3, 40, 36), (40, 16, 16)], ids=["sliding windows", "two slice batches"])
def test_proposals_are_probabilities_of_the_scans_shape_and_reproduce_by_seed(shape):
    predictor = ProGiDiffPredictor(tiny(), torch.device("cpu"))
    assert predictor.size_multiple == (1, 4, 4) and not predictor.mirrors
    image = np.random.default_rng(0).random(shape, dtype=np.float32)
    prepared = predictor.prepare(image, (6.0, 6.0, 9.0))
    assert prepared.shape == (shape[0], 8, shape[1] // 2, shape[2] // 2)
    condition = predictor.condition(random_text(), 0)
    steps = []
    first = predictor.sample(prepared, condition, 3, 2, "ddim", lambda step, total: steps.append((step, total)))
    assert first.shape == shape and first.dtype == np.float32 and 0 <= first.min() and first.max() <= 1
    assert steps[-1][0] == steps[-1][1] == 2 * -(-shape[0] // 32)  # two steps per batch of 32 slices
    np.testing.assert_array_equal(first, predictor.sample(prepared, condition, 3, 2, "ddim", lambda *a: None))
    assert not np.array_equal(first, predictor.sample(prepared, condition, 4, 2, "ddim", lambda *a: None))


def test_the_conditioning_encoder_reads_the_neighbouring_slices_and_the_lateral_position_where_asked(dataset, tmp_path):  # noqa: F811
    wide = dict(context_slices=1, lateral_position=True)
    predictor = ProGiDiffPredictor(tiny(**wide), torch.device("cpu"))
    assert predictor.model.conditioning_encoder.conv_in.in_channels == 4  # three slices and the position
    image = np.random.default_rng(0).random((5, 16, 16), dtype=np.float32)
    prepared = predictor.prepare(image, (6.0, 6.0, 9.0))
    with torch.no_grad():
        expected = predictor.model.conditioning_encoder(torch.from_numpy(slice_stacks(image, np.arange(5), 1, 6.0)))
    torch.testing.assert_close(prepared, expected)
    changed = image.copy()
    changed[3] = 0  # a neighbour of slice 2, not slice 2 itself
    assert not torch.allclose(predictor.prepare(changed, (6.0, 6.0, 9.0))[2], prepared[2])
    assert "encoder reads 1 neighbouring slice each side and the lateral position" in " ".join(card_text(predictor.config))
    tiny_options = _settings("progidiff", dataset, tmp_path / "run").model_options
    folder = train(_settings("progidiff", dataset, tmp_path / "run", model_options={**tiny_options, **wide}))
    assert load_model(folder).config.image_in_channels == 4


def test_a_grown_model_steers_as_the_model_it_grew_from():
    model = tiny()
    bigger = grown(model, ProGiDiffConfig(**{**TINY, "context_slices": 1, "lateral_position": True})).eval()
    image = torch.rand(2, 4, 16, 16)  # a slice between its neighbours, then the lateral position
    with torch.no_grad():
        torch.testing.assert_close(bigger.conditioning_encoder(image), model.conditioning_encoder(image[:, [1]]))
    assert all(torch.equal(bigger.state_dict()[name], value) for name, value in model.state_dict().items()
               if name != "conditioning_encoder.conv_in.weight")


def changed_by_training(model: nn.Module, stage, steps: int = 3) -> set[str]:
    """The parameters ``steps`` AdamW steps of ``stage`` change (no weight decay). The ControlNet's residuals
    pass zero convolutions: the first step moves those, the second what lies before them (its trunk and the
    conditioning features' zero convolution), the third the conditioning-image encoder."""
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimiser = torch.optim.AdamW(stage.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(steps):
        optimiser.zero_grad()
        stage.loss((torch.rand(2, 1, 16, 16), (torch.rand(2, 1, 16, 16) > 0.5).float(), torch.tensor([0, 3]))).backward()
        optimiser.step()
    return {name for name, p in model.named_parameters() if not torch.equal(before[name], p)}


def test_training_trains_the_backbone_then_the_controlnet_on_prompts_with_task_synonyms():
    model = tiny().train()
    with pytest.raises(DataError, match="multiples of 4"):
        ProGiDiffRecipe(model, settings(crop=(18, 18)), trainer())
    recipe = ProGiDiffRecipe(model, settings(), trainer())
    assert [(s.name, s.steps, s.new_models_only, s.averaged) for s in recipe.stages()] == [
        ("autoencoder", 2, True, False), ("backbone", 3, True, False), ("controlnet", 3, False, True)]
    recipe.prompts = torch.randn(len(TASKS), 4, PROMPT_TOKENS, 384)
    _, backbone, controlnet = recipe.stages()
    trained = changed_by_training(model, backbone)
    assert trained and all(name.startswith("unet.") for name in trained)
    backbone.finish()  # the ControlNet starts from the trained backbone
    trained = changed_by_training(model, controlnet)
    assert {name.split(".")[0] for name in trained} == {"controlnet", "conditioning_encoder"}
    assert all(not p.requires_grad for p in [*model.unet.parameters(), *model.mask_autoencoder.parameters()])


def test_training_from_scratch_trains_everything_together_with_the_same_budget():
    model = tiny(pretrain_backbone=False).train()
    stages = ProGiDiffRecipe(model, settings(), trainer()).stages()
    assert [(s.name, s.steps) for s in stages] == [("autoencoder", 2), ("diffusion", 6)]
    names = {id(p): n for n, p in model.named_parameters()}
    trained = {names[id(p)].split(".")[0] for p in stages[1].parameters()}
    assert trained == {"unet", "controlnet", "conditioning_encoder"}


def test_the_diffusion_loss_adds_the_segmentation_loss_of_the_decoded_clean_estimate():
    model = tiny(prediction_type="sample").train()
    images, masks, labels = torch.rand(3, 1, 16, 16), (torch.rand(3, 1, 16, 16) > 0.5).float(), torch.tensor([0, 3, 3])
    prompts = torch.randn(len(TASKS), 4, PROMPT_TOKENS, 384)
    losses = {}
    for weight in (0.0, 2.0):
        recipe = ProGiDiffRecipe(model, settings(decoded_mask_weight=weight), trainer())
        recipe.prompts = prompts
        torch.manual_seed(5)
        losses[weight] = recipe.controlled_loss((images, masks, labels)).item()
    torch.manual_seed(5)  # the same draws again: noise, timesteps, task verbs
    clean = model.encode_mask(masks)
    noise = torch.randn_like(clean)
    timesteps = torch.randint(0, model.config.num_train_timesteps, (3,))
    tokens = prompts[torch.randint(len(TASKS), (3,)), labels]
    with torch.no_grad():
        prediction = model.denoise(recipe.scheduler.add_noise(clean, noise, timesteps), timesteps, tokens,
                                   model.conditioning_encoder(images))
        decoded = model.decode_mask(prediction.clamp(-LATENT_CLAMP, LATENT_CLAMP))
    assert losses[0.0] == pytest.approx(F.mse_loss(prediction, clean).item(), rel=1e-5)  # SD's objective alone
    segmentation = prompted_mask_loss(decoded, masks, labels)
    assert segmentation > 0.1
    assert losses[2.0] == pytest.approx(losses[0.0] + 2 * segmentation.item(), rel=1e-5)
    # each sample's own loss is kept with its timestep, to draw the timesteps whose loss is high more often
    own = F.mse_loss(prediction, clean, reduction="none").flatten(1).mean(1) + 2 * mask_loss(decoded, masks)
    kept = recipe.timesteps.losses[~torch.isnan(recipe.timesteps.losses)]
    torch.testing.assert_close(kept.sort().values, own.sort().values, rtol=1e-5, atol=1e-6)


def test_the_autoencoder_stage_learns_masks_and_measures_the_latent_scale():
    model = tiny().train()
    masks = (torch.rand(4, 1, 16, 16) > 0.5).float()
    recipe = ProGiDiffRecipe(model, settings(), SimpleNamespace(**vars(trainer()), batch=lambda: (None, masks, None)))
    loss = recipe.stages()[0].loss((None, masks, None))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.mask_autoencoder.parameters())
    recipe.measure_latent_scale(batches=2)
    assert model.encode_mask(masks).std().item() == pytest.approx(1.0, rel=1e-3)
    assert recipe.state()["latent_scale"] == model.config.latent_scale


# --- LoRA adaptation (section 3.3) -------------------------------------------------------------------------------


def test_lora_goes_into_every_linear_layer_of_the_controlnet_and_trains_only_what_the_paper_trains(tmp_path):
    model = tiny()
    targets = lora_targets(model)
    assert {name.split(".")[-1] for name in targets} >= {"to_q", "to_k", "to_v", "proj", "linear_1", "time_emb_proj"}
    assert all(name.startswith("controlnet.") for name in targets)
    add_adapter(model, "base", "0" * 64, rank=2, alpha=2)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    kinds = {"lora": {n for n in trainable if ".lora_" in n},
             "encoder": {n for n in trainable if n.startswith("conditioning_encoder.")},
             "zero convolutions": {n for n in trainable if n.startswith(("controlnet.controlnet_cond_embedding.",
                                                                          "controlnet.controlnet_down_blocks.",
                                                                          "controlnet.controlnet_mid_block."))},
             "norms": {n for n in trainable if ".norm" in n and n.startswith("controlnet.")}}
    assert all(kinds.values()) and set().union(*kinds.values()) == trainable
    assert all(not p.requires_grad for n, p in model.named_parameters() if n.startswith(("unet.", "mask_autoencoder.")))
    # Training the ControlNet stage changes those and nothing else.
    recipe = ProGiDiffRecipe(model.train(), settings(init_from="base"), trainer())
    recipe.prompts = torch.randn(len(TASKS), 4, PROMPT_TOKENS, 384)
    changed = changed_by_training(model, recipe.stages()[-1])
    assert changed <= trainable and changed & kinds["lora"] and changed & kinds["encoder"]


def test_an_adapter_is_refused_on_other_base_weights(tmp_path):
    base = save_model(tiny(seed=0), tmp_path / "base")
    model = load_model(base)
    add_adapter(model, str(base), weights_sha256(base), rank=2, alpha=2)
    adapter = save_adapter(model, tmp_path / "adapter")
    assert load_model(adapter).config.adapter["base"] == str(base)
    save_model(tiny(seed=1), base)  # the base folder now holds other weights
    with pytest.raises(ModelError, match="holds other weights"):
        load_model(adapter)


def test_adapting_records_how_many_parameters_it_trained(dataset, tmp_path):  # noqa: F811
    """``textdiffseg train --init-from MODEL --lora-rank R``: the record and the card say what the adapter trained."""
    base = save_model(tiny(), tmp_path / "base")
    folder = train(_settings("progidiff", dataset, tmp_path / "run", init_from=str(base), lora_rank=2))
    adapted = add_adapter(tiny(), "base", "0" * 64, rank=2, alpha=2)
    trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    record = json.loads((folder / TRAINING_RECORD).read_text())[TRAINED_PARAMETERS]
    assert record == {"stage": "controlnet", "trained": trainable, "of": sum(p.numel() for p in adapted.parameters())}
    assert f"trained {trainable:,} of its" in (folder / "README.md").read_text()


# --- Stable Diffusion 1.x weights from a local folder ----------------------------------------------------------------


def _tiny_tokenizer(folder):
    """A character-level CLIP tokenizer (no merges): enough to tokenize the prompts."""
    from transformers import CLIPTokenizer

    characters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {c: i for i, c in enumerate(characters)}
    vocab.update({f"{c}</w>": i + len(characters) for i, c in enumerate(characters)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


@pytest.fixture
def stable_diffusion_folder(tmp_path):
    """A tiny random Stable Diffusion 1.x in diffusers' folder layout: unet/, vae/, text_encoder/, tokenizer/."""
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = tmp_path / "sd"
    torch.manual_seed(3)
    UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).save_pretrained(folder / "unet")
    AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, latent_channels=4
                  ).save_pretrained(folder / "vae")
    tokenizer = _tiny_tokenizer(tmp_path / "vocabulary")
    CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=77)).save_pretrained(folder / "text_encoder")
    tokenizer.save_pretrained(folder / "tokenizer")
    return folder


SD_BASE = dict(name="tiny-sd", structures=TINY_STRUCTURES, spacing=(6.0, 6.0, 9.0), window=(16, 16),
               conditioning_channels=(8, 8, 8))  # architecture options left out: the folder gives them


def test_a_stable_diffusion_folder_gives_the_backbone_autoencoder_and_text_encoder(stable_diffusion_folder):
    folder = stable_diffusion_folder
    config = ProGiDiffConfig.from_options({**SD_BASE, "unet_channels": [8, 16], "stable_diffusion": str(folder)})
    assert (config.unet_channels, config.cross_attention, config.attention_heads, config.text_embed_dim) == \
        ((8, 16), (True, False), 2, 32)
    assert config.text_encoder == config.stable_diffusion == str(folder.resolve())
    model = ProGiDiffModel(config).train()
    ProGiDiffRecipe(model, settings(), trainer())  # a new model: the recipe loads the folder's weights
    for part, module in (("unet", model.unet), ("vae", model.mask_autoencoder)):
        saved = (UNet2DConditionModel if part == "unet" else AutoencoderKL).from_pretrained(folder / part).state_dict()
        assert all(torch.equal(saved[name], value) for name, value in module.state_dict().items()), part
    assert torch.equal(model.controlnet.conv_in.weight, model.unet.conv_in.weight)
    encoder = load_text_encoder(config.text_encoder)
    tokens = prompt_tokens(encoder.encode(["segment the liver in this CT scan"]))
    assert tokens.shape == (1, PROMPT_TOKENS, 32)
    latent = model.encode_mask(torch.ones(1, 1, 16, 16))
    assert model.denoise(latent, torch.tensor(3), tokens, model.conditioning_encoder(torch.rand(1, 1, 16, 16))).shape \
        == latent.shape


@pytest.mark.filterwarnings("ignore::TextDiffSegLib.errors.ScanWarning")  # the synthetic scan is not a real CT
def test_a_model_trained_from_a_stable_diffusion_folder_segments_without_it(stable_diffusion_folder, dataset,  # noqa: F811
                                                                          tmp_path):
    """``textdiffseg train --family progidiff --model-option stable_diffusion=FOLDER``, then segmenting with the
    model it wrote once the folder's weights are gone (its text encoder is still read from the folder)."""
    from TextDiffSegLib.segmenter import Segmenter
    from TextDiffSegLib.volume import read_volume

    options = {"stable_diffusion": str(stable_diffusion_folder), "window": [16, 16], "conditioning_channels": [8, 8, 8]}
    folder = train(_settings("progidiff", dataset, tmp_path / "run", model_options=options))
    assert load_model(folder).config.unet_channels == (8, 16)
    for part in ("unet", "vae"):
        for weights in (stable_diffusion_folder / part).glob("*.safetensors"):
            weights.unlink()
    scan = read_volume(json.loads(dataset.read_text())["training"][0]["image"])
    result = Segmenter(load_model(folder), "tiny-sd", torch.device("cpu")).propose(scan, "liver", num_proposals=1, steps=2)
    assert result.fused.shape == scan.array.shape


def test_a_stable_diffusion_folder_refuses_other_settings_and_other_folders(stable_diffusion_folder, tmp_path):
    with pytest.raises(ValueError, match="unet_channels must be those of the Stable Diffusion folder"):
        ProGiDiffConfig.from_options({**SD_BASE, "unet_channels": (16, 32), "stable_diffusion": str(stable_diffusion_folder)})
    with pytest.raises(ValueError, match="is not a Stable Diffusion folder"):
        ProGiDiffConfig.from_options({**SD_BASE, "stable_diffusion": str(tmp_path)})
