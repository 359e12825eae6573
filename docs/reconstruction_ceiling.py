"""How well a model could segment if its denoiser were perfect: the Dice its grid and mask autoencoder allow.

For each validation case and structure of the model's evaluation report, the manual label goes
  - to the model grid and back (linear resampling, threshold 0.5, as segmenting does): "grid";
  - to the model grid, through the mask autoencoder (encode, decode), and back: "autoencoder".
Their Dice against the label bounds what the sampled masks can reach; the gap between the bound and
the model's fused Dice is what the image encoder and denoiser miss. Writes
docs/reconstruction-ceiling.json and prints a table.

    python docs/reconstruction_ceiling.py [--model universal-btcv]

About a minute on a 2-core CPU for universal-btcv.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from TextDiffSegLib import registry  # noqa: E402
from TextDiffSegLib.datasets import read_dataset  # noqa: E402
from TextDiffSegLib.metrics import dice  # noqa: E402
from TextDiffSegLib.modelio import load_model  # noqa: E402
from TextDiffSegLib.preprocessing import from_model_grid, model_grid, to_model_grid  # noqa: E402
from TextDiffSegLib.volume import read_volume  # noqa: E402


@torch.no_grad()
def autoencoder_round_trip(model, masks: np.ndarray) -> np.ndarray:
    """Binary masks [z, y, x] on the model grid, encoded and decoded: probabilities of the same shape."""
    height, width = masks.shape[1:]
    multiple = model.config.downsampling
    batch = torch.from_numpy(masks.astype(np.float32))[:, None]
    batch = torch.nn.functional.pad(batch, (0, (-width) % multiple, 0, (-height) % multiple))
    return torch.sigmoid(model.decode_mask(model.encode_mask(batch)))[:, 0, :height, :width].numpy()


def measure(model_name: str) -> dict:
    folder = registry.resolve_model(model_name)
    report = json.loads((folder / "evaluation.json").read_text())
    model = load_model(folder).eval()
    dataset = read_dataset(REPO / report["data"], report["split"])
    values = {name: value for value, name in dataset.labels.items()}
    rows = []
    for case in dataset.select(report["cases"]):
        label = read_volume(case.label)
        grid = model_grid(label, model.config.spacing)
        for structure in report["structures"]:
            truth = label.array == values[structure]
            on_grid = to_model_grid(label.with_array(truth.astype(np.float32)), grid) >= 0.5
            back = from_model_grid(on_grid.astype(np.float32), grid, label) >= 0.5
            through = from_model_grid(autoencoder_round_trip(model, on_grid), grid, label) >= 0.5
            rows.append({"case": case.id, "structure": structure, "grid": dice(back, truth),
                         "autoencoder": dice(through, truth)})
    structures = {}
    for structure, scores in report["structures"].items():
        mine = [r for r in rows if r["structure"] == structure]
        structures[structure] = {"grid": float(np.mean([r["grid"] for r in mine])),
                                 "autoencoder": float(np.mean([r["autoencoder"] for r in mine])),
                                 "model_fused": scores["dice"]}
    return {"model": model_name, "cases": report["cases"], "structures": structures, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="universal-btcv")
    args = parser.parse_args()
    result = measure(args.model)
    print(f"{'structure':<16} {'grid':>6} {'autoencoder':>12} {'model (fused)':>14}")
    for name, scores in result["structures"].items():
        print(f"{name:<16} {scores['grid']:6.3f} {scores['autoencoder']:12.3f} {scores['model_fused']:14.3f}")
    output = REPO / "docs" / "reconstruction-ceiling.json"
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
