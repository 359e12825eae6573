"""Does a TextDiffSeg-3D model read the scan? The Dice of its clean-mask estimate with the scan and with a blank
one, at a few noise levels.

On patches of the validation cases that contain each structure (32 x 96 x 96 voxels of the model grid, seed 0,
with the lateral position where the model reads it), each label latent is noised to timestep t and the
denoiser's clean estimate decoded. At t = 999 the noisy latent holds nothing of the mask: only the scan can say
where it lies, and that is where sampling starts. Writes docs/textdiffseg3d-scan-reliance.json and prints a table.

    python docs/textdiffseg3d_scan_reliance.py --model RUN/model [--data ../shared/data/btcv/dataset.json]
"""

import json
from pathlib import Path

import torch
from reliance import STRUCTURES, TIMESTEPS, dice, main, summarised

from TextDiffSegLib.datasets import prepare_case, read_dataset
from TextDiffSegLib.families.textdiffseg3d import LATENT_CLAMP
from TextDiffSegLib.families.textdiffseg3d_training import PatchSampler
from TextDiffSegLib.losses import clean_estimate
from TextDiffSegLib.modelio import load_model
from TextDiffSegLib.sampler import make_scheduler
from TextDiffSegLib.terminology import get_structure
from TextDiffSegLib.text_encoders import conditioning_text, load_text_encoder

CONDITIONS = ("scan", "blank scan")


@torch.no_grad()
def measure(model_folder: Path, data: str, cache: Path, batches: int) -> dict:
    model = load_model(model_folder).float().eval()
    config = model.config
    training = json.loads((model_folder / "training.json").read_text())
    dataset = read_dataset(data)
    cases = [prepare_case(case, dataset, config.spacing, cache) for case in dataset.select(training["split"]["validation"])]
    # The prompts' embeddings, or for a model with learnt ones (--conditioning learned) each structure's index in it
    text = (load_text_encoder(config.text_encoder).encode([conditioning_text(get_structure(s), config.modality)
                                                           for s in STRUCTURES]) if config.conditioning == "text" else None)
    learnt = torch.tensor([list(config.structures).index(s) for s in STRUCTURES]) if text is None else None
    scheduler = make_scheduler("ddpm", config.num_train_timesteps, config.prediction_type)
    sampler = PatchSampler(cases, STRUCTURES, (32, 96, 96), present_fraction=1.0, seed=0,
                           position_spacing=config.spacing[0] if config.lateral_position else 0.0)
    generator = torch.Generator().manual_seed(0)
    scores = {s: {str(t): {c: [] for c in CONDITIONS} for t in TIMESTEPS} for s in STRUCTURES}
    for _ in range(batches):
        images, masks, labels = sampler.batch(6)
        prompt = model.text_of(text, labels if text is not None else learnt[labels])
        clean = model.label_autoencoder.encode(masks)
        blank = images.clone()
        blank[:, 0] = 0
        embeddings = {c: model.cross_modal(model.image_encoder(x), prompt.tokens, prompt.mask)
                      for c, x in zip(CONDITIONS, (images, blank))}
        for t in TIMESTEPS:
            timesteps = torch.full((len(labels),), t)
            noisy = scheduler.add_noise(clean, torch.randn(clean.shape, generator=generator), timesteps)
            for condition, embedding in embeddings.items():
                prediction = model.denoise(noisy, timesteps, embedding, prompt.pooled)
                estimate = clean_estimate(scheduler, config.prediction_type, noisy, prediction, timesteps)
                probabilities = torch.sigmoid(model.label_autoencoder.decode(estimate.clamp(-LATENT_CLAMP, LATENT_CLAMP)))
                for structure, patch_dice in zip((STRUCTURES[i] for i in labels), dice(probabilities, masks)):
                    scores[structure][str(t)][condition].append(patch_dice)
    return {"cases": training["split"]["validation"], "patches": 6 * batches,
            **summarised(scores, CONDITIONS)}


if __name__ == "__main__":
    main(__doc__, measure, CONDITIONS, "textdiffseg3d-scan-reliance.json", batches=8, unit="patches")
