"""Draw Oracle@k and RandTop-3 over the number of proposals k (the ProGiDiff paper's Fig. 3) for each model and
ensemble of docs/family-comparison.json: docs/proposal-curves.png (+ .json).

For each structure of each case, the evaluate report's rows keep every proposal's Dice and model in sampling
order. At each k, the first k proposals of each model are taken (an ensemble of M models: k x M):
Oracle@k is the best Dice among them, RandTop-3@k the expected Dice of one of the three best picked at random
(the paper's simulated expert). Both are averaged over the cases of each organ, then over the organs, as the
report's mean Dice is; the fused Dice of all the proposals is drawn at the last k. ``--reports`` draws more
evaluate reports of the same cases beside them (one with 10 proposals, say, for Oracle@10); ``--keep`` draws
curves measured before from the current proposal-curves.json, where their reports are no longer at hand;
``--rows`` draws only those rows of the comparison (a figure of every run measured is unreadable).

    python docs/proposal_curves.py [--comparison docs/family-comparison.json] [--rows NAME,...]
        [--reports REPORT.json=NAME,...] [--keep NAME,...]
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent


def first_of_each_model(row: dict, k: int) -> list[float]:
    """The Dice of the first ``k`` proposals of each model in ``row``."""
    taken, dices = {}, []
    for dice, model in zip(row["proposal_dice"], row["proposal_models"]):
        if taken.get(model, 0) < k:
            taken[model] = taken.get(model, 0) + 1
            dices.append(dice)
    return dices


def organ_mean(rows: list[dict], score) -> float:
    """``score(row)`` averaged over the cases of each organ, then over the organs."""
    organs = sorted({row["structure"] for row in rows})
    return float(np.mean([np.mean([score(row) for row in rows if row["structure"] == organ]) for organ in organs]))


def curves(report: dict) -> dict:
    rows, count = report["rows"], report["num_proposals"]
    ks = list(range(1, count + 1))
    return {
        "k": ks,
        "oracle": [organ_mean(rows, lambda row, k=k: max(first_of_each_model(row, k))) for k in ks],
        "randtop3": [organ_mean(rows, lambda row, k=k: float(np.mean(sorted(first_of_each_model(row, k))[-3:])))
                     for k in ks],
        "single": organ_mean(rows, lambda row: float(np.mean(row["proposal_dice"]))),
        "fused": organ_mean(rows, lambda row: row["dice"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comparison", default=str(HERE / "family-comparison.json"))
    parser.add_argument("--rows", default="", help="the comparison's rows to draw, NAME,... (default: all)")
    parser.add_argument("--reports", default="", help="more evaluate reports, REPORT.json=NAME,...")
    parser.add_argument("--keep", default="", help="curves to keep from the output's .json, NAME,...")
    parser.add_argument("--output", default=str(HERE / "proposal-curves.png"))
    args = parser.parse_args()
    output = Path(args.output)
    kept = [name for name in args.keep.split(",") if name]
    previous = json.loads(output.with_suffix(".json").read_text())["curves"] if kept else {}
    unknown = [name for name in kept if name not in previous]
    if unknown:
        raise SystemExit(f"{output.with_suffix('.json')} has no curve named {', '.join(unknown)}")
    reports = json.loads(Path(args.comparison).read_text())
    rows = [name for name in args.rows.split(",") if name]
    unknown = [name for name in rows if name not in reports]
    if unknown:
        raise SystemExit(f"{args.comparison} has no row named {', '.join(unknown)}")
    reports = {name: reports[name] for name in rows} if rows else reports
    for item in filter(None, args.reports.split(",")):
        path, name = item.split("=", 1)
        reports[name] = json.loads(Path(path).read_text())
    missing = [name for name, report in reports.items() if "proposal_dice" not in report["rows"][0]]
    if missing:
        raise SystemExit(f"the reports of {', '.join(missing)} keep no Dice per proposal: evaluate them again "
                         "(textdiffseg evaluate records proposal_dice since December 2026)")
    figures = {name: curves(report) for name, report in reports.items()}
    figures.update({name: previous[name] for name in kept})
    figure, axes = plt.subplots(1, 2, figsize=(12, 7.5), sharey=True)
    for (name, values), colour in zip(figures.items(), plt.cm.tab20(np.arange(len(figures)) % 20)):  # one each
        for axis, key in zip(axes, ("oracle", "randtop3")):
            axis.plot(values["k"], values[key], "o--" if "models" in reports.get(name, {}) else "o-", color=colour,
                      label=name)
            axis.plot(values["k"][-1], values["fused"], "*", color=colour, markersize=12)
    for axis, title in zip(axes, ("Oracle@k (best proposal)", "RandTop-3 (one of the three best, at random)")):
        axis.set_title(title)
        axis.set_xlabel("proposals per model, k")
        axis.set_xticks(range(1, max(len(values["k"]) for values in figures.values()) + 1))
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("Dice, mean of the organs")
    first = next(iter(reports.values()))
    figure.suptitle(f"BTCV validation cases {', '.join(first['cases'])}: Dice over the number of proposals")
    figure.tight_layout(rect=(0, 0.2, 1, 1))  # the legend below both panels, clear of the curves
    figure.legend(*axes[0].get_legend_handles_labels(), title="star: fused, all proposals", fontsize=8, ncol=2,
                  loc="lower center")
    figure.savefig(output, dpi=120)
    record = {"comparison": Path(args.comparison).name, "rows": rows, "reports": args.reports, "kept": kept,
              "curves": figures}
    output.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {output}")
    for name, values in figures.items():
        print(f"{name}: Oracle@k {' '.join(f'{v:.3f}' for v in values['oracle'])}; RandTop-3 "
              f"{' '.join(f'{v:.3f}' for v in values['randtop3'])}; single {values['single']:.3f}; "
              f"fused {values['fused']:.3f}")


if __name__ == "__main__":
    main()
