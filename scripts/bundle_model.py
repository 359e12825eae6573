"""Bundle a trained model as a registered model in Resources/Models, with its measured scores.

    python scripts/bundle_model.py RUN/model --name universal-btcv --report REPORT.json

Copies config.json, the weights (model.safetensors, or adapter.safetensors for a LoRA adapter) and
training.json, renders the model card (README.md) with the evaluation report, and updates
Resources/Models/registry.json (structures, size, sha256 of the weights).
"""

import argparse
import hashlib
import json
import shutil
from pathlib import Path

from TextDiffSegLib.adaptation import ADAPTER_WEIGHTS
from TextDiffSegLib.evaluation import model_report
from TextDiffSegLib.model_card import TRAINING_RECORD, render_card
from TextDiffSegLib.modelio import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME, read_config
from TextDiffSegLib.resources import resources_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="trained model folder (RUN/model)")
    parser.add_argument("--name", required=True)
    parser.add_argument("--report", type=Path, required=True,
                        help="report of `textdiffseg evaluate` on the validation cases (of the model, or of an ensemble "
                             "with it)")
    parser.add_argument("--description", help="one line for the model list (default: the registry's current one)")
    args = parser.parse_args()

    target = resources_dir() / "Models" / args.name
    target.mkdir(parents=True, exist_ok=True)
    weights_name = ADAPTER_WEIGHTS if read_config(args.model).adapter else WEIGHTS_NAME
    for name in (CONFIG_NAME, weights_name, TRAINING_RECORD):
        shutil.copy(args.model / name, target / name)
    config = read_config(target)
    if config.name != args.name:
        config.name = args.name
        config.save(target / CONFIG_NAME)
    report = json.loads(args.report.read_text())
    if "models" in report:  # an ensemble's: the model's own scores in it
        report = model_report(report, read_config(args.model).name)
    report["model"] = args.name  # as bundled, whatever its run called it
    (target / "evaluation.json").write_text(json.dumps(report, indent=2) + "\n")
    training = json.loads((target / TRAINING_RECORD).read_text())
    (target / CARD_NAME).write_text(render_card(config, training, report))

    registry_path = resources_dir() / "Models" / "registry.json"
    registry = json.loads(registry_path.read_text())
    weights = (target / weights_name).read_bytes()
    entry = {"name": args.name, "family": config.family, "structures": list(config.structures),
             "modality": config.modality, "size_bytes": len(weights), "sha256": hashlib.sha256(weights).hexdigest(),
             "url": None, "path": args.name, **({"description": args.description} if args.description else {})}
    names = [m["name"] for m in registry["models"]]
    if args.name in names:
        index = names.index(args.name)
        registry["models"][index] = {**registry["models"][index], **entry}
    else:
        registry["models"].append({"description": "", **entry})
    registry_path.write_text(json.dumps(registry, indent=2) + "\n")
    print(f"bundled {args.name} in {target} ({len(weights) / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
