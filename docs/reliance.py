"""What the image-reliance measures share (docs/progidiff_image_reliance.py, docs/textdiffseg3d_scan_reliance.py):
the Dice of clean-mask estimates, summarised per structure and timestep, printed and written as JSON."""

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the scripts that import this then import TextDiffSegLib

from TextDiffSegLib.registry import resolve_model  # noqa: E402
STRUCTURES = ("liver", "spleen", "kidney_left", "kidney_right", "stomach", "pancreas")
TIMESTEPS = (999, 900, 700, 400)


def dice(probabilities: torch.Tensor, masks: torch.Tensor) -> list[float]:
    """The Dice of each sample's mask thresholded at one half."""
    found = probabilities > 0.5
    overlap = (found & (masks > 0)).flatten(1).sum(1)
    return (2 * overlap / (found.flatten(1).sum(1) + masks.flatten(1).sum(1)).clamp(min=1)).tolist()


def summarised(scores: dict, conditions: tuple[str, ...]) -> dict:
    """Per structure, timestep and condition, the mean of the samples' Dice; and the mean of the structures'."""
    table = {s: {t: {c: float(np.mean(v)) for c, v in by_condition.items()} for t, by_condition in by_t.items()}
             for s, by_t in scores.items()}
    mean = {str(t): {c: float(np.mean([table[s][str(t)][c] for s in STRUCTURES])) for c in conditions}
            for t in TIMESTEPS}
    return {"structures": table, "mean": mean}


def main(doc: str, measure: Callable[[Path, str, Path, int], dict], conditions: tuple[str, ...], output: str,
         batches: int, unit: str) -> None:
    """The command line of a measure(model folder, dataset, cache, batches) giving ``unit`` and ``summarised``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a model folder or name")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "btcv" / "dataset.json"))
    parser.add_argument("--cache-dir", default=str(REPO / "runs" / "cache"))
    parser.add_argument("--batches", type=int, default=batches)
    parser.add_argument("--output", default=str(REPO / "docs" / output))
    args = parser.parse_args()
    result = {"model": args.model, **measure(resolve_model(args.model), args.data, Path(args.cache_dir), args.batches)}
    print(f"mean Dice of the six organs' clean-mask estimates ({result[unit]} validation {unit})")
    print(f"{'t':>5} " + " ".join(f"{c:>14}" for c in conditions))
    for t, by_condition in result["mean"].items():
        print(f"{t:>5} " + " ".join(f"{by_condition[c]:14.3f}" for c in conditions))
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
