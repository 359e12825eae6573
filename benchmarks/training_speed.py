"""Benchmark: how fast `textdiffseg train` continues the bundled model on BTCV, per batch size and number of
worker processes drawing the batches (`--workers`); prints and writes ms per step and samples per second.

    python benchmarks/training_speed.py [--device cpu|cuda] [--settings 16x0,16x1] [--steps 60]
        [--output benchmarks/results/training_speed-cpu.json]
    torchrun --standalone --nproc_per_node N benchmarks/training_speed.py --device cuda ...

Under torchrun the batch size is each process's, the samples per second those of all N processes together,
and the figures go to ``training_speed-DEVICE-Nprocesses.json``.

Each setting (BATCHxWORKERS) is a short run of the bundled model's recipe (the settings in its
training.json: 160 x 160 crops) into a temporary folder; the figure is the median of its steps after the first third (start-up left out).
"""

import argparse
import csv
import json
import statistics
import tempfile
from pathlib import Path

import torch

from TextDiffSegLib.distributed import process_count, rank
from TextDiffSegLib.machine import device_name
from TextDiffSegLib.model_card import TRAINING_RECORD
from TextDiffSegLib.registry import resolve_model
from TextDiffSegLib.training import TrainSettings, train


DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "btcv" / "dataset.json"
MODEL = "universal-btcv"


def setting(text: str) -> tuple[int, int]:
    batch_size, workers = text.split("x")
    return int(batch_size), int(workers)


def measure(batch_size: int, workers: int, args: argparse.Namespace) -> dict | None:
    """The figures of one setting; None in all but the main process, which alone logs the steps."""
    recipe = json.loads((resolve_model(MODEL) / TRAINING_RECORD).read_text())["settings"]
    with tempfile.TemporaryDirectory() as output:
        train(TrainSettings(**{
            **recipe, "data": str(DATA), "output": output, "init_from": MODEL, "diffusion_steps": args.steps,
            "checkpoint_every": args.steps, "device": args.device, "batch_size": batch_size, "workers": workers,
            "cache_dir": args.cache_dir}))
        if rank() != 0:
            return None
        with open(Path(output) / "loss_log.csv") as handle:
            seconds = [float(row["seconds"]) for row in csv.DictReader(handle)][args.steps // 3:]
    step = statistics.median(seconds)
    return {"batch_size": batch_size, "workers": workers, "processes": process_count(),
            "ms_per_step": round(step * 1000, 1), "samples_per_second": round(batch_size * process_count() / step, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--settings", default="16x0,16x1", help="BATCHxWORKERS, comma-separated")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--cache-dir", default=str(Path(__file__).resolve().parents[1] / ".cache" / "btcv"))
    parser.add_argument("--output")
    args = parser.parse_args()

    figures = {"device": device_name(args.device), "threads": torch.get_num_threads(), "steps": args.steps, "results": []}
    for batch_size, workers in map(setting, args.settings.split(",")):
        result = measure(batch_size, workers, args)
        if result is not None:
            figures["results"].append(result)
            print(result, flush=True)
    if rank() != 0:
        return
    processes = f"-{process_count()}processes" if process_count() > 1 else ""
    output = Path(args.output or Path(__file__).parent / "results" / f"training_speed-{args.device}{processes}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
