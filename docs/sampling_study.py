"""Measure and draw how a model's validation Dice depends on its sampling: steps, and mask projection.

Mask projection (`project_to_masks` in a universal-family config) sends each clean-mask estimate
through the mask autoencoder between sampling steps. This script evaluates the model on the
validation cases of its own evaluation report (same structures, proposals and seed) with 1, 2 and 4
steps, each with and without projection (one step has nothing between steps to project), and
writes the figures to docs/sampling-study.json and the plot to docs/sampling-study.png.

    python docs/sampling_study.py [--model universal-btcv]

About 20 minutes on a 2-core CPU for universal-btcv.
"""

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from TextDiffSegLib import registry  # noqa: E402
from TextDiffSegLib.evaluation import evaluate  # noqa: E402
from TextDiffSegLib.segmenter import Segmenter  # noqa: E402

SETTINGS = [(1, False), (2, False), (4, False), (2, True), (4, True)]  # (steps, projection)


def measure(model: str) -> dict:
    folder = registry.resolve_model(model)
    report = json.loads((folder / "evaluation.json").read_text())
    segmenter = Segmenter.from_pretrained(folder)
    rows = []
    for steps, projection in SETTINGS:
        segmenter.config.project_to_masks = projection
        result = evaluate(segmenter, str(REPO / report["data"]), case_ids=report["cases"],
                          structures=list(report["structures"]), num_proposals=report["num_proposals"],
                          seed=report["seed"], steps=steps)
        rows.append({"steps": steps, "projection": projection, "mean_dice": result["mean_dice"],
                     "seconds_per_case": result["seconds_per_case"],
                     "dice": {name: scores["dice"] for name, scores in result["structures"].items()}})
        print(f"steps {steps}, projection {projection}: mean fused Dice {result['mean_dice']:.3f}, "
              f"{result['seconds_per_case']:.1f} s per case", flush=True)
    return {"model": model, "cases": report["cases"], "num_proposals": report["num_proposals"],
            "device": result["device"], "settings": rows}


def plot(study: dict, output: Path) -> None:
    figure, (dice_axis, time_axis) = plt.subplots(1, 2, figsize=(9, 3.6))
    for projection, style in ((False, "o--"), (True, "s-")):
        # One step projects nothing, so it starts both curves.
        rows = [r for r in study["settings"] if r["projection"] == projection or r["steps"] == 1]
        label = "with mask projection" if projection else "without"
        dice_axis.plot([r["steps"] for r in rows], [r["mean_dice"] for r in rows], style, label=label)
        time_axis.plot([r["steps"] for r in rows], [r["seconds_per_case"] for r in rows], style, label=label)
    structures = len(study["settings"][0]["dice"])
    dice_axis.set(xlabel="sampling steps", ylabel=f"mean fused Dice ({structures} structures)", xticks=[1, 2, 4])
    time_axis.set(xlabel="sampling steps", ylabel=f"seconds per case ({study['device']})", xticks=[1, 2, 4])
    dice_axis.legend()
    figure.suptitle(f"{study['model']} on {len(study['cases'])} validation cases, {study['num_proposals']} proposals")
    figure.tight_layout()
    figure.savefig(output, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="universal-btcv")
    args = parser.parse_args()
    study = measure(args.model)
    (REPO / "docs" / "sampling-study.json").write_text(json.dumps(study, indent=2) + "\n")
    plot(study, REPO / "docs" / "sampling-study.png")
    print("wrote docs/sampling-study.json and docs/sampling-study.png")


if __name__ == "__main__":
    main()
