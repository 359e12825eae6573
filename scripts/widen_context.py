"""Give a universal model's image encoder more neighbouring slices, without changing what it computes.

    python scripts/widen_context.py OUTPUT MODEL --context-slices N

The image encoder sees each slice with ``context_slices`` neighbours on each side, as the input
channels of its first convolution. This copies MODEL to OUTPUT with N neighbours per side: the
first convolution's weights for the slices MODEL saw are kept, those of the new outer slices start
at zero, so OUTPUT segments exactly as MODEL until it is trained further
(``textdiffseg train --init-from OUTPUT``).
"""

import argparse
import sys
from pathlib import Path

from TextDiffSegLib.model_card import copy_training_record
from TextDiffSegLib.modelio import WEIGHTS_NAME, load_model, read_config, write_folder

FIRST_CONV = "image_encoder.layers.0.0.weight"  # [out, 2 * context_slices + 1, 3, 3]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path)
    parser.add_argument("model", type=Path, help="a universal model folder (config.json + model.safetensors)")
    parser.add_argument("--context-slices", type=int, required=True, help="neighbouring slices on each side")
    args = parser.parse_args()

    config = read_config(args.model)
    if config.family != "universal" or config.adapter:
        sys.exit(f"{args.model} is not a universal model's folder (an adapter cannot be widened: widen its base)")
    old = config.context_slices
    if args.context_slices < old:
        sys.exit(f"{args.model} already sees {old} slices on each side; widening cannot remove any")
    weights = load_model(args.model).state_dict()
    kernel = weights[FIRST_CONV]
    widened = kernel.new_zeros(kernel.shape[0], 2 * args.context_slices + 1, *kernel.shape[2:])
    pad = args.context_slices - old
    widened[:, pad:pad + kernel.shape[1]] = kernel
    weights[FIRST_CONV] = widened
    config.context_slices = args.context_slices
    write_folder(args.output, WEIGHTS_NAME, weights, config)
    note = (f"Image encoder widened from {old} to {args.context_slices} neighbouring slices per side "
            f"(scripts/widen_context.py, new weights zero) from {args.model}.")
    copy_training_record(args.model, args.output, note)
    print(f"widened {args.model} to {args.context_slices} slices per side in {args.output}")


if __name__ == "__main__":
    main()
