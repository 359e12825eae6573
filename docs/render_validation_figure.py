"""Render docs/<model>-validation.png: how a bundled model does on its validation cases.

Left, the measured scores from the model's own evaluation report (Resources/Models/<model>/
evaluation.json): fused, single-proposal and Oracle@k Dice per structure, with the project's
targets for CT (dashed). Right, for each validation case, a coronal slice: the manual labels beside
the fused output of the model, sampled here and now (same proposals, seed and steps as the report).

    python docs/render_validation_figure.py [--model universal-btcv] [--output docs/...png]
    python docs/render_validation_figure.py --model universal-chaos-t2-lora
"""

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from TextDiffSegLib import registry  # noqa: E402
from TextDiffSegLib.datasets import read_dataset  # noqa: E402
from TextDiffSegLib.preprocessing import model_grid, to_model_grid  # noqa: E402
from TextDiffSegLib.segmenter import Segmenter  # noqa: E402
from TextDiffSegLib.terminology import get_structure  # noqa: E402
from TextDiffSegLib.volume import read_volume  # noqa: E402

TARGETS = {"liver": 0.90, "spleen": 0.85, "kidney_left": 0.85, "kidney_right": 0.85}  # for CT
VIEW_SPACING = (1.5, 1.5, 1.5)  # mm; coronal views are drawn on an LPS grid with square pixels
CT_DISPLAY = (-160.0, 240.0)  # HU shown from black to white
MR_DISPLAY_PERCENTILES = (1.0, 99.5)  # MR intensities have no fixed scale: the scan's own percentiles


def plot_scores(axis, report: dict, targets: dict[str, float]) -> None:
    names = list(report["structures"])
    rows = report["structures"]
    x = np.arange(len(names))
    k = report["num_proposals"]
    for offset, (key, label) in zip((-0.27, 0, 0.27), (("dice", "fused"), ("single_dice", "single proposal"),
                                                         ("oracle_dice", f"Oracle@{k}"))):
        values = [rows[n][key] if rows[n][key] is not None else 0.0 for n in names]
        axis.bar(x + offset, values, width=0.27, label=label)
    for index, name in enumerate(names):
        if name in targets:
            axis.hlines(targets[name], index - 0.45, index + 0.45, colors="black", linestyles="dashed")
    axis.set_xticks(x, [get_structure(n).display_name for n in names], rotation=45, ha="right")
    axis.set_ylim(0, 1)
    axis.set_ylabel("Dice")
    axis.set_title(f"{report['model']}: {report['num_cases']} validation cases, {k} proposals, "
                   f"mean fused Dice {report['mean_dice']:.3f}" + ("\n(dashed: the project's targets)" if targets else ""),
                   fontsize=9)
    axis.legend(fontsize=8, loc="upper right")


def label_image(masks: dict[str, np.ndarray], shape) -> np.ndarray:
    """RGBA overlay: each structure in its terminology colour."""
    overlay = np.zeros((*shape, 4))
    for name, mask in masks.items():
        overlay[mask] = (*np.array(get_structure(name).color) / 255, 0.55)
    return overlay


def coronal(array: np.ndarray, row: int) -> np.ndarray:
    """A coronal slice of an LPS [z, y, x] array, superior up and the patient's right on the left."""
    return array[::-1, row, :]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="registry name or folder (default: the bundled default)")
    parser.add_argument("--output", help="default: docs/<model>-validation.png")
    args = parser.parse_args()
    folder = registry.resolve_model(args.model)
    output = args.output or str(REPO / "docs" / f"{folder.name}-validation.png")
    report = json.loads((folder / "evaluation.json").read_text())
    dataset = read_dataset(REPO / report["data"] if not Path(report["data"]).is_absolute() else report["data"])
    value_of = {name: value for value, name in dataset.labels.items()}
    cases = [case for case in dataset.cases if case.id in report["cases"]]
    structures = list(report["structures"])
    segmenter = Segmenter.from_pretrained(str(folder))

    figure = plt.figure(figsize=(4 + 2.6 * len(cases), 6.5), layout="constrained")
    grid = figure.add_gridspec(2, 1 + len(cases), width_ratios=[1.8] + [1] * len(cases))
    is_ct = segmenter.config.modality == "CT"
    plot_scores(figure.add_subplot(grid[:, 0]), report, TARGETS if is_ct else {})
    for column, case in enumerate(cases, start=1):
        image, labels = read_volume(case.image), read_volume(case.label)
        results = segmenter.propose_many(image, structures, num_proposals=report["num_proposals"],
                                         seed=report["seed"], steps=report["steps"], fusion=report["fusion"],
                                         largest_component=report["largest_component"], separate=report["separate"],
                                         second_look=report["second_look"])
        view = model_grid(image, VIEW_SPACING)
        scan = to_model_grid(image, view)
        display = CT_DISPLAY if is_ct else np.percentile(scan, MR_DISPLAY_PERCENTILES)
        truth = to_model_grid(labels, view, is_label=True)
        fused = {r.structure.name: to_model_grid(labels.with_array(r.fused), view, is_label=True) > 0 for r in results}
        row = int(np.argwhere(np.isin(truth, [value_of[s] for s in structures])).mean(axis=0)[1])
        for panel, (title, masks) in enumerate((("manual", {s: truth == value_of[s] for s in structures}),
                                                ("model (fused)", fused))):
            axis = figure.add_subplot(grid[panel, column])
            axis.imshow(coronal(scan, row), cmap="gray", vmin=display[0], vmax=display[1], aspect="equal")
            axis.imshow(coronal(label_image(masks, scan.shape), row))
            axis.set_title(f"{case.id}: {title}", fontsize=9)
            axis.axis("off")
    figure.savefig(output, dpi=110)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
