"""Compare model families side by side on the same validation cases: docs/family-comparison.md (+ .json).

Every model segments the six organs of the project's targets in each case, in one call (kept apart),
with the same proposals, seed and fusion, each at its own default number of sampling steps; the table
gives per organ the fused, single-proposal and Oracle@k Dice, HD95 and NSD, how well the uncertainty map
points at the fused mask's errors (AUROC), and how coherent the proposals are along z (mean Dice of
neighbouring slices) against the manual labels' own.

    python docs/family_comparison.py [--models universal-btcv,textdiffseg3d-btcv] [--proposals 5]
        [--cases btcv_0007,btcv_0009,btcv_0028,btcv_0031]

A model given as REPORT.json is not run again: that report of ``textdiffseg evaluate`` (or of this
script) is used, and must cover the same cases, organs and proposals; REPORT.json=ROW names its rows
otherwise than by its model (an ablation, or an earlier model of the same name). An earlier comparison's
.json gives all its rows, so a row is added without the reports they came from:
``--models docs/family-comparison.json,NEW.json=ROW``. An ensemble's report
(``textdiffseg evaluate --model a,b``) gives a row to each of its models, scored on the same proposals,
and one to the ensemble.

The default cases are the BTCV validation split that every bundled CT model kept out of training.
"""

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from TextDiffSegLib.evaluation import evaluate, mean_of_defined, model_report  # noqa: E402
from TextDiffSegLib.model_card import format_score  # noqa: E402
from TextDiffSegLib.modelio import load_model  # noqa: E402
from TextDiffSegLib.registry import model_names, resolve_model  # noqa: E402
from TextDiffSegLib.segmenter import Segmenter  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "btcv" / "dataset.json"
ORGANS = ("liver", "spleen", "kidney_left", "kidney_right", "stomach", "pancreas")
COLUMNS = (("dice", "fused Dice", 3), ("single_dice", "single Dice", 3), ("oracle_dice", "Oracle@{k} Dice", 3),
           ("iou", "IoU", 3), ("hd95_mm", "HD95 (mm)", 1), ("nsd", "NSD (2 mm)", 3),
           ("uncertainty_auroc", "uncertainty AUROC", 3), ("proposal_slice_dice", "slice coherence", 3))


def table(reports: dict[str, dict]) -> list[str]:
    k = next(iter(reports.values()))["num_proposals"]
    header = ["organ", "model", *(title.format(k=k) for _, title, _ in COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for organ in ORGANS:
        for name, report in reports.items():
            scores = report["structures"][organ]
            lines.append("| " + " | ".join([organ, name, *(format_score(scores[key], digits) for key, _, digits in COLUMNS)])
                         + " |")
    for name, report in reports.items():
        lines.append(f"| mean of the six | {name} | " + " | ".join(
            format_score(mean_of_defined([report["structures"][o][key] for o in ORGANS]), digits) for key, _, digits in COLUMNS)
                     + " |")
    return lines


def weighting_table(reports: dict[str, dict]) -> list[str]:
    """Each weighed ensemble's fused Dice per organ: its models alike, and weighed per organ with the weights chosen
    on the other cases (``evaluation.cross_validated_weighting``), with the weights chosen on all the cases."""
    weighed = {name: report for name, report in reports.items() if (report.get("weighting") or {}).get("cross_validated")}
    if not weighed:
        return []
    lines = ["| organ | ensemble | models alike | weighed, chosen on the other cases | weights chosen on all cases |",
             "|---|---|---|---|---|"]
    for organ in ORGANS:
        for name, report in weighed.items():
            weights = ", ".join(f"{model} {weight:g}" for model, weight in report["weighting"]["weights"][organ].items())
            lines.append(f"| {organ} | {name} | {format_score(report['structures'][organ]['dice'], 3)} | "
                         f"{format_score(report['weighting']['cross_validated']['structures'][organ]['dice'], 3)} | "
                         f"{weights} |")
    for name, report in weighed.items():
        lines.append(f"| mean of the six | {name} | {format_score(report['mean_dice'], 3)} | "
                     f"{format_score(report['weighting']['cross_validated']['mean_dice'], 3)} | |")
    return ["", "An ensemble's models weighed per organ (`textdiffseg evaluate` fuses the same proposals at every "
                "weighting in steps of 1/4): each case is scored with the weights whose mean fused Dice is highest "
                "on the other cases, so no case is scored with weights chosen on it.", "", *lines]


def parameter_count(report: dict) -> str:
    """The parameters of a report's model, or of all an ensemble's, in millions: as the report says, or counted
    from the model it names (reports written before evaluate recorded them)."""
    count = report.get("parameters") or sum(p.numel() for part in model_names(report["model"])
                                            for p in load_model(resolve_model(part)).parameters())
    return f"{count / 1e6:.2f} M"


def with_each_model(report: dict, row: str = "") -> dict[str, dict]:
    """A report by the name of its row, ``row`` or its model's: an ensemble's as each of its models'
    (``evaluation.model_report``: scored on the same proposals, not timed apart; "MODEL in ROW" where ``row`` names
    the ensemble, so its models' rows do not replace those of another ensemble) and the ensemble's own."""
    if "models" not in report:
        return {row or report["model"]: report}
    return {**{f"{name} in {row}" if row else name: model_report(report, name) for name in report["models"]},
            row or ensemble_name(report["model"]): report}


def ensemble_name(model: str) -> str:
    """The row name of the ensemble ``a,b``."""
    return f"ensemble ({' + '.join(model_names(model))})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="universal-btcv,textdiffseg3d-btcv")
    parser.add_argument("--cases", default="btcv_0007,btcv_0009,btcv_0028,btcv_0031")
    parser.add_argument("--proposals", type=int, default=5)
    parser.add_argument("--output", default=str(Path(__file__).parent / "family-comparison.md"))
    args = parser.parse_args()
    reports = {}
    for entry in args.models.split(","):
        model, _, row = entry.partition("=")
        if model.endswith(".json"):
            written = json.loads(Path(model).read_text())
            # an earlier comparison's rows (its .json), or one report
            rows = with_each_model(written, row) if "structures" in written else written
            for report in rows.values():
                if (report["cases"], sorted(report["structures"]), report["num_proposals"]) != (
                        args.cases.split(","), sorted(ORGANS), args.proposals):
                    raise SystemExit(f"{model} covers other cases, organs or proposals than this comparison")
            reports.update(rows)
            continue
        report = evaluate(Segmenter.from_pretrained(model), str(DATA), case_ids=args.cases.split(","),
                          structures=list(ORGANS), num_proposals=args.proposals,
                          progress=lambda done, total, case: print(f"{model}: {done}/{total} {case}", flush=True))
        reports[report["model"]] = report
        print(f"{report['model']}: mean fused Dice {report['mean_dice']:.3f}, {report['seconds_per_case']:.0f} s a case")
    reference = {organ: mean_of_defined([row["reference_slice_dice"] for row in next(iter(reports.values()))["rows"]
                               if row["structure"] == organ]) for organ in ORGANS}
    first = next(iter(reports.values()))
    steps = ", ".join(f"{name}: {report['steps']}" for name, report in reports.items() if report["steps"])
    fusions = ", ".join(f"{name}: `{report['fusion']}`" for name, report in reports.items()
                        if report["fusion"] != first["fusion"])
    lines = [
        "# Model families side by side", "",
        f"BTCV validation cases {', '.join(first['cases'])} (kept out of every bundled CT model's training), "
        f"{first['num_proposals']} proposals from seed {first['seed']}, fusion `{first['fusion']}`"
        f"{f' ({fusions})' if fusions else ''}, the six organs "
        "segmented together in one call and kept apart; each model at its own default number of sampling steps "
        f"({steps}). "
        f"Written by `python docs/family_comparison.py --models {args.models} --cases {args.cases} "
        f"--proposals {args.proposals}`; the full reports are in `{Path(args.output).with_suffix('.json').name}`.", "",
        *table(reports), *weighting_table(reports), "",
        "Slice coherence: the mean Dice between neighbouring slices of each proposal (on the scan's own slices), "
        "averaged over proposals and cases. The manual labels' own, for comparison: "
        + ", ".join(f"{organ} {format_score(value, 3)}" for organ, value in reference.items()) + ".", "",
        "Parameters: " + ", ".join(f"{name} {parameter_count(report)}" for name, report in reports.items())
        + ".", "",
        "Seconds per case (six organs, this machine's CPU): "
        + ", ".join(f"{name} {report['seconds_per_case']:.0f} s on {report['device']}" for name, report in reports.items()
                    if report["seconds_per_case"] is not None)
        + ".",
    ]
    if any("models" in report for report in reports.values()):
        lines += ["", f"An ensemble (`textdiffseg evaluate --model a,b`) fuses each model's {first['num_proposals']} "
                      "proposals of an organ as one set; its Oracle@k is the best of all its models' proposals, its "
                      "models' rows are their scores on the same proposals (a model in two ensembles fused alike gets "
                      "the same), and its seconds are those of all its models."]
    for name, report in reports.items():
        report.setdefault("command", f"python docs/family_comparison.py --models {name} --cases {args.cases} "
                                     f"--proposals {args.proposals}")
    output = Path(args.output)
    output.write_text("\n".join(lines) + "\n")
    output.with_suffix(".json").write_text(json.dumps(reports, indent=2) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
