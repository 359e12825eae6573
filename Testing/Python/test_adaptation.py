"""LoRA adaptation of a CT model to MR: what is trained, what is saved, and what loading refuses.

A tiny random CT model of the universal family (``conftest``) is adapted on three CHAOS T2 cases for a few
steps, so the weights named here are that family's (its adapter rules: LoRA in the U-Net, the image encoder
and normalisation layers retrained).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_config
from test_training import cache_dir, chaos_dataset, settings  # noqa: F401 (fixtures)
from TextDiffSegLib import cli
from TextDiffSegLib.adaptation import ADAPTER_WEIGHTS
from TextDiffSegLib.errors import DataError, ModelError
from TextDiffSegLib.families.universal import UniversalModel
from TextDiffSegLib.modelio import load_model, read_config, save_model
from TextDiffSegLib.training import train

pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def adapted(chaos_dataset, cache_dir, tiny_model_dir, tmp_path_factory):  # noqa: F811
    """(base folder, adapter folder): the tiny CT model, and a rank-4 adapter of it trained on MR."""
    base = tmp_path_factory.mktemp("base") / "tiny-ct"
    shutil.copytree(tiny_model_dir, base)
    output = tmp_path_factory.mktemp("adapt") / "tiny-mr"
    return base, train(settings(chaos_dataset, cache_dir, output, diffusion_steps=3, lr=1e-2, init_from=str(base),
                                lora_rank=4))


def test_the_adapter_folder_holds_only_what_was_trained(adapted):
    base, adapter = adapted
    config = read_config(adapter)
    assert config.modality == "MR" and read_config(base).modality == "CT"
    assert config.adapter["base"] == str(base.resolve()) and config.adapter["rank"] == 4
    assert not (adapter / "model.safetensors").exists()
    assert "LoRA adapter (rank 4)" in (adapter / "README.md").read_text()
    stored = load_file(str(adapter / ADAPTER_WEIGHTS))
    assert any(k.startswith("lora.") for k in stored)
    assert any(k.startswith("image_encoder.") for k in stored)
    assert not any(k.startswith(("mask_autoencoder.", "structure_embedding.")) for k in stored)


def test_loading_applies_the_adapter_to_the_unchanged_base(adapted):
    base_folder, adapter = adapted
    base, model = load_model(base_folder), load_model(adapter)
    assert model.config.modality == "MR" and model.config.name == "tiny-mr"
    tuned = dict(model.named_parameters())
    for name, value in base.named_parameters():
        if name.startswith(("mask_autoencoder.", "structure_embedding.")):
            assert torch.equal(tuned[name], value), name
    assert not torch.equal(tuned["image_encoder.layers.0.0.weight"], base.image_encoder.layers[0][0].weight)
    frozen = tuned["unet.conv_in.base_layer.weight"]
    assert torch.equal(frozen, base.unet.conv_in.weight)
    assert tuned["unet.conv_in.lora_B.default.weight"].abs().sum() > 0  # the low-rank update moved off zero
    latent, features = torch.randn(1, 4, 8, 8), torch.randn(1, 8, 8, 8)
    with torch.no_grad():
        embedding = base.embed_structure(torch.randn(1, 384))
        assert not torch.allclose(model.denoise(latent, torch.tensor(500), features, embedding),
                                  base.denoise(latent, torch.tensor(500), features, embedding))


def test_an_adapter_is_refused_on_other_base_weights_or_with_other_keys(adapted, tmp_path):
    base, adapter = adapted
    copy = tmp_path / "adapter"
    shutil.copytree(adapter, copy)
    stored = load_file(str(copy / ADAPTER_WEIGHTS))
    save_file({k: v for k, v in stored.items() if not k.startswith("image_encoder.")}, str(copy / ADAPTER_WEIGHTS))
    with pytest.raises(ModelError, match="does not fit"):
        load_model(copy)

    changed_base = tmp_path / "base"
    shutil.copytree(base, changed_base)
    weights = load_file(str(changed_base / "model.safetensors"))
    save_file({k: v + 1 for k, v in weights.items()}, str(changed_base / "model.safetensors"))
    config = json.loads((adapter / "config.json").read_text())
    config["adapter"]["base"] = str(changed_base)
    shutil.copytree(adapter, tmp_path / "moved", dirs_exist_ok=True)
    (tmp_path / "moved" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="other weights"):
        load_model(tmp_path / "moved")


def test_the_adapter_segments_what_its_data_labels(chaos_dataset, cache_dir, tmp_path):  # noqa: F811
    base = save_model(UniversalModel(tiny_config(structures=("liver", "spleen", "pancreas"))), tmp_path / "base")
    adapter = train(settings(chaos_dataset, cache_dir, tmp_path / "run", diffusion_steps=1, init_from=str(base),
                             lora_rank=2, structures=("liver", "spleen")))
    assert read_config(adapter).structures == ("liver", "spleen")
    assert load_model(adapter).config.structures == ("liver", "spleen")


def test_lora_needs_a_text_conditioned_base_that_knows_the_structures(adapted, chaos_dataset, cache_dir, tmp_path):  # noqa: F811
    def adapt(base, **options):
        return train(settings(chaos_dataset, cache_dir, tmp_path / "run", diffusion_steps=1, lora_rank=2,
                              init_from=str(base), **options))

    with pytest.raises(DataError, match="init_from"):
        train(settings(chaos_dataset, cache_dir, tmp_path / "a", lora_rank=4))
    with pytest.raises(DataError, match="adapt its base model"):
        adapt(adapted[1])
    with pytest.raises(DataError, match="learnt embedding"):
        adapt(save_model(UniversalModel(tiny_config(conditioning="learned")), tmp_path / "learned"))
    with pytest.raises(DataError, match="does not segment spleen"):
        adapt(save_model(UniversalModel(tiny_config(structures=("liver",))), tmp_path / "liver-only"),
              structures=("liver", "spleen"))


def test_train_command_adapts_with_lora(chaos_dataset, cache_dir, tiny_model_dir, tmp_path, capsys):  # noqa: F811
    code = cli.main(["train", "--data", str(chaos_dataset), "--output", str(tmp_path / "run"), "--steps", "1",
                     "--batch-size", "2", "--init-from", str(tiny_model_dir), "--lora-rank", "2",
                     "--cache-dir", str(cache_dir)])
    assert code == 0, capsys.readouterr().err
    assert read_config(tmp_path / "run" / "model").adapter["rank"] == 2
    assert np.isfinite([float(line.split(",")[2]) for line in (tmp_path / "run" / "loss_log.csv").read_text().splitlines()[1:]]).all()
