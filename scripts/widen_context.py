"""Give a model more of the scan to read, without changing what it computes.

    python scripts/widen_context.py OUTPUT MODEL [--context-slices N] [--lateral-position]

A 2.5D model (the universal, LCPDN and ProGiDiff families) reads each slice with ``context_slices`` neighbours
on each side and, where the config sets ``lateral_position``, each voxel's left-right distance from the middle
of the body, as input channels. This copies MODEL to OUTPUT with N neighbours per side (default: as many as MODEL
reads) and, with ``--lateral-position``, the position channel: the weights on the inputs MODEL read are kept,
those of the new inputs start at zero (the family's ``grown``), so OUTPUT segments exactly as MODEL until it is
trained further (``textdiffseg train --init-from OUTPUT``).
"""

import argparse
import sys
from pathlib import Path

from TextDiffSegLib.families import FAMILIES
from TextDiffSegLib.model_card import copy_training_record
from TextDiffSegLib.modelio import load_model, read_config, save_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path)
    parser.add_argument("model", type=Path,
                        help="a universal, LCPDN or ProGiDiff model folder (config.json + model.safetensors)")
    parser.add_argument("--context-slices", type=int, help="neighbouring slices on each side (default: MODEL's)")
    parser.add_argument("--lateral-position", action="store_true", help="add the lateral position channel")
    args = parser.parse_args()

    config = read_config(args.model)
    grown = FAMILIES[config.family].grown
    if grown is None or config.adapter:
        sys.exit(f"{args.model} is not a universal, LCPDN or ProGiDiff model's folder (an adapter cannot be widened: "
                 "widen its base)")
    old = config.context_slices
    new = old if args.context_slices is None else args.context_slices
    if new < old:
        sys.exit(f"{args.model} already sees {old} slices on each side; widening cannot remove any")
    had_position = config.lateral_position
    position = had_position or args.lateral_position
    if new == old and position == had_position:
        sys.exit(f"{args.model} already has that input; ask for more slices (--context-slices) or --lateral-position")
    wider = type(config).from_dict({**config.to_dict(), "context_slices": new, "lateral_position": position})
    save_model(grown(load_model(args.model), wider), args.output)
    added = []
    if new > old:
        added.append(f"widened from {old} to {new} neighbouring slices per side")
    if position and not had_position:
        added.append("given the lateral position channel")
    note = f"Inputs {' and '.join(added)} (scripts/widen_context.py, new weights zero) from {args.model}."
    copy_training_record(args.model, args.output, note)
    print(f"{args.model} {' and '.join(added)} in {args.output}")


if __name__ == "__main__":
    main()
