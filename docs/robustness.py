"""Bad and unusual input, tried as a new user would: every case below is run, and docs/robustness.md is written
with the exit status, the message each gets (stderr, or the JSON error under --progress json), and whether every
file that was there before is still there, byte for byte.

    python docs/robustness.py [--model universal-btcv]

Each case runs in a fresh folder holding copies of real scans from ../shared/data (TotalSegmentator's small CT,
its DICOM series, a CHAOS T2 MR); runs that sample use --steps 1 --proposals 1. About five minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data"

from TextDiffSegLib import cli  # noqa: E402
from TextDiffSegLib.errors import TextDiffSegError  # noqa: E402
from TextDiffSegLib.registry import resolve_model  # noqa: E402
from TextDiffSegLib.segmenter import Segmenter  # noqa: E402

FAST = ["--steps", "1", "--proposals", "1", "--progress", "none"]


# --- inputs made from real scans --------------------------------------------------------------


def ct(work: Path) -> Path:
    return Path(shutil.copy(DATA / "totalseg_examples/example_ct_sm.nii.gz", work / "ct.nii.gz"))


def mr(work: Path) -> Path:
    return Path(shutil.copy(DATA / "chaos_t2/imagesTr/chaos_t2_01.nii.gz", work / "mr.nii.gz"))


def dicom(work: Path) -> Path:
    return Path(shutil.copytree(DATA / "totalseg_examples/example_ct_dicom", work / "series"))


def written(work: Path, name: str, array: np.ndarray, like: Path | None = None) -> Path:
    image = sitk.GetImageFromArray(array, isVector=array.ndim == 4)
    if like is not None:
        image.CopyInformation(sitk.ReadImage(str(like)))
    sitk.WriteImage(image, str(work / name))
    return work / name


def text(work: Path, name: str, content: str | bytes) -> Path:
    (work / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return work / name


def with_voxels(work: Path, name: str, change: Callable[[np.ndarray], None]) -> Path:
    source = ct(work)
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(source))).astype(np.float32)
    change(array)
    return written(work, name, array, source)


def with_pixdim(work: Path, value: float) -> Path:
    path = work / "ct.nii"
    sitk.WriteImage(sitk.ReadImage(str(ct(work))), str(path))
    data = bytearray(path.read_bytes())
    data[80:84] = struct.pack("<f", value)
    path.write_bytes(bytes(data))
    return path


def truncated(work: Path) -> Path:
    path = work / "ct.nii"
    sitk.WriteImage(sitk.ReadImage(str(ct(work))), str(path))
    path.write_bytes(path.read_bytes()[:200_000])
    return path


def model_copy(work: Path, model: Path, change: Callable[[Path], None]) -> Path:
    copy = Path(shutil.copytree(model, work / "model"))
    change(copy)
    return copy


def truncate_weights(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def overwrite_weights(folder: Path) -> None:
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    start = 8 + struct.unpack("<Q", data[:8])[0] + 1000
    data[start:start + 4096] = b"\xff" * 4096
    weights.write_bytes(bytes(data))


def edit_config(**values) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **values}))
    return change


def dataset(work: Path, label: str | None = None) -> Path:
    """Two CHAOS cases (a training run needs one to train on and one to validate); ``label`` replaces the first's."""
    chaos = DATA / "chaos_t2"
    entries = [{"image": str(chaos / f"imagesTr/{case}.nii.gz"), "label": str(chaos / f"labelsTr/{case}.nii.gz")}
               for case in ("chaos_t2_01", "chaos_t2_02")]
    entries[0]["label"] = label or entries[0]["label"]
    description = {**json.loads((chaos / "dataset.json").read_text()), "training": entries}
    return text(work, "dataset.json", json.dumps(description))


def linked(work: Path, target: Path) -> Path:
    (work / "link.nii.gz").symlink_to(target)
    return work / "link.nii.gz"


# --- the cases: (what is wrong, what to run); a list is a command line, a callable an API call ----------


def cases(model: str) -> list[tuple[str, str, Callable[[Path], object]]]:
    folder = resolve_model(model)

    def segment(make_input=ct, *extra, output="out.seg.nrrd", prompt="liver"):
        return lambda w: ["segment", "-i", make_input(w), "-p", prompt, "-o", w / output if isinstance(output, str)
                          else output(w), "--model", model, *FAST, *[e(w) if callable(e) else e for e in extra]]

    def api(call: Callable[[Path, Segmenter], object]):
        return lambda w: (lambda: call(w, Segmenter.from_pretrained(model)))

    return [
        ("input", "input file does not exist", segment(lambda w: w / "absent.nii.gz")),
        ("input", "bytes that are no image, named .nii.gz", segment(lambda w: text(w, "garbage.nii.gz", b"no image" * 50))),
        ("input", "NIfTI cut short (half its voxels)", segment(truncated)),
        ("input", "a text file", segment(lambda w: text(w, "notes.txt", "hello"))),
        ("input", "one DICOM file instead of its folder", segment(lambda w: next(dicom(w).iterdir()))),
        ("input", "a 2D image", segment(lambda w: written(w, "slice.nii.gz", np.zeros((40, 44), np.int16)))),
        ("input", "a 4D image", segment(lambda w: _four_d(w))),
        ("input", "an RGB image", segment(lambda w: written(w, "rgb.nrrd", np.zeros((4, 20, 22, 3), np.uint8)))),
        ("input", "an empty folder", segment(lambda w: Path(os.makedirs(w / "empty") or w / "empty"))),
        ("input", "a folder of text files", segment(lambda w: text(Path(os.makedirs(w / "docs") or w / "docs"), "a.txt", "x").parent)),
        ("input", "float scan with 105 NaN and infinite voxels (MHA)",
         segment(lambda w: with_voxels(w, "nan.mha", lambda a: (a[0, :10, :10].fill(np.nan), a[-1, 0, :5].fill(np.inf))))),
        ("input", "every voxel NaN", segment(lambda w: with_voxels(w, "all-nan.mha", lambda a: a.fill(np.nan)))),
        ("input", "NIfTI header with voxel spacing (pixdim) 0", segment(lambda w: with_pixdim(w, 0.0))),
        ("input", "NIfTI header with a negative voxel spacing (ITK: a mirrored axis)", segment(lambda w: with_pixdim(w, -3.0))),
        ("input", "an MR given to the CT model", segment(mr)),
        ("input", "a CT given to the MR adapter", segment(ct, "--model", "universal-chaos-t2-lora")),
        ("input", "a label map given as the scan",
         segment(lambda w: Path(shutil.copy(DATA / "totalseg_examples/example_seg.nii.gz", w / "seg.nii.gz")))),
        ("input", "a DICOM series folder (works)", segment(dicom)),
        ("prompt", "empty prompt", segment(ct, prompt="")),
        ("prompt", "only separators", segment(ct, prompt=" ; ")),
        ("prompt", "misspelt: gallblader", segment(ct, prompt="gallblader")),
        ("prompt", "a structure the adapter does not know", segment(ct, "--model", "universal-chaos-t2-lora", prompt="aorta")),
        ("prompt", "the same structure twice", segment(ct, prompt="liver; hepar")),
        ("prompt", "a sentence (works)", segment(ct, prompt="Segment the left kidney in this CT")),
        ("model", "model folder does not exist", segment(ct, "--model", lambda w: w / "no-model")),
        ("model", "unknown model name", segment(ct, "--model", "no-such-model")),
        ("model", "a folder that is no model", segment(ct, "--model", lambda w: w)),
        ("model", "weights cut in half", segment(ct, "--model", lambda w: model_copy(w, folder, truncate_weights))),
        ("model", "weights with 4 kB overwritten (same size)", segment(ct, "--model", lambda w: model_copy(w, folder, overwrite_weights))),
        ("model", "weights missing", segment(ct, "--model", lambda w: model_copy(w, folder, lambda f: (f / "model.safetensors").unlink()))),
        ("model", "config.json not JSON", segment(ct, "--model", lambda w: model_copy(w, folder, lambda f: text(f, "config.json", "{ no")))),
        ("model", "config not matching the weights",
         segment(ct, "--model", lambda w: model_copy(w, folder, edit_config(unet_channels=[16, 16, 32])))),
        ("model", "config of an unknown family", segment(ct, "--model", lambda w: model_copy(w, folder, edit_config(family="x")))),
        ("model", "--device tpu", segment(ct, "--device", "tpu")),
        ("model", "--device cuda without a GPU", segment(ct, "--device", "cuda")),
        ("output", "-o is the input, --overwrite", segment(ct, "--overwrite", output=lambda w: w / "ct.nii.gz")),
        ("output", "-o is the input through ..", segment(ct, "--overwrite", output=lambda w: w / ".." / w.name / "ct.nii.gz")),
        ("output", "-o is a link to the input", segment(ct, "--overwrite", output=lambda w: linked(w, w / "ct.nii.gz"))),
        ("output", "--uncertainty is the input", segment(ct, "--uncertainty", lambda w: w / "ct.nii.gz", "--overwrite")),
        ("output", "--uncertainty is -o", segment(ct, "--uncertainty", lambda w: w / "out.nii.gz", output="out.nii.gz")),
        ("output", "--uncertainty is one of the proposals' paths",
         segment(ct, "--proposals-dir", lambda w: w, "--uncertainty", lambda w: w / "liver_proposal1.nii.gz", output="o.nii.gz")),
        ("output", "-o inside the input DICOM folder", lambda w: ["segment", "-i", dicom(w), "-p", "liver", "-o",
                                                                  w / "series" / "out.seg.nrrd", "--model", model, *FAST]),
        ("output", "-o exists, no --overwrite", segment(ct, output=lambda w: text(w, "out.seg.nrrd", "keep"))),
        ("output", "-o is a folder", segment(ct, output=lambda w: Path(os.makedirs(w / "o.seg.nrrd") or w / "o.seg.nrrd"))),
        ("output", "-o in a folder that does not exist", segment(ct, output=lambda w: w / "absent" / "o.seg.nrrd")),
        ("output", "-o under a regular file", segment(ct, output=lambda w: text(w, "f.txt", "keep") / "o.seg.nrrd")),
        ("output", "-o with an unsupported extension", segment(ct, output="o.png")),
        ("output", "-o in /proc", segment(ct, output=lambda w: Path("/proc/o.seg.nrrd"))),
        ("output", "--uncertainty .png", segment(ct, "--uncertainty", lambda w: w / "u.png")),
        ("output", "--proposals-dir is a file", segment(ct, "--proposals-dir", lambda w: text(w, "p", "keep"))),
        ("output", "--proposals-dir does not exist (created)", segment(ct, "--proposals-dir", lambda w: w / "new" / "p")),
        ("output", ".nii.gz with two prompts (names in a sidecar)", segment(ct, "-p", "spleen", output="organs.nii.gz")),
        ("settings", "--proposals 0", segment(ct, "--proposals", "0")),
        ("settings", "--steps -1", segment(ct, "--steps", "-1")),
        ("settings", "--seed -1", segment(ct, "--seed", "-1")),
        ("settings", "--proposals two", segment(ct, "--proposals", "two")),
        ("settings", "--fusion best", segment(ct, "--fusion", "best")),
        ("evaluate", "dataset.json does not exist", lambda w: ["evaluate", "--data", w / "no.json", "--report", w / "r.json"]),
        ("evaluate", "dataset.json not JSON", lambda w: ["evaluate", "--data", text(w, "d.json", "{"), "--report", w / "r.json"]),
        ("evaluate", "a case's label map missing",
         lambda w: ["evaluate", "--data", dataset(w, str(w / "gone.nii.gz")), "--model", model, "--report", w / "r.json"]),
        ("evaluate", "--report is the dataset.json",
         lambda w: ["evaluate", "--data", dataset(w), "--model", model, "--report", w / "dataset.json", "--overwrite"]),
        ("evaluate", "an unknown case id",
         lambda w: ["evaluate", "--data", dataset(w), "--cases", "chaos_t2_99", "--model", model, "--report", w / "r.json"]),
        ("evaluate", "a structure the dataset does not label",
         lambda w: ["evaluate", "--data", dataset(w), "--structures", "aorta", "--model", model, "--report", w / "r.json"]),
        ("train", "--steps 0", lambda w: ["train", "--data", dataset(w), "--output", w / "run", "--steps", "0"]),
        ("train", "--steps 0 --autoencoder-steps 0",
         lambda w: ["train", "--data", dataset(w), "--output", w / "run", "--steps", "0", "--autoencoder-steps", "0"]),
        ("train", "a new model with --autoencoder-steps 0",
         lambda w: ["train", "--data", dataset(w), "--output", w / "run", "--steps", "5", "--autoencoder-steps", "0"]),
        ("train", "--batch-size 0", lambda w: ["train", "--data", dataset(w), "--output", w / "run", "--batch-size", "0"]),
        ("train", "--init-from the model this run writes (OUTPUT/model)",
         lambda w: ["train", "--data", dataset(w), "--output", w / "run", "--steps", "1",
                    "--init-from", shutil.copytree(resolve_model(model), w / "run" / "model")]),
        ("train", "a 3D family given a 2D crop",
         lambda w: ["train", "--data", dataset(w), "--output", w / "run", "--family", "textdiffseg3d", "--crop", "64"]),
        ("train", "--lora-rank without --init-from", lambda w: ["train", "--data", dataset(w), "--output", w / "run", "--lora-rank", "8"]),
        ("train", "an unknown family", lambda w: ["train", "--data", dataset(w), "--output", w / "run", "--family", "x"]),
        ("train", "an unknown model option",
         lambda w: ["train", "--data", dataset(w), "--output", w / "run", "--model-option", "wings=2"]),
        ("API", "Segmenter.propose(numpy array)", api(lambda w, s: s.propose(np.zeros((4, 4, 4)), "liver"))),
        ("API", "Segmenter.propose(a list)", api(lambda w, s: s.propose([1, 2, 3], "liver"))),
        ("API", "Segmenter.propose(path string) (works)", api(lambda w, s: s.propose(str(ct(w)), "liver", 1, steps=1))),
        ("API", "Segmenter.propose(SimpleITK image) (works)",
         api(lambda w, s: s.propose(sitk.ReadImage(str(ct(w))), "liver", 1, steps=1))),
        ("API", "Segmenter.propose(steps=0)", api(lambda w, s: s.propose(ct(w), "liver", steps=0))),
        ("API", "Segmenter.propose(seed='3')", api(lambda w, s: s.propose(ct(w), "liver", seed="3"))),
        ("API", "Segmenter.propose(num_proposals=2.0)", api(lambda w, s: s.propose(ct(w), "liver", num_proposals=2.0))),
        ("API", "Segmenter.propose(prompts as one string to propose_many)",
         api(lambda w, s: s.propose_many(ct(w), "liver"))),
    ]


def _four_d(work: Path) -> Path:
    image = sitk.JoinSeries([sitk.GetImageFromArray(np.zeros((6, 20, 22), np.int16))] * 3)
    sitk.WriteImage(image, str(work / "series.nii.gz"))
    return work / "series.nii.gz"


# --- running and recording --------------------------------------------------------------------


def snapshot(folder: Path) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file() and not p.is_symlink()}


def run_case(make: Callable[[Path], object], work: Path) -> tuple[str, str, bool]:
    """(exit status or API outcome, message, every file there before is unchanged)."""
    what = make(work)
    before = snapshot(work)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings(record=True) as caught:
        if callable(what):
            warnings.simplefilter("always")
            try:
                what()
                status, message = "returns", "; ".join(str(w.message) for w in caught if "Scan" in w.category.__name__)
            except TextDiffSegError as error:
                status, message = f"raises {type(error).__name__}", str(error)
        else:
            try:
                status = str(cli.main([str(a) for a in what]))
            except SystemExit as exit_:  # argparse
                status = str(exit_.code)
            lines = [line for line in err.getvalue().splitlines() if line.startswith(("textdiffseg", "warning"))]
            message = " / ".join(lines) or out.getvalue().strip().splitlines()[-1]
    kept = all(p.is_file() and hashlib.sha256(p.read_bytes()).hexdigest() == h for p, h in before.items())
    return status, message.replace(str(work), "WORK").replace(str(REPO), "REPO"), kept


def interrupt_case(model: str, work: Path) -> tuple[str, str, bool]:
    """Ctrl-C while sampling: a real SIGINT to a real process once it reports a sampling step."""
    command = [sys.executable, "-m", "TextDiffSegLib.cli", "segment", "-i", str(ct(work)), "-p", "liver", "-o",
               str(work / "out.seg.nrrd"), "--model", model, "--progress", "json", "--proposals-dir", str(work / "p")]
    before = snapshot(work)
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:
        if json.loads(line).get("stage") == "sample":
            process.send_signal(signal.SIGINT)
            break
    rest, _ = process.communicate()
    message = json.loads(rest.strip().splitlines()[-1])["message"]
    kept = snapshot(work) == before and sorted(p.name for p in work.iterdir()) == ["ct.nii.gz"]
    return str(process.returncode), message, kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="universal-btcv")
    parser.add_argument("--output", default=str(REPO / "docs" / "robustness.md"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as temp:
        all_cases = cases(args.model)
        for number, (group, description, make) in enumerate(all_cases, start=1):
            work = Path(temp) / f"case{number}"
            work.mkdir()
            rows.append((group, description, *run_case(make, work)))
            print(f"{number:3d}/{len(all_cases) + 1} {rows[-1][2]:>20s}  {description}", flush=True)
        work = Path(temp) / "interrupt"
        work.mkdir()
        rows.append(("interrupt", "Ctrl-C (SIGINT) while sampling, --progress json", *interrupt_case(args.model, work)))
    lines = [
        "# Bad input: what each gets",
        "",
        f"Written by `python docs/robustness.py --model {args.model}` (every case run, nothing typed by hand). Exit",
        "status 2 is a user's error (one line on stderr, or one JSON object under `--progress json`), 130 an",
        "interrupt, 1 an unexpected failure (one line naming the problem and a file holding the full trace), 0",
        "success; warnings are lines that start `textdiffseg: warning:`. *Kept* says that every file in the",
        "case's folder before the run (the scan, the model, the dataset, files named as outputs) is there after it,",
        "byte for byte. WORK is the case's folder.",
        "",
        "| # | kind | input | exit | message | kept |",
        "|---|---|---|---|---|---|",
    ]
    for number, (group, description, status, message, kept) in enumerate(rows, start=1):
        message = message.replace("|", "\\|")
        lines.append(f"| {number} | {group} | {description} | {status} | {message} | {'yes' if kept else '**no**'} |")
    Path(args.output).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.output}: {len(rows)} cases, {sum(not r[4] for r in rows)} where a file was lost")


if __name__ == "__main__":
    main()
