"""Benchmark: segment one organ with 5 proposals on a BTCV case; print seconds and peak memory.

    python benchmarks/segment_organ.py [--case btcv_0005] [--prompt liver] [--model NAME|DIR]
        [--proposals 5] [--device cpu] [--output benchmarks/results/segment_organ.json]

Model loading and reading the scan are timed apart from segmentation (what a warm Slicer worker
pays per organ). Target on a 2-core CPU: at most 60 s per organ with 5 proposals.
"""

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from TextDiffSegLib.machine import device_name
from TextDiffSegLib.segmenter import Segmenter
from TextDiffSegLib.volume import read_volume


DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "btcv"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default="btcv_0005")
    parser.add_argument("--prompt", default="liver")
    parser.add_argument("--model")
    parser.add_argument("--proposals", type=int, default=5)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "segment_organ.json"))
    args = parser.parse_args()

    started = time.perf_counter()
    segmenter = Segmenter.from_pretrained(args.model, device=args.device)
    volume = read_volume(DATA / "imagesTr" / f"{args.case}.nii.gz")
    load_seconds = time.perf_counter() - started
    segmenter.propose(volume, args.prompt, num_proposals=1, steps=1)  # warm-up: text encoder, allocator
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = segmenter.propose(volume, args.prompt, num_proposals=args.proposals, steps=args.steps)
    seconds = time.perf_counter() - started
    figures = {
        "case": args.case, "prompt": args.prompt, "model": segmenter.name, "proposals": args.proposals,
        "steps": args.steps or segmenter.config.default_steps, "device": args.device,
        "cpu": device_name("cpu"), "threads": torch.get_num_threads(),
        "volume_shape": list(volume.array.shape), "load_seconds": round(load_seconds, 2),
        "segment_seconds": round(seconds, 2), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20) if args.device.startswith("cuda") else None,
        "fused_voxels": int(result.fused.sum()),
    }
    for key, value in figures.items():
        print(f"{key:16s} {value}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
