"""Benchmark: a cohort of BTCV scans, one organ, 5 proposals, segmented as one ``textdiffseg segment`` run over
a list of the scans against the per-scan loop (a new ``textdiffseg segment`` process per scan, which loads the
model again each time); prints seconds per scan for each, in one run.

    python benchmarks/cohort.py [--cases 18] [--prompt liver] [--model NAME|DIR] [--proposals 5] [--steps N]
        [--device cpu] [--output benchmarks/results/cohort.json]

Both write label maps, which must hold the same voxels (the same seeds); ``--cases N`` takes the first N scans of
``dataset.json``. Each run is a process of this checkout's engine (``python -m TextDiffSegLib.cli``), started the
same way, so the difference is what the cohort saves: starting Python and loading the model for every scan.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data" / "btcv"

from TextDiffSegLib.machine import device_name  # noqa: E402
from TextDiffSegLib.modelio import read_config  # noqa: E402
from TextDiffSegLib.registry import resolve_model  # noqa: E402
from TextDiffSegLib.volume import read_volume  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=18, help="the first N scans of BTCV's dataset.json (default: all 18)")
    parser.add_argument("--prompt", default="liver")
    parser.add_argument("--model")
    parser.add_argument("--proposals", type=int, default=5)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "cohort.json"))
    args = parser.parse_args()

    scans = [DATA / case["image"] for case in json.loads((DATA / "dataset.json").read_text())["training"]][: args.cases]
    settings = ["-p", args.prompt, "--proposals", str(args.proposals), "--device", args.device, "--progress", "none",
                *(["--model", args.model] if args.model else []), *(["--steps", str(args.steps)] if args.steps else [])]
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        (work / "loop").mkdir()
        started = time.perf_counter()
        for scan in scans:  # the per-scan loop: one process per scan
            textdiffseg("segment", "-i", scan, "-o", work / "loop" / scan.name, *settings)
        loop_seconds = time.perf_counter() - started

        (work / "cohort.txt").write_text("".join(f"{scan}\n" for scan in scans))
        started = time.perf_counter()
        textdiffseg("segment", "-i", work / "cohort.txt", "-o", work / "cohort", "--format", "nii.gz", *settings)
        cohort_seconds = time.perf_counter() - started

        same = all(np.array_equal(read_volume(work / "loop" / scan.name).array, read_volume(work / "cohort" / scan.name).array)
                   for scan in scans)
    config = read_config(resolve_model(args.model))
    figures = {
        "cases": len(scans), "prompt": args.prompt, "model": config.name, "proposals": args.proposals,
        "steps": args.steps or config.default_steps, "device": args.device, "device_name": device_name(args.device),
        "threads": torch.get_num_threads(),
        "loop_seconds_per_scan": round(loop_seconds / len(scans), 2),
        "cohort_seconds_per_scan": round(cohort_seconds / len(scans), 2),
        "loop_over_cohort": round(loop_seconds / cohort_seconds, 3), "same_masks": same,
    }
    for key, value in figures.items():
        print(f"{key:24s} {value}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(figures, indent=2) + "\n")


def textdiffseg(*arguments) -> None:
    """``textdiffseg ARGUMENTS`` as a new process of this checkout's engine; raises if it fails."""
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, "-m", "TextDiffSegLib.cli", *map(str, arguments)], check=True, env=environment)


if __name__ == "__main__":
    main()
