"""Benchmark: one organ with 5 proposals of each model, with freed memory kept for the next tensors
(``allocator.keep_freed_memory``, what the ``textdiffseg`` command and the Slicer worker do) and with glibc's
default (large freed tensors returned to the system); prints seconds, peak memory and their ratios.

    python benchmarks/freed_memory.py [--models universal-btcv,textdiffseg3d-btcv,lcpdn-btcv,progidiff-btcv]
        [--rounds 1] [--output benchmarks/results/freed_memory.json]

Each run is ``benchmarks/segment_organ.py --repeats 1`` in its own process (malloc's settings hold for a whole
process), the two settings alternated model by model, so that both see the machine at the same hour.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SETTINGS = {"returned": ["--return-freed-memory"], "kept": []}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="universal-btcv,textdiffseg3d-btcv,lcpdn-btcv,progidiff-btcv")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "freed_memory.json"))
    args = parser.parse_args()
    runs = {model: {setting: [] for setting in SETTINGS} for model in args.models.split(",")}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.rounds):
            for model, of_model in runs.items():
                for setting, options in SETTINGS.items():
                    output = Path(folder) / f"{model}-{setting}.json"
                    subprocess.run([sys.executable, str(Path(__file__).parent / "segment_organ.py"), "--model", model,
                                    "--repeats", "1", "--output", str(output), *options],
                                   check=True, stdout=subprocess.DEVNULL)
                    of_model[setting].append(json.loads(output.read_text()))
    figures = {"models": {model: summary(of_model) for model, of_model in runs.items()}}
    first = next(iter(runs.values()))["kept"][0]
    figures.update({key: first[key] for key in ("case", "prompt", "proposals", "cpu", "threads")})
    for model, summarised in figures["models"].items():
        print(f"{model:20s} {summarised}")
    Path(args.output).write_text(json.dumps(figures, indent=2) + "\n")


def summary(of_model: dict[str, list[dict]]) -> dict:
    """Median seconds and peak memory of each setting, kept against returned, and whether both segmented alike."""
    seconds = {s: statistics.median(run["segment_seconds"] for run in runs) for s, runs in of_model.items()}
    memory = {s: max(run["peak_rss_mb"] for run in runs) for s, runs in of_model.items()}
    return {"seconds": seconds, "peak_rss_mb": memory,
            "speedup": round(seconds["returned"] / seconds["kept"], 2),
            "memory_ratio": round(memory["kept"] / memory["returned"], 2),
            "same_masks": len({json.dumps(run["fused_voxels"]) for runs in of_model.values() for run in runs}) == 1}


if __name__ == "__main__":
    main()
