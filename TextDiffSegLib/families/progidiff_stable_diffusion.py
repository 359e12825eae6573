"""A ProGiDiff model started from Stable Diffusion 1.x weights, for users who have them in a local folder.

The folder is a diffusers pipeline's (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, weights as
safetensors: nothing is unpickled, nothing downloaded). ``textdiffseg train --family progidiff
--model-option stable_diffusion=FOLDER`` gives the new model the folder's backbone, autoencoder and text
encoder (``stable_diffusion_options``, through ``ProGiDiffConfig.from_options``), and its recipe loads their
weights (``load_stable_diffusion``); the ControlNet starts as a copy of the backbone's encoder, the
conditioning-image encoder anew. The saved model holds every weight: the folder is not needed to use it.
"""

from __future__ import annotations

from pathlib import Path

from diffusers import AutoencoderKL, UNet2DConditionModel

from ..errors import ModelError

PARTS = {"unet": UNet2DConditionModel, "vae": AutoencoderKL}


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def stable_diffusion_options(folder: str | Path, given: dict | None = None) -> dict:
    """The config fields of a ProGiDiff model whose backbone, autoencoder and text encoder are ``folder``'s; raises
    ``ValueError`` where the folder is not a Stable Diffusion 1.x folder, or where ``given`` options differ."""
    folder = Path(folder).expanduser().resolve()
    try:
        unet, vae = (PARTS[part].load_config(folder / part) for part in ("unet", "vae"))
    except OSError as error:
        raise ValueError(f"{folder} is not a Stable Diffusion folder (unet/, vae/, text_encoder/, tokenizer/): "
                         f"{error}") from None
    if not isinstance(unet["attention_head_dim"], int) or unet["norm_num_groups"] != vae["norm_num_groups"]:
        raise ValueError(f"{folder} is not a Stable Diffusion 1.x folder (one number of attention heads, the same "
                         "group norms in unet/ and vae/)")
    options = dict(
        stable_diffusion=str(folder), text_encoder=str(folder), text_embed_dim=unet["cross_attention_dim"],
        unet_channels=tuple(unet["block_out_channels"]), unet_layers=unet["layers_per_block"],
        cross_attention=tuple(kind.startswith("CrossAttn") for kind in unet["down_block_types"]),
        attention_heads=unet["attention_head_dim"], norm_groups=unet["norm_num_groups"],
        latent_channels=vae["latent_channels"], autoencoder_channels=tuple(vae["block_out_channels"]),
        autoencoder_layers=vae["layers_per_block"],
    )
    differing = sorted(key for key, value in (given or {}).items()
                       if key in options and key != "stable_diffusion" and _plain(value) != _plain(options[key]))
    if differing:
        raise ValueError(f"{', '.join(differing)} must be those of the Stable Diffusion folder {folder}; leave them out")
    return options


def load_stable_diffusion(model, folder: str | Path) -> None:
    """Load the folder's backbone and autoencoder weights into ``model`` (a ``ProGiDiffModel`` whose config has
    ``stable_diffusion_options(folder)``) and start its ControlNet as a copy of the backbone's encoder."""
    folder = Path(folder)
    for part, module in (("unet", model.unet), ("vae", model.mask_autoencoder)):
        try:
            weights = PARTS[part].from_pretrained(folder / part, local_files_only=True, use_safetensors=True).state_dict()
            module.load_state_dict(weights)
        except (OSError, RuntimeError, ValueError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ModelError(f"cannot load the Stable Diffusion weights of {folder / part} ({first_line[:300]}); it "
                             "must hold a Stable Diffusion 1.x model saved as safetensors") from None
    model.start_controlnet_from_backbone()
