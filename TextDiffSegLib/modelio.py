"""Model folders: ``config.json`` + ``model.safetensors`` (+ ``README.md``, the model card).

Weights load from safetensors only; nothing is ever unpickled. A folder whose weights do not
match its config is refused with a message naming the difference.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .config import ModelConfig
from .errors import ModelError
from .families import FAMILIES
from .volume import write_atomically

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"


def read_config(directory: str | Path) -> ModelConfig:
    """The validated config of a model folder."""
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise ModelError(f"{directory} is not a TextDiffSeg model folder: it has no {CONFIG_NAME}")
    try:
        values = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ModelError(f"cannot read {path}: {error}; the model folder may be corrupt, download or copy it again") from None
    family = values.get("family") if isinstance(values, dict) else None
    if family not in FAMILIES:
        raise ModelError(f"{path}: unknown model family {family!r}; known families are {', '.join(FAMILIES)}")
    return FAMILIES[family].config.from_dict(values)


def save_model(model: torch.nn.Module, directory: str | Path, card: str | None = None, half: bool = True) -> Path:
    """Write a model folder (weights in fp16 unless ``half`` is false)."""
    return write_folder(directory, WEIGHTS_NAME, model.state_dict(), model.config, card, half)


def write_folder(directory: str | Path, weights_name: str, tensors: dict[str, torch.Tensor], config: ModelConfig,
                 card: str | None = None, half: bool = True) -> Path:
    """Write ``tensors`` as ``weights_name`` (fp16 unless ``half`` is false), ``config.json`` and the card."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if half else torch.float32
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous().cpu() for k, v in tensors.items()}
    # safetensors.save_file creates its file readable by the owner only (0600, whatever the umask); bytes
    # written by Python get the usual permissions, so a shared or packaged model folder stays readable.
    data = save(tensors, metadata={"format": "pt"})
    write_atomically(directory / weights_name, lambda p: p.write_bytes(data), overwrite=True)
    write_atomically(directory / CONFIG_NAME, config.save, overwrite=True)
    if card is not None:
        write_atomically(directory / CARD_NAME, lambda p: p.write_text(card), overwrite=True)
    return directory


def check_finite(weights: dict[str, torch.Tensor], path: Path) -> None:
    """Raise ``ModelError`` if a weights file holds values that are not numbers (bytes overwritten in a file of
    the right size read as NaN or infinity, and a model of such weights segments nothing)."""
    broken = [name for name, tensor in weights.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if broken:
        raise ModelError(f"{path} is corrupt: {len(broken)} of its tensors hold values that are not numbers "
                         f"(NaN or infinite), e.g. {broken[0]}; download or copy the model folder again")


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Build the model its config describes and load its weights, in fp32, in eval mode.

    An adapter folder (LoRA, see ``adaptation``) gives its base model with the adapter applied.
    """
    directory = Path(directory)
    config = read_config(directory)
    if config.adapter is not None:
        from .adaptation import load_adapted  # which loads its base model through this function

        return load_adapted(directory, config, device)
    weights_path = directory / WEIGHTS_NAME
    if not weights_path.is_file():
        raise ModelError(f"{directory} has no {WEIGHTS_NAME}; the model folder is incomplete, download or copy it again")
    try:
        weights = load_file(str(weights_path))
    except (SafetensorError, OSError) as error:
        raise ModelError(f"cannot read {weights_path}: {error}; the file is corrupt, download or copy it again") from None
    check_finite(weights, weights_path)
    model = FAMILIES[config.family].model(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(weights) if expected[k].shape != weights[k].shape)
    if missing or unexpected or wrong_shape:
        details = [f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                   for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)) if keys]
        raise ModelError(f"{weights_path} does not match {directory / CONFIG_NAME} ({'; '.join(details)}); "
                         "the config and weights come from different models")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in weights.items()})
    return model.to(device).eval()
