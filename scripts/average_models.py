"""Average the weights of model folders of one lineage: a "model soup" (Wortsman et al., ICML 2022).

    python scripts/average_models.py OUTPUT MODEL [MODEL ...]

Models trained from the same start (``textdiffseg train --init-from``) sit in one basin of the loss,
so the mean of their weights is a model too, often better than each. Every tensor is averaged in
fp32. OUTPUT gets the last model's config and training record, with a note naming the averaged
folders, ready for ``scripts/bundle_model.py``. Models whose configs differ (other than in name)
are refused.
"""

import argparse
import sys
from pathlib import Path

from TextDiffSegLib.model_card import copy_training_record
from TextDiffSegLib.modelio import WEIGHTS_NAME, load_model, read_config, write_folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path)
    parser.add_argument("models", type=Path, nargs="+", help="model folders (config.json + model.safetensors)")
    args = parser.parse_args()

    configs = [read_config(folder) for folder in args.models]
    if any(c.adapter for c in configs):
        sys.exit("LoRA adapter folders cannot be averaged: average their base models, then adapt the average")
    architectures = [{k: v for k, v in c.to_dict().items() if k != "name"} for c in configs]
    if any(a != architectures[0] for a in architectures):
        sys.exit("the models' configs differ: only models of one lineage (same architecture and options) can be averaged")
    weights = [load_model(folder).state_dict() for folder in args.models]  # each checked against its config
    mean = {k: sum(w[k] for w in weights) / len(weights) for k in weights[0]}
    write_folder(args.output, WEIGHTS_NAME, mean, configs[-1])
    note = f"Weights: the mean of the weights of {', '.join(str(m) for m in args.models)} (scripts/average_models.py)."
    copy_training_record(args.models[-1], args.output, note)
    print(f"averaged {len(args.models)} models into {args.output}")


if __name__ == "__main__":
    main()
