"""Benchmark: segment one organ with 5 proposals on a BTCV case; print seconds and peak memory.

    python benchmarks/segment_organ.py [--case btcv_0005] [--prompt liver] [--model NAME|DIR|A,B,...]
        [--proposals 5] [--device cpu] [--spacing X,Y,Z] [--repeats 3] [--output benchmarks/results/segment_organ.json]

Model loading and reading the scan are timed apart from segmentation (what a warm Slicer worker
pays per organ). Segmentation runs ``--repeats`` times, the same seeds each time; the median is
reported (a shared CPU's runs can differ by a tenth). Freed memory is kept for the next tensors, as
the ``textdiffseg`` command and the Slicer worker keep it (``allocator``); ``--return-freed-memory``
measures glibc's default instead (``benchmarks/freed_memory.py`` compares the two). Target on a
2-core CPU: at most 60 s per organ with 5 proposals.

``--prompt "liver; spleen"`` segments several organs in one run; ``--spacing 0.8,0.8,1`` first
resamples the scan to that spacing, as a thin-slice CT of the same patient would come (many more
voxels for every output on the input's grid, the same model grid). ``--model a,b`` times an ensemble:
each model's proposals, then their fusion (its peak memory holds every model); then each of its models alone,
once, in the same run (``model_seconds``), so that the ensemble's time can be set against the sum of its
models' on the same CPU at the same hour.
"""

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import SimpleITK as sitk
import torch

from TextDiffSegLib.allocator import keep_freed_memory
from TextDiffSegLib.ensemble import Ensemble, load_models
from TextDiffSegLib.machine import device_name
from TextDiffSegLib.preprocessing import model_grid
from TextDiffSegLib.segmenter import Segmenter
from TextDiffSegLib.terminology import split_prompts
from TextDiffSegLib.volume import Volume, from_sitk, read_volume, to_sitk


DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "btcv"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default="btcv_0005")
    parser.add_argument("--prompt", default="liver")
    parser.add_argument("--model")
    parser.add_argument("--proposals", type=int, default=5)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--spacing", type=lambda text: tuple(float(v) for v in text.split(",")),
                        help="resample the scan to this spacing in mm first, e.g. 0.8,0.8,1")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--return-freed-memory", action="store_true",
                        help="leave glibc's malloc returning large freed tensors to the system (its default)")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "segment_organ.json"))
    args = parser.parse_args()

    kept = not args.return_freed_memory and keep_freed_memory()
    started = time.perf_counter()
    segmenter = load_models(args.model, device=args.device)
    volume = read_volume(DATA / "imagesTr" / f"{args.case}.nii.gz")
    load_seconds = time.perf_counter() - started
    if args.spacing:
        volume = resampled(volume, args.spacing)
    prompts = split_prompts(args.prompt)
    segmenter.propose(volume, prompts[0], num_proposals=1, steps=1)  # warm-up: text encoder, allocator
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(args.repeats):
        results = None  # the previous run's outputs are not held while the next one runs
        seconds_taken, results = timed(segmenter, volume, prompts, args.proposals, args.steps)
        seconds.append(seconds_taken)
    figures = {
        "case": args.case, "prompt": args.prompt, "model": segmenter.name, "proposals": args.proposals,
        "steps": args.steps or (segmenter.config.default_steps if isinstance(segmenter, Segmenter)
                                  else "each model's default"),
        "device": args.device, "kept_freed_memory": kept,
        "cpu": device_name("cpu"), "threads": torch.get_num_threads(),
        "volume_shape": list(volume.array.shape), "spacing": list(volume.spacing), "load_seconds": round(load_seconds, 2),
        "segment_seconds": statistics.median(seconds), "segment_seconds_each": seconds,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20) if args.device.startswith("cuda") else None,
        "fused_voxels": {result.structure.name: int(result.fused.sum()) for result in results},
    }
    if isinstance(segmenter, Ensemble):
        results = None
        figures["model_seconds"] = {member.name: timed(member, volume, prompts, args.proposals, args.steps)[0]
                                    for member in segmenter.segmenters}
    for key, value in figures.items():
        print(f"{key:16s} {value}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(figures, indent=2) + "\n")


def timed(segmenter, volume: Volume, prompts: list[str], proposals: int, steps: int | None) -> tuple[float, list]:
    """Seconds that ``segmenter.propose_many`` took, and its results."""
    started = time.perf_counter()
    results = segmenter.propose_many(volume, prompts, num_proposals=proposals, steps=steps)
    return round(time.perf_counter() - started, 2), results


def resampled(volume: Volume, spacing: tuple[float, float, float]) -> Volume:
    """``volume`` resampled linearly to ``spacing`` over its whole extent (axis-aligned), in its own pixel
    type, as a scanner would write a thin-slice series (``preprocessing.to_model_grid`` gives float32, the
    model's input, which would double the benchmark's input in memory)."""
    image = to_sitk(volume)
    return from_sitk(sitk.Resample(image, model_grid(volume, spacing), sitk.Transform(), sitk.sitkLinear,
                                   float(volume.array.min()), image.GetPixelID()))


if __name__ == "__main__":
    main()
