"""Each case's volume and median intensity of labelled structures: how typical a case is.

    python scripts/structure_statistics.py DATASET.json spleen liver [--model universal-btcv]

A model trained on a few cases knows the organs' sizes and brightness only as those cases show them;
a validation case far outside that range (an enlarged spleen, a spleen darker than the liver) is one
whose like the model has never seen. With ``--model``, each case is marked as the model's training or
validation case (from its ``training.json``), and the training cases' range is printed.
"""

import argparse
import json
import sys

import numpy as np

from TextDiffSegLib.datasets import read_dataset
from TextDiffSegLib.errors import TextDiffSegError
from TextDiffSegLib.model_card import TRAINING_RECORD
from TextDiffSegLib.registry import resolve_model
from TextDiffSegLib.terminology import resolve_prompt
from TextDiffSegLib.volume import read_volume


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="dataset.json")
    parser.add_argument("structures", nargs="+")
    parser.add_argument("--model", help="a model (name or folder) whose training and validation cases to mark")
    args = parser.parse_args()

    dataset = read_dataset(args.data)
    values = dataset.label_values()
    structures = [resolve_prompt(s).name for s in args.structures]
    dataset.require_labels(structures)
    split = {}
    if args.model:
        record = json.loads((resolve_model(args.model) / TRAINING_RECORD).read_text())["split"]
        split = {case: part for part in ("training", "validation") for case in record[part]}

    print("| case | split | " + " | ".join(f"{s} (ml) | {s} median intensity" for s in structures) + " |")
    print("|---|---|" + "---|---|" * len(structures))
    training_rows = []
    for case in dataset.cases:
        image, label = read_volume(case.image), read_volume(case.label)
        voxel_ml = float(np.prod(label.spacing)) / 1000
        row = []
        for s in structures:
            inside = label.array == values[s]
            row += [inside.sum() * voxel_ml, float(np.median(image.array[inside])) if inside.any() else float("nan")]
        if split.get(case.id) == "training":
            training_rows.append(row)
        print(f"| {case.id} | {split.get(case.id, '')} | " + " | ".join(f"{v:.0f}" for v in row) + " |")
    if training_rows:
        low, high = np.nanmin(training_rows, axis=0), np.nanmax(training_rows, axis=0)
        print("| training range | | " + " | ".join(f"{a:.0f} to {b:.0f}" for a, b in zip(low, high)) + " |")


if __name__ == "__main__":
    try:
        main()
    except TextDiffSegError as error:  # an unreadable dataset, an unknown structure or model
        sys.exit(str(error))
