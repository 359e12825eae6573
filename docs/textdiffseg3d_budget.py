"""Is it the diffusion or the budget? A plain 3D U-Net segmenter trained on the 3D family's CPU budget.

MONAI's ``UNet`` (no diffusion, no latent, no text: the prompted structure as one-hot input channels beside the
scan and its lateral position) trained on what a CPU run of ``textdiffseg3d`` sees: 32 x 96 x 96 patches of the 14
BTCV training cases (the bundled models' split), two a step, three quarters near the structure, with the 3D
family's loss of a decoded mask (``prompted_mask_loss``) and learning rate (held constant). Every ``--every`` steps it answers the
same 48 validation patches as ``docs/textdiffseg3d_scan_reliance.py`` (seed 0, each containing its structure), so
its Dice stands beside a diffusion model's clean estimate from pure noise (t = 999), where sampling starts.
Writes docs/textdiffseg3d-budget.json and prints the curve.

    python docs/textdiffseg3d_budget.py [--steps 3000] [--every 600]
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import UNet
from reliance import REPO, STRUCTURES, dice

from TextDiffSegLib.datasets import prepare_case, read_dataset
from TextDiffSegLib.families.textdiffseg3d_training import PatchSampler
from TextDiffSegLib.losses import prompted_mask_loss
from TextDiffSegLib.modelio import read_config
from TextDiffSegLib.registry import resolve_model

PATCH = (32, 96, 96)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--every", type=int, default=600, help="steps between answers to the validation patches")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "btcv" / "dataset.json"))
    parser.add_argument("--cache-dir", default=str(REPO / "runs" / "cache"))
    parser.add_argument("--output", default=str(REPO / "docs" / "textdiffseg3d-budget.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    bundled = resolve_model("textdiffseg3d-btcv")
    split = json.loads((bundled / "training.json").read_text())["split"]
    config = read_config(bundled)  # its structures and model grid
    structures = tuple(config.structures)
    dataset = read_dataset(args.data)

    def cases(ids):
        return [prepare_case(case, dataset, config.spacing, Path(args.cache_dir)) for case in dataset.select(ids)]

    training = cases(split["training"])
    patches = PatchSampler(training, structures, PATCH, present_fraction=0.75, seed=0, position_spacing=config.spacing[0])
    validation = PatchSampler(cases(split["validation"]), STRUCTURES, PATCH, present_fraction=1.0, seed=0,
                              position_spacing=config.spacing[0])
    validation_batches = [validation.batch(6) for _ in range(8)]
    network = UNet(3, 2 + len(structures), 1, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=1)
    optimiser = torch.optim.AdamW(network.parameters(), lr=3e-4, weight_decay=1e-5)

    def inputs(images, labels):
        prompted = F.one_hot(labels, len(structures)).float()[:, :, None, None, None]
        return torch.cat([images, prompted.expand(-1, -1, *images.shape[2:])], dim=1)

    @torch.no_grad()
    def answers() -> dict:
        network.eval()
        scores = {s: [] for s in STRUCTURES}
        for images, masks, labels in validation_batches:
            prompted = torch.tensor([structures.index(STRUCTURES[i]) for i in labels])
            for i, patch_dice in zip(labels.tolist(), dice(torch.sigmoid(network(inputs(images, prompted))), masks)):
                scores[STRUCTURES[i]].append(patch_dice)
        network.train()
        table = {s: float(np.mean(v)) for s, v in scores.items()}
        return {"mean": float(np.mean(list(table.values()))), "structures": table}

    curve, losses, training_seconds = [], [], 0.0
    for step in range(1, args.steps + 1):
        started = time.perf_counter()
        images, masks, labels = patches.batch(2)
        loss = prompted_mask_loss(network(inputs(images, labels)), masks, labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
        training_seconds += time.perf_counter() - started
        if step % args.every == 0 or step == args.steps:
            seconds = training_seconds / step
            curve.append({"step": step, "loss": float(np.mean(losses[-args.every:])), **answers()})
            print(f"step {step}: loss {curve[-1]['loss']:.3f}, validation patches' mean Dice {curve[-1]['mean']:.3f} "
                  + " ".join(f"{s} {d:.3f}" for s, d in curve[-1]["structures"].items()) + f" ({seconds:.2f} s a step)",
                  flush=True)
    result = {"network": "monai.networks.nets.UNet(channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=1)",
              "parameters": sum(p.numel() for p in network.parameters()), "patch": PATCH, "batch_size": 2,
              "validation_cases": split["validation"], "validation_patches": 48,
              "seconds_per_step": training_seconds / args.steps, "curve": curve}
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
