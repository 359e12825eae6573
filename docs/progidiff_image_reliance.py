"""Does a ProGiDiff model read the slice? The Dice of its clean-mask estimate with the slice, with a blank one,
and without the ControlNet, at a few noise levels.

On slices of the validation cases that contain each structure (random 128 x 128 crops on the model grid, seed 0,
no augmentation; with the neighbouring slices and the lateral position where the model reads them), each mask
latent is noised to timestep t and the denoiser's clean estimate decoded. At t = 999 the noisy latent holds
nothing of the mask: only the slice can say where it lies, so a model that reads the slice scores there and one
that does not scores near 0. Where "slice" and "blank slice" agree, the ControlNet adds nothing of the image.
Writes docs/progidiff-image-reliance.json and prints a table.

    python docs/progidiff_image_reliance.py --model RUN/model [--data ../shared/data/btcv/dataset.json]

About two minutes on one core of a 2-core CPU.
"""

import json
from pathlib import Path

import torch
from reliance import STRUCTURES, TIMESTEPS, dice, main, summarised

from TextDiffSegLib.datasets import prepare_case, read_dataset
from TextDiffSegLib.families.progidiff import LATENT_CLAMP, prompt_tokens
from TextDiffSegLib.families.universal_training import SliceSampler
from TextDiffSegLib.losses import clean_estimate
from TextDiffSegLib.modelio import load_model
from TextDiffSegLib.sampler import make_scheduler
from TextDiffSegLib.terminology import get_structure
from TextDiffSegLib.text_encoders import conditioning_text, load_text_encoder

CONDITIONS = ("slice", "blank slice", "no ControlNet")


@torch.no_grad()
def measure(model_folder: Path, data: str, cache: Path, batches: int) -> dict:
    model = load_model(model_folder).eval()
    config = model.config
    training = json.loads((model_folder / "training.json").read_text())
    dataset = read_dataset(data)
    cases = [prepare_case(case, dataset, config.spacing, cache) for case in dataset.select(training["split"]["validation"])]
    encoder = load_text_encoder(config.text_encoder)
    tokens = prompt_tokens(encoder.encode([conditioning_text(get_structure(s), config.modality) for s in STRUCTURES]))
    scheduler = make_scheduler("ddpm", config.num_train_timesteps, config.prediction_type)
    sampler = SliceSampler(cases, STRUCTURES, (128, 128), config.context_slices, present_fraction=1.0, seed=0,
                           position_spacing=config.position_spacing(config.spacing))
    generator = torch.Generator().manual_seed(0)
    scores = {s: {str(t): {c: [] for c in CONDITIONS} for t in TIMESTEPS} for s in STRUCTURES}
    for _ in range(batches):
        images, masks, labels = sampler.batch(24)
        clean = model.encode_mask(masks)
        features = {"slice": model.conditioning_encoder(images),
                    "blank slice": model.conditioning_encoder(torch.zeros_like(images)), "no ControlNet": None}
        for t in TIMESTEPS:
            timesteps = torch.full((len(labels),), t)
            noisy = scheduler.add_noise(clean, torch.randn(clean.shape, generator=generator), timesteps)
            for condition, image_features in features.items():
                prediction = model.denoise(noisy, timesteps, tokens[labels], image_features)
                estimate = clean_estimate(scheduler, config.prediction_type, noisy, prediction, timesteps)
                probabilities = torch.sigmoid(model.decode_mask(estimate.clamp(-LATENT_CLAMP, LATENT_CLAMP)))
                for structure, sample_dice in zip((STRUCTURES[i] for i in labels), dice(probabilities, masks)):
                    scores[structure][str(t)][condition].append(sample_dice)
    return {"cases": training["split"]["validation"], "slices": 24 * batches,
            **summarised(scores, CONDITIONS)}


if __name__ == "__main__":
    main(__doc__, measure, CONDITIONS, "progidiff-image-reliance.json", batches=4, unit="slices")
