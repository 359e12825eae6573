"""The model card (``README.md`` of a model folder): what a model is, how it was trained, how it scores."""

from __future__ import annotations

import json
from pathlib import Path

from .config import ModelConfig
from .families import FAMILIES

TRAINING_RECORD = "training.json"
VOLUME_RANGES = "structure_volumes_ml"  # in the training record: each structure's [smallest, largest] ml
# In the training record: how many parameters the last stage trained ("trained") of the model's ("of"), as
# adaptation papers report (ProGiDiff's LoRA adapter trains 31 M of 367 M).
TRAINED_PARAMETERS = "trained_parameters"


def copy_training_record(source: Path, target: Path, note: str) -> None:
    """``source``'s training record into ``target``, with ``note`` (how ``target`` was made from it) added to its notes."""
    training = json.loads((Path(source) / TRAINING_RECORD).read_text())
    training["notes"] = f"{training.get('notes', '')} {note}".strip()
    (Path(target) / TRAINING_RECORD).write_text(json.dumps(training, indent=2) + "\n")


def render_card(config: ModelConfig, training: dict, evaluation: dict | None = None) -> str:
    """Markdown for a model folder; ``evaluation`` is a report written by ``textdiffseg evaluate``."""
    settings = training["settings"]
    lines = [
        f"# {config.name}",
        "",
        f"Family: `{config.family}`. Modality: {config.modality}. Model grid spacing (x, y, z): {config.spacing} mm.",
        f"Conditioning: {config.conditioning} (text encoder `{config.text_encoder}`)."
        if config.conditioning == "text" else "Conditioning: a learnt embedding per structure.",
        "Sampling: " + "; ".join(FAMILIES[config.family].card_text(config)) + ".",
        "",
        "Structures: " + ", ".join(f"`{s}`" for s in config.structures) + ".",
        "",
        *([f"A LoRA adapter (rank {config.adapter['rank']}) of the model `{config.adapter['base']}` "
           f"(weights sha256 `{config.adapter['base_sha256'][:12]}…`), which must be installed to use it.", ""]
          if config.adapter else []),
        "## Training",
        "",
        f"Data: `{settings['data']}`; {len(training['split']['training'])} training cases, "
        f"{len(training['split']['validation'])} validation cases kept out of training "
        f"({', '.join(training['split']['validation'])}).",
        "",
        *([_trained_parameters(training[TRAINED_PARAMETERS]), ""] if training.get(TRAINED_PARAMETERS) else []),
        "Settings:",
        "",
        "```json",
        json.dumps({k: v for k, v in settings.items() if k not in ("data", "output", "cache_dir")}, indent=2),
        "```",
        "",
        f"Reproduce: `textdiffseg train --data {settings['data']} --output {settings['output']}` with the settings above.",
        "",
        *([training["notes"], ""] if training.get("notes") else []),
        *([_volume_ranges(training[VOLUME_RANGES]), ""] if training.get(VOLUME_RANGES) else []),
    ]
    if evaluation is not None:
        lines += _scores(evaluation)
    return "\n".join(lines)


def _trained_parameters(count: dict) -> str:
    return f"Its last training stage (`{count['stage']}`) trained {count['trained']:,} of its {count['of']:,} parameters."


def _volume_ranges(ranges: dict[str, list[float]]) -> str:
    """The sentence of the training cases' structure volumes; a result far outside them gets a warning."""
    return ("Structure volumes in the training cases (ml; a result far outside them is flagged when segmenting): "
            + ", ".join(f"{name} {low:.0f}-{high:.0f}" for name, (low, high) in ranges.items()) + ".")


def _scores(report: dict) -> list[str]:
    lines = [
        "## Measured scores",
        "",
        f"On {report['num_cases']} validation cases ({', '.join(report['cases'])}), {report['num_proposals']} proposals, "
        f"{report['steps']} sampling steps, fusion `{report['fusion']}`"
        f"{' of each proposal’s largest connected region' if report['largest_component'] else ''}"
        f"{_separation(report)}; {_timing(report)} on {report['device']}. Mean fused Dice: {report['mean_dice']:.3f}.",
        "",
        "| structure | Dice (fused) | Dice (single) | Oracle Dice | RandTop-3 Dice | HD95 (mm) | NSD (2 mm) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, scores in report["structures"].items():
        cells = [format_score(scores[m], 3) for m in ("dice", "single_dice", "oracle_dice", "randtop3_dice")]
        cells += [format_score(scores["hd95_mm"], 1), format_score(scores["nsd"], 3)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", *_per_case(report), "", *_size_warnings(report), f"Reproduce: `{report['command']}`", ""]
    return lines


def _timing(report: dict) -> str:
    if report["seconds_per_case"] is None:  # evaluation.model_report
        return f"scored in a run of the ensemble {report['ensemble']} (not timed apart)"
    return f"{report['seconds_per_case']:.1f} s per case"


def _size_warnings(report: dict) -> list[str]:
    """Which fused masks the size check flagged (``typical_size``), with their Dice: does it catch the failures?
    And which of them a second look on a coarser grid replaced."""
    if "size_warnings" not in report:  # a report from before the check
        return []
    dice = {f"{row['case']} {row['structure']}": row["dice"] for row in report["rows"]}
    flagged = ", ".join(f"{name} (Dice {dice[name]:.3f})" for name in report["size_warnings"]) or "none"
    lines = [f"Fused masks whose volume is far outside the training cases' range, and so get a warning when "
             f"segmenting: {flagged}.", ""]
    if report.get("second_look"):
        looked = ", ".join(f"{row['case']} {row['structure']} ({row['sampling_scale']:.2f} times coarser, Dice "
                           f"{row['dice']:.3f})" for row in report["rows"] if row["sampling_scale"] > 1) or "none"
        lines += [f"Structures found far larger than the training cases' and sampled again on a coarser grid, the "
                  f"second look kept because it found more (`second_look`): {looked}.", ""]
    return lines


def _per_case(report: dict) -> list[str]:
    """The fused Dice of each case and structure: where a mean is held down by one scan, it shows."""
    structures = list(report["structures"])
    dice = {(row["case"], row["structure"]): row["dice"] for row in report["rows"]}
    lines = ["Fused Dice per case:", "", "| case | " + " | ".join(structures) + " |", "|---|" + "---|" * len(structures)]
    for case in report["cases"]:
        lines.append(f"| {case} | " + " | ".join(format_score(dice.get((case, s)), 3) for s in structures) + " |")
    return lines


def _separation(report: dict) -> str:
    """How the fused masks of the structures segmented together were kept apart (reports before
    ``separate`` existed let them overlap)."""
    if not report.get("separate") or len(report["structures"]) < 2:
        return ""
    return (", the structures of a case segmented together and kept apart (a voxel two fused masks claim goes to "
            "the structure more probable there)")


def format_score(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"
