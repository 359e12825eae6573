"""Benchmark: a TextDiffSeg-3D training step with the model's convolutions laid out contiguous and channels-last-3d.

    python benchmarks/textdiffseg3d_training_layout.py [--repeats 4] [--output benchmarks/results/textdiffseg3d_training_layout.json]

One step is the family recipe's loss and its backward pass on a batch of two 32 x 96 x 96 patches (the CPU runs'
patches; random scan and mask, the default model with the lateral position), as ``textdiffseg train`` runs it in
fp32; both layouts in one run, so that they are compared on the same load. The recipe lays the model out
channels-last-3d; the first row puts it back.
"""

import argparse
import contextlib
import json
import time
import types
from pathlib import Path

import torch

from TextDiffSegLib.families.textdiffseg3d import TextDiffSeg3DConfig, TextDiffSeg3DModel
from TextDiffSegLib.families.textdiffseg3d_training import TextDiffSeg3DRecipe
from TextDiffSegLib.machine import device_name
from TextDiffSegLib.text_encoders import TextEmbedding

PATCH = (32, 96, 96)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "textdiffseg3d_training_layout.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    config = TextDiffSeg3DConfig(name="layout", structures=("liver", "spleen"), lateral_position=True)
    settings = types.SimpleNamespace(crop=PATCH, decoded_mask_weight=1.0)
    trainer = types.SimpleNamespace(device=torch.device("cpu"), autocast=contextlib.nullcontext)
    batch = (torch.rand(2, 2, *PATCH), (torch.rand(2, 1, *PATCH) > 0.7).float(), torch.tensor([0, 1]))
    text = TextEmbedding(torch.randn(2, 11, config.text_embed_dim), torch.ones(2, 11),
                         torch.randn(2, config.text_embed_dim))
    rows = []
    for layout in (torch.contiguous_format, torch.channels_last_3d):
        recipe = TextDiffSeg3DRecipe(TextDiffSeg3DModel(config), settings, trainer)
        recipe.model.to(memory_format=layout)
        recipe.text = text
        recipe.loss(batch).backward()  # warm-up
        started = time.perf_counter()
        for _ in range(args.repeats):
            recipe.loss(batch).backward()
        rows.append({"layout": str(layout).removeprefix("torch."),
                     "training_step_seconds": round((time.perf_counter() - started) / args.repeats, 3)})
        print(json.dumps(rows[-1]), flush=True)
    figures = {"device": f"cpu ({device_name('cpu')})", "threads": torch.get_num_threads(), "patch": PATCH,
               "batch_size": 2, "rows": rows,
               "speed-up": round(rows[0]["training_step_seconds"] / rows[1]["training_step_seconds"], 2)}
    Path(args.output).write_text(json.dumps(figures, indent=2) + "\n")
    print(f"speed-up {figures['speed-up']}x; wrote {args.output}")


if __name__ == "__main__":
    main()
