"""Benchmark: what the TextDiffSeg 3D family's sizes cost on this machine, to choose its window and widths.

    python benchmarks/textdiffseg3d_sizes.py [--device cpu] [--output benchmarks/results/textdiffseg3d_sizes.json]

For each candidate (denoiser widths, attention levels, window) it times one DDIM step of sampling over the
latent of a BTCV-sized scan (80 x 176 x 176 voxels of the 2.5 x 2.5 x 5 mm grid, the largest in-plane size
of the data) in 3D sliding windows, as the predictor runs it, and one training step (batch 2) on patches of
the window's size; all in one run, so that the candidates are compared on the same load. Segmenting one
organ with 5 proposals costs about 50 sampling steps plus the image encoder once.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from TextDiffSegLib.families.textdiffseg3d import DOWNSAMPLING, TextDiffSeg3DConfig, TextDiffSeg3DModel
from TextDiffSegLib.machine import device_name
from TextDiffSegLib.sampler import windowed

SCAN = (80, 176, 176)
CANDIDATES = [  # (unet_channels, unet_attention, window)
    ((32, 64, 64), (False, True, True), (32, 96, 96)),
    ((32, 64, 64), (False, False, True), (32, 96, 96)),
    ((32, 64, 64), (False, True, True), (48, 128, 128)),
    ((32, 64, 64), (False, False, True), (48, 128, 128)),
    ((16, 32, 64), (False, False, True), (48, 128, 128)),
]


def seconds(function, repeats: int = 2) -> float:
    function()  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - started) / repeats


def measure(channels, attention, window, device) -> dict:
    config = TextDiffSeg3DConfig(name="size", structures=("liver",), unet_channels=channels, unet_attention=attention,
                                 window=window)
    model = TextDiffSeg3DModel(config).to(device)
    features = config.image_feature_channels
    latent = torch.randn(1, config.latent_channels + features, *(s // DOWNSAMPLING for s in SCAN), device=device)
    latent_window = tuple(w // DOWNSAMPLING for w in window)
    timestep = torch.tensor(500, device=device)
    model.eval()
    with torch.no_grad():
        step = seconds(lambda: windowed(lambda x: model.denoise(x[:, :config.latent_channels], timestep,
                                                                 x[:, config.latent_channels:]),
                                        latent, latent_window, batch_size=2))
        encoder = seconds(lambda: windowed(model.image_encoder, torch.rand(1, 1, *SCAN, device=device), window,
                                           batch_size=2), repeats=1)
    model.train()
    images, masks = torch.rand(2, 1, *window, device=device), (torch.rand(2, 1, *window, device=device) > 0.5).float()
    tokens, mask = torch.randn(2, 8, config.text_embed_dim, device=device), torch.ones(2, 8, device=device)
    optimizer = torch.optim.AdamW(model.parameters())

    def train_step():
        latent_masks = model.label_autoencoder.encode(masks)
        embedding = model.cross_modal(model.image_encoder(images), tokens, mask)
        loss = model.denoise(latent_masks, torch.tensor([10, 500], device=device), embedding).square().mean()
        loss = loss + model.label_autoencoder.decode(latent_masks).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return {"unet_channels": channels, "unet_attention": attention, "window": window,
            "parameters": sum(p.numel() for p in model.parameters()), "sampling_step_seconds": round(step, 3),
            "image_encoder_seconds": round(encoder, 3), "one_organ_5_proposals_10_steps_seconds": round(encoder + 50 * step, 1),
            "training_step_seconds_batch_2": round(seconds(train_step), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "textdiffseg3d_sizes.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for candidate in CANDIDATES:
        rows.append(measure(*candidate, torch.device(args.device)))
        print(json.dumps(rows[-1]), flush=True)
    Path(args.output).write_text(json.dumps({"device": f"{args.device} ({device_name(args.device)})", "scan": SCAN,
                                             "candidates": rows}, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
