"""Low-rank adaptation (LoRA) of a trained model to a new modality, from a few labelled cases.

As ProGiDiff adapts its ControlNet from CT to MR (papers/000, section 3.3): low-rank adapters go
into the layers the family's ``lora_targets`` name (for the universal family, the denoiser's
linear and convolution layers), the parameters its ``retrained`` names (the image encoder and
every normalisation layer) are retrained in full, and the rest stays as the base model has it.
Adapters are injected with peft's public functions on the plain model.

An adapter folder holds ``config.json`` (the adapted model's config, whose ``adapter`` field names
the base model, the sha256 of its weights and the LoRA settings) and ``adapter.safetensors`` (the
low-rank weights and the retrained parameters only). Loading it loads the base model, checks that
it is the very one the adapter was trained on, and applies the adapter.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .config import ModelConfig
from .errors import ModelError
from .families import FAMILIES
from .modelio import CONFIG_NAME, WEIGHTS_NAME, check_finite, load_model, write_folder
from .registry import resolve_model

ADAPTER_WEIGHTS = "adapter.safetensors"
LORA_PREFIX = "lora."  # low-rank weights in adapter.safetensors; retrained parameters keep their own names


def weights_sha256(directory: str | Path) -> str:
    """The sha256 of a model folder's weights: the identity an adapter records of its base."""
    digest = hashlib.sha256()
    with open(Path(directory) / WEIGHTS_NAME, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def add_adapter(model: nn.Module, base: str, base_sha256: str, rank: int, alpha: float) -> nn.Module:
    """Inject LoRA into ``model`` (in place) and leave trainable only what adaptation trains.

    ``model.config.adapter`` records ``base`` (a registry name or folder) and its weights' sha256.
    """
    if rank < 1:
        raise ValueError(f"the LoRA rank must be at least 1, not {rank}")
    family = FAMILIES[model.config.family]
    targets = family.lora_targets(model)
    retrained = family.retrained(model)  # named before injection renames the targets' weights
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets), model)
    model.requires_grad_(False)
    parameters = dict(model.named_parameters())
    for name in retrained:
        parameters[name].requires_grad_(True)
    for name, parameter in parameters.items():
        if ".lora_" in name:
            parameter.requires_grad_(True)
    model.config.adapter = {"base": base, "base_sha256": base_sha256, "rank": rank, "alpha": alpha}
    return model


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What an adapter folder stores: the low-rank weights and the retrained parameters."""
    tensors = {LORA_PREFIX + k: v for k, v in get_peft_model_state_dict(model).items()}
    parameters = dict(model.named_parameters())
    tensors.update({name: parameters[name].detach() for name in FAMILIES[model.config.family].retrained(model)})
    return tensors


def save_adapter(model: nn.Module, directory: str | Path, card: str | None = None) -> Path:
    """Write an adapter folder (fp16 weights) for a model prepared by ``add_adapter`` and trained."""
    return write_folder(directory, ADAPTER_WEIGHTS, adapter_tensors(model), model.config, card)


def load_adapted(directory: Path, config: ModelConfig, device: str | torch.device) -> nn.Module:
    """The base model an adapter folder names, with the adapter applied; its config is ``config``.

    The adapter may segment fewer structures than its base: those its training data labelled.
    """
    spec = config.adapter
    base_directory = resolve_model(spec["base"])
    if weights_sha256(base_directory) != spec["base_sha256"]:
        raise ModelError(f"{directory} adapts '{spec['base']}', but {base_directory} holds other weights than the "
                         "ones it was trained on; install that version of the base model, or adapt this one anew")
    model = load_model(base_directory, device="cpu")
    base_config = model.config
    architecture = {k: v for k, v in base_config.to_dict().items() if k not in ("name", "modality", "structures", "adapter")}
    if any(config.to_dict()[k] != v for k, v in architecture.items()) or not set(config.structures) <= set(base_config.structures):
        raise ModelError(f"{directory / CONFIG_NAME} describes another architecture than its base model "
                         f"{base_directory}; the adapter folder is corrupt, copy it again")
    add_adapter(model, spec["base"], spec["base_sha256"], spec["rank"], spec["alpha"])
    try:
        weights = load_file(str(directory / ADAPTER_WEIGHTS))
    except (SafetensorError, OSError) as error:
        raise ModelError(f"cannot read {directory / ADAPTER_WEIGHTS}: {error}; copy the adapter folder again") from None
    check_finite(weights, directory / ADAPTER_WEIGHTS)
    expected = adapter_tensors(model)
    if set(weights) != set(expected) or any(weights[k].shape != expected[k].shape for k in expected):
        raise ModelError(f"{directory / ADAPTER_WEIGHTS} does not fit {base_directory} with rank {spec['rank']}; "
                         "the adapter was made for another model")
    set_peft_model_state_dict(model, {k[len(LORA_PREFIX):]: v.float() for k, v in weights.items() if k.startswith(LORA_PREFIX)})
    model.load_state_dict({k: v.float() for k, v in weights.items() if not k.startswith(LORA_PREFIX)}, strict=False)
    model.config = config
    return model.to(device).eval()
