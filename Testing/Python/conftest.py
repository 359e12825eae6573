"""Shared fixtures: the real data beside the repository, and small synthetic volumes."""

from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (BTCV, CHAOS T2, TotalSegmentator examples); CI always has it."""
    if not (SHARED_DATA / "btcv" / "dataset.json").is_file():
        pytest.fail(f"real data not found at {SHARED_DATA}: clone the repository beside shared/")
    return SHARED_DATA


def markdown_rows(text: str) -> dict[str, list[str]]:
    """The body rows of the Markdown tables in ``text`` (not their headers), by their first cell: the other cells, stripped."""
    lines = text.splitlines()
    body = [line for line, following in zip(lines, [*lines[1:], ""])
            if line.startswith("| ") and not following.startswith("|---")]
    table = [[cell.strip() for cell in line.split("|")[1:-1]] for line in body]
    return {cells[0]: cells[1:] for cells in table}


TINY_STRUCTURES = ("liver", "spleen", "kidney_left", "kidney_right")


def random_text(tokens: int = 3, dim: int = 384, seed: int = 1):
    """A prompt's embedding (tokens, their mask, pooled) drawn at random, the same for the same seed."""
    import torch

    from TextDiffSegLib.text_encoders import TextEmbedding

    generator = torch.Generator().manual_seed(seed)
    return TextEmbedding(torch.randn(1, tokens, dim, generator=generator), torch.ones(1, tokens),
                         torch.randn(1, dim, generator=generator))


def tiny_config(**overrides):
    """A universal-family config small enough to run in milliseconds on a CPU."""
    from TextDiffSegLib.families.universal import UniversalConfig

    values = dict(name="tiny", structures=TINY_STRUCTURES, spacing=(6.0, 6.0, 9.0), window=(32, 32),
                  mask_channels=(4, 8, 8), image_channels=(8, 8, 8), image_feature_channels=8,
                  unet_channels=(8, 16, 16), default_steps=2)
    values.update(overrides)
    return UniversalConfig(**values)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A model folder (config.json + model.safetensors) holding a tiny random universal model."""
    import torch

    from TextDiffSegLib.families.universal import UniversalModel
    from TextDiffSegLib.modelio import save_model

    torch.manual_seed(0)
    return save_model(UniversalModel(tiny_config()), tmp_path_factory.mktemp("models") / "tiny", card="# tiny\n")


def balanced_copy(model_dir: Path, volume, folder: Path) -> Path:
    """A copy of the tiny universal model with its mask decoder's last bias shifted so that its probabilities on
    ``volume`` straddle 0.5 (the random model's sit near 0.5155 everywhere, so its masks are full)."""
    import math

    import torch

    from TextDiffSegLib.modelio import load_model, save_model
    from TextDiffSegLib.segmenter import Segmenter

    probability = float(np.median(Segmenter.from_pretrained(model_dir).propose(volume, "liver", 1, 0, 2).mean_probability))
    model = load_model(model_dir)
    with torch.no_grad():
        model.mask_autoencoder.decoder[-1].bias -= math.log(probability / (1 - probability))
    return save_model(model, folder, card="# balanced\n", half=False)


@pytest.fixture(scope="session")
def size_checked_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with a training record saying its training livers measured 1-2 million ml: any liver it
    finds is far smaller, so it gets a size warning; the record has no range for the other structures."""
    import json
    import shutil

    from TextDiffSegLib.model_card import TRAINING_RECORD, VOLUME_RANGES

    folder = tmp_path_factory.mktemp("models") / "size-checked"
    shutil.copytree(tiny_model_dir, folder)
    (folder / TRAINING_RECORD).write_text(json.dumps({VOLUME_RANGES: {"liver": [1e6, 2e6]}}))
    return folder


def rotation(axis: str, degrees: float) -> np.ndarray:
    """The 3x3 rotation about x, y or z (for oblique image directions)."""
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    i, j = {"x": (1, 2), "y": (0, 2), "z": (0, 1)}[axis]
    matrix = np.eye(3)
    matrix[i, i], matrix[i, j], matrix[j, i], matrix[j, j] = c, -s, s, c
    return matrix
