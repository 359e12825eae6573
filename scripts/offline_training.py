"""Train on a machine that has a GPU but no network, no SimpleITK and no text encoder weights.

Such a machine (a lent GPU box with PyTorch and little else) cannot read the scans or encode the
prompts, so a "kit" made here carries both, already computed: every case of the dataset resampled
onto the model grid (as ``datasets.prepare_case`` caches it) and the embeddings of the structures'
prompts (with every verb of ``text_encoders.TASKS``). There, ``textdiffseg train`` runs unchanged on the
kit, with any of its options:

    python scripts/offline_training.py pack --data ../shared/data/btcv/dataset.json --kit .kit
    # copy the repository and .kit over (plus wheels of monai and diffusers where missing), then there:
    python scripts/offline_training.py train --kit .kit --output runs/x --family textdiffseg3d --device cuda ...

``pack`` takes ``--spacing`` (the model grid, x,y,z mm; default 2.5,2.5,5, every bundled family's) and
``--text-encoder`` (default minilm). ``train`` refuses a model whose grid or text encoder differs from the
kit's, and a prompt the kit did not encode. ``--minutes M`` sizes ``--steps`` to the time: it first times
``--probe-steps`` steps of the same run (thrown away), then trains as many steps as fit in M minutes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

KIT_CASES = "cases"
KIT_TEXT = "text.pt"
KIT_INFO = "kit.json"
PACE_MARGIN = 0.85  # of the time left, what --minutes plans steps for: the rest for loading, checkpoints, saving


def pack(data: Path, kit: Path, spacing: tuple[float, float, float], text_encoder: str) -> None:
    from TextDiffSegLib.datasets import prepare_case, read_dataset
    from TextDiffSegLib.terminology import get_structure
    from TextDiffSegLib.text_encoders import TASKS, conditioning_text, load_text_encoder

    dataset = read_dataset(data)
    (kit / KIT_CASES).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as cache:
        for number, case in enumerate(dataset.cases, 1):
            prepared = prepare_case(case, dataset, spacing, Path(cache))
            np.savez_compressed(kit / KIT_CASES / f"{case.id}.npz", image=prepared.image, label=prepared.label)
            print(f"{number}/{len(dataset.cases)} {case.id} {prepared.image.shape}", flush=True)
    # Every verb's prompts: ProGiDiff trains on the synonyms too.
    texts = [conditioning_text(get_structure(name), dataset.modality, task)
             for task in TASKS for name in dataset.labels.values()]
    encoded = load_text_encoder(text_encoder).encode(texts)
    torch.save({text: (encoded.tokens[i, :int(encoded.mask[i].sum())], encoded.pooled[i]) for i, text in enumerate(texts)},
               kit / KIT_TEXT)
    shutil.copyfile(data, kit / "dataset.json")
    (kit / KIT_INFO).write_text(json.dumps({"spacing": list(spacing), "text_encoder": text_encoder,
                                            "source": str(Path(data).resolve())}, indent=2) + "\n")


class KitTextEncoder:
    """The kit's prompt embeddings, behind the text encoder's ``encode``."""

    def __init__(self, kit: Path, device):
        self.embeddings = torch.load(kit / KIT_TEXT, weights_only=True)
        self.device = torch.device(device)

    def encode(self, texts: list[str]):
        from TextDiffSegLib.text_encoders import TextEmbedding

        missing = [text for text in texts if text not in self.embeddings]
        if missing:
            raise SystemExit(f"the kit has no embedding of {missing}: pack it again for these structures")
        tokens = torch.nn.utils.rnn.pad_sequence([self.embeddings[text][0] for text in texts], batch_first=True)
        lengths = torch.tensor([len(self.embeddings[text][0]) for text in texts])
        mask = (torch.arange(tokens.shape[1])[None] < lengths[:, None]).long()
        pooled = torch.stack([self.embeddings[text][1] for text in texts])
        return TextEmbedding(tokens.to(self.device), mask.to(self.device), pooled.to(self.device))


def use_kit(kit: Path) -> None:
    """Point the trainer at the kit: cases and prompt embeddings from it, SimpleITK not needed."""
    try:
        import SimpleITK  # noqa: F401
    except ImportError:  # nothing the trainer runs on a kit reads or resamples a scan
        sys.modules["SimpleITK"] = types.ModuleType("SimpleITK")
    from TextDiffSegLib import training
    from TextDiffSegLib.datasets import PreparedCase

    info = json.loads((kit / KIT_INFO).read_text())

    def prepare_case(case, dataset, spacing, cache_dir):
        if list(spacing) != info["spacing"]:
            raise SystemExit(f"the kit's cases are on a {info['spacing']} mm grid, the model's is {list(spacing)}")
        stored = np.load(kit / KIT_CASES / f"{case.id}.npz")
        return PreparedCase(case.id, stored["image"], stored["label"],
                            tuple(dataset.labels[value] for value in sorted(dataset.labels)))

    def load_text_encoder(name, device="cpu"):
        if name != info["text_encoder"]:
            raise SystemExit(f"the kit's prompts were encoded by {info['text_encoder']}, the model uses {name}")
        return KitTextEncoder(kit, device)

    training.prepare_case, training.load_text_encoder = prepare_case, load_text_encoder


def without(arguments: list[str], name: str) -> list[str]:
    if name not in arguments:
        return arguments
    at = arguments.index(name)
    return arguments[:at] + arguments[at + 2:]


def train(kit: Path, arguments: list[str], minutes: float | None, probe_steps: int, workers: int) -> int:
    use_kit(kit)
    torch.backends.cudnn.benchmark = True  # every step has the same shapes: let cuDNN pick its fastest 3D convolutions
    from TextDiffSegLib import cli

    arguments = ["train", "--data", str(kit / "dataset.json"), "--workers", str(workers), *arguments]
    if minutes:
        started = time.perf_counter()
        # Worker processes fill a queue of batches ahead (4 each) before the first step: a probe shorter than
        # that times the steps without the wait for batches, which decides the pace once the queue is empty.
        probe_steps = max(probe_steps, 8 * workers)
        with tempfile.TemporaryDirectory() as probe:
            probe_arguments = without(without(arguments, "--output"), "--steps")
            status = cli.main([*probe_arguments, "--output", probe, "--steps", str(probe_steps)])
            if status:
                return status
            log = np.genfromtxt(Path(probe) / "loss_log.csv", delimiter=",", names=True, dtype=None, encoding=None)
        seconds = float(np.mean(log["seconds"][probe_steps // 2:]))
        left = minutes * 60 - (time.perf_counter() - started)
        steps = max(1, int(PACE_MARGIN * left / seconds))
        print(f"offline_training: {seconds:.3f} s a step; {steps} steps fit in the {left / 60:.1f} minutes left", flush=True)
        arguments = [*without(arguments, "--steps"), "--steps", str(steps)]
    return cli.main(arguments)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    packing = commands.add_parser("pack", help="make a kit from a dataset (here, where the scans can be read)")
    packing.add_argument("--data", required=True, type=Path)
    packing.add_argument("--kit", required=True, type=Path)
    packing.add_argument("--spacing", default="2.5,2.5,5", type=lambda text: tuple(float(v) for v in text.split(",")))
    packing.add_argument("--text-encoder", default="minilm")
    training = commands.add_parser("train", help="textdiffseg train on a kit (its other options follow)")
    training.add_argument("--kit", required=True, type=Path)
    training.add_argument("--minutes", type=float, help="train as many steps as fit in this time")
    training.add_argument("--probe-steps", type=int, default=40, help="steps timed to size --steps to --minutes")
    training.add_argument("--workers", type=int, default=0, help="textdiffseg train's --workers (the probe is sized by it)")
    args, rest = parser.parse_known_args()
    if args.command == "pack":
        if rest:
            parser.error(f"unknown options {' '.join(rest)}")
        pack(args.data, args.kit, args.spacing, args.text_encoder)
        return 0
    return train(args.kit, rest, args.minutes, args.probe_steps, args.workers)


if __name__ == "__main__":
    sys.exit(main())
