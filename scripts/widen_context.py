"""Give a universal model's image encoder more input, without changing what it computes.

    python scripts/widen_context.py OUTPUT MODEL [--context-slices N] [--lateral-position]

The image encoder sees each slice with ``context_slices`` neighbours on each side, and, where the
config sets ``lateral_position``, each voxel's left-right distance from the middle of the body, as
the input channels of its first convolution. This copies MODEL to OUTPUT with N neighbours per side
(default: as many as MODEL sees) and, with ``--lateral-position``, the position channel: the first
convolution's weights for the inputs MODEL saw are kept, those of the new inputs start at zero, so
OUTPUT segments exactly as MODEL until it is trained further (``textdiffseg train --init-from OUTPUT``).
"""

import argparse
import sys
from pathlib import Path

from TextDiffSegLib.model_card import copy_training_record
from TextDiffSegLib.modelio import WEIGHTS_NAME, load_model, read_config, write_folder

FIRST_CONV = "image_encoder.layers.0.0.weight"  # [out, 2 * context_slices + 1 (+ 1 for the lateral position), 3, 3]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path)
    parser.add_argument("model", type=Path, help="a universal model folder (config.json + model.safetensors)")
    parser.add_argument("--context-slices", type=int, help="neighbouring slices on each side (default: MODEL's)")
    parser.add_argument("--lateral-position", action="store_true", help="add the lateral position channel")
    args = parser.parse_args()

    config = read_config(args.model)
    if config.family != "universal" or config.adapter:
        sys.exit(f"{args.model} is not a universal model's folder (an adapter cannot be widened: widen its base)")
    old = config.context_slices
    new = old if args.context_slices is None else args.context_slices
    if new < old:
        sys.exit(f"{args.model} already sees {old} slices on each side; widening cannot remove any")
    had_position = config.lateral_position
    position = had_position or args.lateral_position
    if new == old and position == had_position:
        sys.exit(f"{args.model} already has that input; ask for more slices (--context-slices) or --lateral-position")
    weights = load_model(args.model).state_dict()
    kernel = weights[FIRST_CONV]
    old_slices = 2 * old + 1
    config.context_slices, config.lateral_position = new, position
    widened = kernel.new_zeros(kernel.shape[0], config.image_in_channels, *kernel.shape[2:])
    pad = new - old
    widened[:, pad:pad + old_slices] = kernel[:, :old_slices]
    if had_position:
        widened[:, -1] = kernel[:, -1]
    weights[FIRST_CONV] = widened
    write_folder(args.output, WEIGHTS_NAME, weights, config)
    added = []
    if new > old:
        added.append(f"widened from {old} to {new} neighbouring slices per side")
    if position and not had_position:
        added.append("given the lateral position channel")
    note = f"Image encoder {' and '.join(added)} (scripts/widen_context.py, new weights zero) from {args.model}."
    copy_training_record(args.model, args.output, note)
    print(f"image encoder of {args.model} {' and '.join(added)} in {args.output}")


if __name__ == "__main__":
    main()
