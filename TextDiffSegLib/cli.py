"""The ``textdiffseg`` command: segment, evaluate, train, models. Only argument parsing lives here."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import shlex
import signal
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

from .allocator import keep_freed_memory
from .errors import OutputError, TextDiffSegError, TextDiffSegWarning
from .fusion import FUSION_METHODS

EXIT_USER_ERROR = 2
EXIT_BUG = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a command stopped with Ctrl-C
COHORT_FORMATS = ("seg.nrrd", "nii.gz", "nii", "nrrd", "dcm")


def main(argv: list[str] | None = None) -> int:
    """Run one command. A user's error, an interrupt and an unexpected failure each end with one line (a JSON
    object under ``--progress json``) and exit status 2, 130 and 1; a ``TextDiffSegWarning`` is one line too."""
    parser = _parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    say = _Say(getattr(args, "progress", None) == "json")
    keep_freed_memory()
    with warnings.catch_warnings():
        warnings.simplefilter("always", TextDiffSegWarning)
        warnings.showwarning = say.warning
        try:
            return args.run(args) or 0
        except TextDiffSegError as error:
            say.error(str(error))
            return EXIT_USER_ERROR
        except KeyboardInterrupt:
            say.error(f"interrupted; {getattr(args, 'on_interrupt', 'nothing was written')}")
            return EXIT_INTERRUPTED
        except Exception as error:  # noqa: BLE001 - the last resort: one line and the trace in a file
            say.error(_unexpected(error))
            return EXIT_BUG


class _Say:
    """One line per error or warning: on stderr, or as a JSON object on stdout (``--progress json``)."""

    def __init__(self, as_json: bool):
        self.as_json = as_json
        self._showwarning = warnings.showwarning

    def error(self, message: str) -> None:
        self._line("error", message)

    def warning(self, message, category, *rest) -> None:
        if issubclass(category, TextDiffSegWarning):
            self._line("warning", str(message))
        else:
            self._showwarning(message, category, *rest)

    def _line(self, kind: str, message: str) -> None:
        if self.as_json:
            print(json.dumps({"type": kind, "message": message}), flush=True)
        else:
            print(f"textdiffseg: {kind}: {message}", file=sys.stderr, flush=True)


def _unexpected(error: Exception) -> str:
    """One line naming an unexpected failure (a bug) and the file in the temporary folder that holds its trace."""
    return (f"unexpected {type(error).__name__}: {' '.join(str(error).split())[:300]}. This is a bug in "
            f"TextDiffSeg; the full trace is in {_write_trace(error)}: please report it with that file")


def _write_trace(error: Exception) -> str:
    """The error's traceback, written to a new file in the temporary folder; the file's path."""
    handle, path = tempfile.mkstemp(prefix=f"textdiffseg-error-{time.strftime('%Y%m%d-%H%M%S')}-", suffix=".txt")
    with open(handle, "w") as file:
        file.write("".join(traceback.format_exception(type(error), error, error.__traceback__)))
    return path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="textdiffseg", description="Text-prompted diffusion segmentation of CT and MR.")
    commands = parser.add_subparsers(dest="command", required=True)

    segment = commands.add_parser("segment", help="segment structures named by prompts in a scan, or in a cohort")
    segment.add_argument("-i", "--input", required=True,
                         help="NIfTI, NRRD or MHA file, or a DICOM series folder; for a cohort (with -o a folder), a "
                              "folder of such files and DICOM series folders, or a LIST.txt of one scan path per line")
    segment.add_argument("-p", "--prompt", required=True, action="append", help="what to segment, e.g. 'liver' (repeatable)")
    segment.add_argument("-o", "--output", required=True,
                         help="OUTPUT.seg.nrrd (Slicer segmentation), OUTPUT.nii.gz (label map) or OUTPUT.dcm "
                              "(DICOM SEG, for a DICOM series folder input); for a cohort, the folder to write one "
                              "file per scan to, named as the scan (see --format)")
    segment.add_argument("--format", choices=COHORT_FORMATS,
                         help="a cohort's output files: seg.nrrd (default), a label map (nii.gz, nii, nrrd) or dcm "
                              "(DICOM SEG, for DICOM series folders)")
    segment.add_argument("--num-parts", type=int,
                         help="split a cohort into this many parts, for as many processes (GPUs, SLURM array tasks)")
    segment.add_argument("--part-id", type=int, help="the part of the cohort this process segments, from 0")
    _add_model_arguments(segment)
    segment.add_argument("--proposals-dir",
                         help="also write every proposal to this folder (for a cohort, to a folder per scan in it)")
    segment.add_argument("--uncertainty", help="write the uncertainty map here (one file per prompt when several; for a "
                                               "cohort, a folder for SCAN_uncertainty.nii.gz files)")
    segment.add_argument("--progress", choices=("bar", "json", "none"), default="bar",
                         help="bar: progress bar on stderr; json: one JSON object per line on stdout")
    segment.add_argument("--overwrite", action="store_true",
                         help="replace existing output files (for a cohort: segment again the scans already written)")
    segment.set_defaults(run=_segment)

    evaluate = commands.add_parser("evaluate", help="score a model, or an ensemble and each of its models, on a "
                                                     "Decathlon-style dataset.json")
    evaluate.add_argument("--data", required=True, help="path to dataset.json")
    evaluate.add_argument("--split", default="training", help="list in dataset.json to read (default: training)")
    evaluate.add_argument("--cases", help="comma-separated case ids (default: all)")
    evaluate.add_argument("--structures", help="comma-separated structures (default: all the model and dataset share)")
    _add_model_arguments(evaluate)
    evaluate.add_argument("--report", required=True, help="REPORT.json to write")
    evaluate.add_argument("--overwrite", action="store_true", help="replace an existing report")
    evaluate.set_defaults(run=_evaluate)

    train = commands.add_parser("train", help="train a model (resumes from OUTPUT/checkpoint.pt if present)")
    train.add_argument("--data", required=True, help="path to dataset.json")
    train.add_argument("--output", required=True, help="run folder: checkpoint, loss log, and model/")
    train.add_argument("--family", default="universal", help="model family (default: universal)")
    train.add_argument("--name", default="", help="model name (default: the output folder's name)")
    train.add_argument("--structures", help="comma-separated structures (default: every labelled structure)")
    train.add_argument("--conditioning", choices=("text", "learned"),
                       help="how a new model names structures: text embeddings (default) or a learnt vector each")
    train.add_argument("--model-option", action="append", type=_model_option, default=[], metavar="KEY=VALUE",
                       help="a config field of a new model, e.g. unet_channels=64,128,256 or spacing=2,2,4 (repeatable)")
    train.add_argument("--validation-fraction", type=float, default=0.2)
    train.add_argument("--split-seed", type=int, default=0)
    train.add_argument("--batch-size", type=int, default=16)
    train.add_argument("--crop", type=_crop, default=(128, 128),
                       help="training crops in voxels of the model grid: one side for square slices of a 2D family "
                            "(a multiple of 16; as large as the model's window, 192 for universal-btcv, they show whole "
                            "slices, as segmenting does), or Z,Y,X for the patches of a 3D family, e.g. 48,128,128")
    train.add_argument("--autoencoder-steps", type=int, default=600)
    train.add_argument("--steps", type=int, default=6000, help="denoiser training steps")
    train.add_argument("--lr", type=float, default=3e-4)
    train.add_argument("--rotation-degrees", type=float, default=10.0,
                       help="augmentation: in-plane rotations drawn from ±this many degrees (0: none)")
    train.add_argument("--scaling", type=float, default=0.15,
                       help="augmentation: in-plane zoom drawn from 1 ± this (0: none)")
    train.add_argument("--gamma", type=float, default=1.0,
                       help="augmentation: intensity gamma drawn log-uniformly from 1/this to this, e.g. 1.5 "
                            "(default 1: none)")
    train.add_argument("--present-fraction", type=float, default=0.75,
                       help="share of training samples from slices that contain the structure")
    train.add_argument("--near-negatives", type=float, default=0.5,
                       help="of the other samples, the share from slices within 40 mm past the structure's ends")
    train.add_argument("--decoded-mask-weight", type=float, default=1.0,
                       help="weight of the segmentation loss on the mask decoded from each prediction, beside the "
                            "diffusion objective (0: the diffusion objective alone; how each family uses it: its "
                            "training module)")
    train.add_argument("--high-noise-share", type=float, default=0.0,
                       help="share of the training timesteps drawn from the last tenth of the schedule, where "
                            "sampling starts, instead of where the loss is high (default 0; families universal, "
                            "progidiff and textdiffseg3d)")
    train.add_argument("--ema-decay", type=float, default=0.999,
                       help="save the moving average of the denoiser's weights with this decay (0: the last weights)")
    train.add_argument("--checkpoint-every", type=int, default=200)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default="auto", help="auto, cpu or cuda (or mps, where torch has it)")
    train.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                       help="bf16: forward passes in bfloat16 (weights stay fp32); auto: bf16 where the hardware "
                            "computes it natively (default)")
    train.add_argument("--workers", type=int, default=0,
                       help="processes that draw training batches ahead of the training step (default 0: none; "
                            "on a GPU, a few keep it busy)")
    train.add_argument("--cache-dir", default="", help="where resampled cases are cached (default: OUTPUT/cache)")
    train.add_argument("--init-from", default="", help="model folder or name to continue training from")
    train.add_argument("--lora-rank", type=int, default=0,
                       help="adapt the --init-from model to this dataset's modality with LoRA of this rank (e.g. 8)")
    train.set_defaults(run=_train, on_interrupt="the checkpoint in the run folder is kept: run the same command "
                                                "again to resume")

    models = commands.add_parser("models", help="list the available models")
    models.add_argument("--json", action="store_true", help="print a JSON list")
    models.set_defaults(run=_models)
    return parser


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="registered model name or model folder (default: the bundled model), or "
                                        "several as a,b,c: an ensemble, each model's proposals fused together")
    parser.add_argument("--model-weights", metavar="FILE.json",
                        help="an ensemble's weight of each model per structure in the mean probability: a JSON file "
                             '({"pancreas": {"a": 1, "b": 0}, ...}), or the report of `textdiffseg evaluate` of the same '
                             "models (the weights it chose); default: the models alike")
    parser.add_argument("--proposals", type=int, default=5, help="proposals sampled per structure (default: 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first proposal; proposal k uses seed+k")
    parser.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    parser.add_argument("--fusion", choices=FUSION_METHODS, default="mean", help="how proposals are fused")
    parser.add_argument("--all-components", action="store_true",
                        help="keep every connected region of each proposal and fused mask (default: only the largest)")
    parser.add_argument("--allow-overlap", action="store_true",
                        help="let the fused masks of several prompts overlap (default: a voxel two of them claim "
                             "goes to the structure more probable there)")
    parser.add_argument("--no-second-look", action="store_true",
                        help="keep the first sampling of a structure found far larger than the model's training cases "
                             "(default: sample it again on a coarser grid and keep whichever finds more of it)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (or mps, where torch has it)")


def _crop(text: str) -> tuple[int, ...]:
    """``128`` (a square slice crop) or ``Z,Y,X`` / ``Y,X`` sides of whole numbers."""
    try:
        sides = tuple(int(side) for side in text.split(","))
    except ValueError:
        sides = ()
    if len(sides) not in (1, 2, 3):
        raise argparse.ArgumentTypeError(f"expected one side (128), Y,X or Z,Y,X (32,96,96), not {text!r}")
    return sides * 2 if len(sides) == 1 else sides


def _model_option(text: str) -> tuple[str, object]:
    """``KEY=VALUE``; the value read as JSON where it is (numbers, true, [..]), a comma-separated list, or text."""
    key, equals, value = text.partition("=")
    if not equals or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, e.g. unet_channels=64,128,256, not {text!r}")
    return key.strip(), _option_value(value.strip())


def _option_value(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        parts = text.split(",")
        return [_option_value(part.strip()) for part in parts] if len(parts) > 1 else text


def _segment(args) -> int:
    from .cohort import is_cohort
    from .errors import PromptError, SettingsError
    from .segmenter import check_sampling_settings
    from .terminology import resolve_prompts, split_prompts

    # Everything that can be checked without the model is checked first: bad prompts, settings and outputs
    # fail before anything slow, and before anything is written.
    prompts = [p for text in args.prompt for p in split_prompts(text)]
    if not prompts:
        raise PromptError("empty prompt: type the structure to segment, such as 'liver' or 'left kidney'.")
    structures = resolve_prompts(prompts)
    check_sampling_settings(args.proposals, args.seed, args.steps)
    args.proposal_counts = _proposal_counts(args, structures) if args.proposals_dir else None
    if is_cohort(args.input, args.output):
        return _segment_cohort(args, prompts, structures)
    if args.format or args.num_parts is not None or args.part_id is not None:
        raise SettingsError("--format, --num-parts and --part-id are for a cohort (-i FOLDER or LIST.txt, with -o a "
                            "folder); for one scan, the name given to -o gives the format")
    written, results = _segment_scan(args, prompts, structures, _progress(args.progress), lambda: _load_models(args))
    _print_result(args, written, results)
    return 0


def _segment_scan(args, prompts, structures, progress, load_segmenter) -> tuple[dict, list]:
    """Segment the scan ``args.input`` and write ``args.output`` (with the proposals and uncertainty maps asked
    for); ``progress`` is a context giving the sampling's progress callback, and ``load_segmenter()`` the model
    (or ensemble), called once the scan is read. Returns the paths written, and the ``segmenter.ProposalSet`` of
    each prompt."""
    from .outputs import SegmentOutput, check_outputs_apart, check_scalar_path, labelmap_sidecar, write_scalar
    from .volume import read_volume

    output, suffix, uncertainty_paths, proposal_paths = _scan_outputs(args, structures)
    check_outputs_apart([args.input], [output, *uncertainty_paths, *(p for paths in proposal_paths for p in paths)])
    _check_segmentation_output(output, args)
    for path in uncertainty_paths:
        check_scalar_path(path, args.overwrite)
    created = _make_folder(Path(args.proposals_dir), "proposals folder") if args.proposals_dir else []
    written = {"output": None, "label_names": None, "uncertainty": [], "proposals": []}
    try:  # a run that fails or is stopped half way removes what it wrote (each file itself is written atomically)
        for path in (p for paths in proposal_paths for p in paths):
            _check_segmentation_output(path, args)
        volume = read_volume(args.input)
        dicom_source = _dicom_source(args.input, volume) if suffix == ".dcm" else None
        segmenter = load_segmenter()
        with progress as report:
            results = segmenter.propose_many(volume, prompts, args.proposals, args.seed, args.steps,
                                             fusion=args.fusion, largest_component=not args.all_components,
                                             separate=not args.allow_overlap, second_look=not args.no_second_look,
                                             callback=report)
        segments = [SegmentOutput(r.structure, r.fused, _tags(r)) for r in results]
        written["output"] = _write_segments(output, segments, volume, dicom_source, segmenter.name, args.overwrite)
        if suffix == ".nii.gz":
            written["label_names"] = str(labelmap_sidecar(output))
        for path, result in zip(uncertainty_paths, results):
            written["uncertainty"].append(str(write_scalar(path, volume.with_array(result.uncertainty), args.overwrite)))
        for paths, result in zip(proposal_paths, results):
            for k, (path, mask) in enumerate(zip(paths, result.proposals)):
                segment = SegmentOutput(result.structure, mask, _tags(result, k))
                written["proposals"].append(_write_segments(path, [segment], volume, dicom_source, result.models[k],
                                                            args.overwrite))
    except BaseException:
        for path in [written["output"], written["label_names"], *written["uncertainty"], *written["proposals"]]:
            if path is not None:
                Path(path).unlink(missing_ok=True)
        for path in written["proposals"] if suffix == ".nii.gz" else []:
            labelmap_sidecar(path).unlink(missing_ok=True)
        _remove_empty(created)
        raise
    return written, results


def _scan_outputs(args, structures) -> tuple[Path, str, list[Path], list[list[Path]]]:
    """The files a scan's run writes: the segmentation, its format's file name ending (the proposals' too), the
    uncertainty maps, and the proposals of each structure."""
    output = Path(args.output)
    suffix = next((s for s in (".seg.nrrd", ".dcm") if output.name.lower().endswith(s)), ".nii.gz")
    uncertainty_paths = _per_structure_paths(args.uncertainty, structures) if args.uncertainty else []
    proposal_paths = [[Path(args.proposals_dir) / f"{s.name}_proposal{k + 1}{suffix}" for k in range(count)]
                      for s, count in zip(structures, args.proposal_counts)] if args.proposals_dir else []
    return output, suffix, uncertainty_paths, proposal_paths


def _proposal_counts(args, structures) -> list[int]:
    """How many proposals of each structure a run gives: ``--proposals``, times the number of the ensemble's
    models that know it (read from their configs, before any model loads: the proposals' files are checked first)."""
    from .modelio import read_config
    from .registry import model_names, resolve_model

    names = model_names(args.model)
    if len(names) == 1:
        return [args.proposals] * len(structures)
    known = [read_config(resolve_model(name)).structures for name in names]
    return [args.proposals * sum(s.name in structures_known for structures_known in known) for s in structures]


def _load_models(args):
    """The model ``--model`` names (a ``Segmenter``), or the ``Ensemble`` of the models it lists (``a,b,c``)."""
    from .ensemble import load_models, read_model_weights
    from .machine import resolve_device

    weights = None if args.model_weights is None else read_model_weights(args.model_weights)
    return load_models(args.model, resolve_device(args.device), weights)


def _print_result(args, written: dict, results: list, echo=print, **about) -> None:
    """What a scan's run found and wrote: a JSON ``result`` object (with ``about``, such as the scan) under
    ``--progress json``, else a line per structure and one naming the output, through ``echo``."""
    summary = [{"structure": r.structure.name, "prompt": r.prompt, "seeds": r.seeds, "models": r.models,
                "scores": [round(s, 4) for s in r.scores], "fused_voxels": int(r.fused.sum()), "warning": r.warning,
                "sampling_scale": round(r.sampling_scale, 3)}
               for r in results]
    if args.progress == "json":
        print(json.dumps({"type": "result", **about, **written, "structures": summary}), flush=True)
        return
    for item in summary:
        echo(f"{item['structure']}: {item['fused_voxels']} voxels, agreement {', '.join(map(str, item['scores']))}")
        if item["warning"]:
            echo(f"warning: {item['warning']}", file=sys.stderr)
    label_names = written["label_names"]
    echo(f"wrote {written['output']}" + (f" (label names in {label_names})" if label_names else ""))


def _segment_cohort(args, prompts, structures) -> int:
    """``textdiffseg segment -i FOLDER|LIST.txt -o OUT_FOLDER``: the model loaded once, every scan of this part of
    the cohort not yet written segmented, going on past a scan that fails; the failures are listed at the end."""
    from tqdm import tqdm

    from .cohort import list_scans, part, run_cohort, scan_names
    from .errors import OutputError, TextDiffSegError

    folders = {"output folder": Path(args.output), "proposals folder": args.proposals_dir,
               "uncertainty folder": args.uncertainty}
    folders = {what: Path(folder) for what, folder in folders.items() if folder}
    every_scan = list_scans(args.input, exclude=tuple(folders.values()))
    names = scan_names(every_scan)
    scans = part(every_scan, 1 if args.num_parts is None else args.num_parts, args.part_id or 0)
    for what, folder in folders.items():
        if Path(args.input).is_dir() and folder.resolve() == Path(args.input).resolve():
            raise OutputError(f"the {what} {folder} is the input folder: give the outputs a folder of their own (in "
                              "the input folder they would be taken for scans)")
    created = [made for what, folder in folders.items() for made in _make_folder(folder, what)]
    suffix = "." + (args.format or "seg.nrrd")

    def scan_args(scan: Path):
        name = names[scan]
        return argparse.Namespace(**{
            **vars(args), "input": str(scan), "output": str(folders["output folder"] / f"{name}{suffix}"),
            "proposals_dir": str(folders["proposals folder"] / name) if args.proposals_dir else None,
            "uncertainty": str(folders["uncertainty folder"] / f"{name}_uncertainty.nii.gz") if args.uncertainty else None})

    def is_done(scan: Path) -> bool:
        output, _, uncertainty_paths, proposal_paths = _scan_outputs(scan_args(scan), structures)
        return not args.overwrite and all(path.exists() for path in [output, *uncertainty_paths, *sum(proposal_paths, [])])

    try:
        segmenter = _load_models(args) if not all(map(is_done, scans)) else None
    except BaseException:
        _remove_empty(created)
        raise
    bar = tqdm(total=len(scans), unit="scan", file=sys.stderr, disable=args.progress != "bar")

    def echo(line: str, file=sys.stdout) -> None:  # a line above the bar
        tqdm.write(line, file=file)

    def report(scan: Path, event: dict) -> None:
        if args.progress == "json":
            print(json.dumps({**event, "scan": str(scan)}), flush=True)
        bar.set_description(f"{names[scan]}: {event.get('message', '')}"[:60])

    def segment(scan: Path) -> None:
        shown = warnings.showwarning

        def show(message, category, *rest) -> None:  # a warning names its scan, on a line above the bar
            with tqdm.external_write_mode(file=sys.stderr):
                shown(f"{scan}: {message}", category, *rest)

        warnings.showwarning = show
        bar.set_description(names[scan])
        try:
            written, results = _segment_scan(scan_args(scan), prompts, structures,
                                             contextlib.nullcontext(lambda event: report(scan, event)), lambda: segmenter)
        finally:
            warnings.showwarning = shown
        _print_result(args, written, results, echo, scan=str(scan))

    reasons = {}  # scan: why it failed

    def progress(scan: Path, outcome: str, error: Exception | None) -> None:
        if error is not None:
            reasons[scan] = str(error) if isinstance(error, TextDiffSegError) else _unexpected(error)
        if outcome != "segmented":
            report(scan, {"type": outcome, "message": reasons.get(scan, "written before")})
        bar.update(1)

    args.on_interrupt = ("the scans written so far are kept (the one under way was removed): run the same command "
                         "again to go on")
    stop = signal.signal(signal.SIGTERM, _interrupt)  # SLURM's time limit: the scan under way is removed too
    try:
        run = run_cohort(scans, is_done, segment, progress)
    finally:
        signal.signal(signal.SIGTERM, stop)
        bar.close()
    failures = [{"scan": str(scan), "message": reasons[scan]} for scan, _ in run.failed]
    if args.progress == "json":
        print(json.dumps({"type": "cohort", "segmented": len(run.segmented), "skipped": len(run.skipped),
                          "failed": failures}), flush=True)
    else:
        share = f"part {args.part_id or 0} of {args.num_parts}: " if args.num_parts else ""
        print(f"{share}{len(scans)} scans: {len(run.segmented)} segmented, {len(run.skipped)} skipped (written "
              f"before; --overwrite segments them again), {len(failures)} failed")
        for failure in failures:
            print(f"textdiffseg: failed: {failure['scan']}: {failure['message']}", file=sys.stderr)
    if any(not isinstance(error, TextDiffSegError) for _, error in run.failed):
        return EXIT_BUG
    return EXIT_USER_ERROR if failures else 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _check_segmentation_output(path: Path, args) -> None:
    """Raise ``OutputError`` unless a segmentation may be written to ``path`` in the format its name gives: a
    DICOM SEG (``.dcm``, for a DICOM series folder input only) or what ``outputs.write_segmentation`` writes."""
    if path.name.lower().endswith(".dcm"):
        from .dicom_seg import check_dicom_seg_output

        check_dicom_seg_output(path, args.input, args.overwrite)
    else:
        from .outputs import check_segmentation_path

        check_segmentation_path(path, args.overwrite)


def _dicom_source(folder: str, volume):
    """The images of the DICOM series a DICOM SEG output refers to (``dicom_seg.read_source_series``)."""
    from .dicom_seg import read_source_series

    return read_source_series(folder, volume)


def _write_segments(path: Path, segments, volume, dicom_source, model_name: str, overwrite: bool) -> str:
    """Write a segmentation: a DICOM SEG referring to ``dicom_source`` where there is one, else with
    ``outputs.write_segmentation``. Returns the path written."""
    if dicom_source is not None:
        from .dicom_seg import write_dicom_seg

        return str(write_dicom_seg(path, dicom_source, segments, model_name, overwrite))
    from .outputs import write_segmentation

    return str(write_segmentation(path, volume, segments, overwrite=overwrite))


def _make_folder(folder: Path, what: str) -> list[Path]:
    """Create ``folder`` (and missing parents) after checking that the nearest existing one takes files; the
    folders created, the deepest first (a failed run removes them again where they stayed empty)."""
    from .volume import check_folder

    missing = [f for f in (folder, *folder.parents) if not f.exists()]
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"the {what} {folder} is a file, not a folder")
    check_folder(missing[-1].parent if missing else folder, f"cannot create the {what} {folder}: ")
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders a run created, the deepest first, where nothing else was put there."""
    for folder in sorted(folders, key=lambda folder: len(folder.parts), reverse=True):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def _tags(result, k: int | None = None) -> dict[str, str]:
    """The tags of proposal ``k`` of ``result`` (its model and seed), or of the fused mask (k None: every model
    asked, and the first seed)."""
    fused = k is None
    return {"TextDiffSeg.prompt": result.prompt, "TextDiffSeg.model": result.model if fused else result.models[k],
            "TextDiffSeg.seed": str(result.seeds[0 if fused else k]),
            "TextDiffSeg.proposal": "fused" if fused else str(k + 1),
            "TextDiffSeg.proposals": str(len(result.proposals)),
            "TextDiffSeg.fusion": result.fusion, "TextDiffSeg.samplingScale": f"{result.sampling_scale:.3g}"}


def _per_structure_paths(path: str, structures) -> list[Path]:
    path = Path(path)
    if len(structures) == 1:
        return [path]
    name = path.name
    stem, dot, extension = name.partition(".")
    return [path.with_name(f"{stem}_{s.name}{dot}{extension}") for s in structures]


class _progress:
    """A context giving a progress callback: a tqdm bar on stderr, JSON lines on stdout, or nothing."""

    def __init__(self, mode: str):
        self.mode, self.bar = mode, None

    def __enter__(self):
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=100, unit="%", file=sys.stderr, bar_format="{l_bar}{bar}| {elapsed}<{remaining}")
        return self.report

    def report(self, event: dict) -> None:
        if self.mode == "json":
            print(json.dumps(event), flush=True)
        elif self.bar is not None:
            self.bar.set_description(event["message"][:50])
            self.bar.update(round(event["fraction"] * 100) - self.bar.n)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()


def _evaluate(args) -> int:
    from .datasets import read_dataset
    from .evaluation import evaluate
    from .outputs import check_outputs_apart
    from .model_card import format_score
    from .volume import check_output_path, write_atomically

    dataset = read_dataset(args.data, args.split)
    check_outputs_apart([args.data, *(path for case in dataset.cases for path in (case.image, case.label))], [args.report])
    report_path = check_output_path(args.report, args.overwrite)
    segmenter = _load_models(args)
    from tqdm import tqdm

    with tqdm(total=1, unit="case", file=sys.stderr) as bar:
        def progress(done, total, case_id):
            bar.total = total
            bar.set_description(case_id)
            bar.update(done - bar.n)

        report = evaluate(segmenter, args.data, args.split, _list(args.cases), _list(args.structures),
                          args.proposals, args.seed, args.steps, args.fusion, not args.all_components,
                          not args.allow_overlap, not args.no_second_look, progress)
    report["command"] = "textdiffseg " + shlex.join(args.argv)
    write_atomically(report_path, lambda p: p.write_text(json.dumps(report, indent=2) + "\n"), args.overwrite)
    for name, scores in report["structures"].items():
        print(f"{name:28s} dice {format_score(scores['dice'], 3)}  single {format_score(scores['single_dice'], 3)}  "
              f"oracle {format_score(scores['oracle_dice'], 3)}  hd95 {format_score(scores['hd95_mm'], 1)} mm  "
              f"nsd {format_score(scores['nsd'], 3)}  auroc {format_score(scores['uncertainty_auroc'], 3)}")
    if report["size_warnings"]:
        print(f"fused volume far outside the training cases' (size warning): {', '.join(report['size_warnings'])}")
    looked_again = [f"{row['case']} {row['structure']} ({row['sampling_scale']:.2f}x)"
                    for row in report["rows"] if row["sampling_scale"] > 1]
    if looked_again:
        print(f"sampled again on a coarser grid (enlarged): {', '.join(looked_again)}")
    for name, scores in report.get("models", {}).items():
        print(f"{name}: mean dice {format_score(scores['mean_dice'], 3)}, uncertainty auroc "
              f"{format_score(scores['mean_uncertainty_auroc'], 3)}")
    cross_validated = report.get("weighting", {}).get("cross_validated")
    if cross_validated:
        print(f"ensemble weighed per structure, the weights chosen on the other cases: mean dice "
              f"{format_score(cross_validated['mean_dice'], 3)}")
    print(f"{'ensemble: ' if 'models' in report else ''}mean dice {format_score(report['mean_dice'], 3)}, "
          f"uncertainty auroc {format_score(report['mean_uncertainty_auroc'], 3)}; "
          f"{report['seconds_per_case']:.1f} s per case; wrote {report_path}")
    return 0


def _train(args) -> int:
    from tqdm import tqdm

    from .distributed import rank
    from .machine import resolve_device
    from .model_card import TRAINED_PARAMETERS, TRAINING_RECORD
    from .training import TrainSettings, train

    settings = TrainSettings(
        data=args.data, output=args.output, family=args.family, name=args.name,
        structures=tuple(_list(args.structures) or ()), validation_fraction=args.validation_fraction,
        split_seed=args.split_seed, batch_size=args.batch_size, crop=args.crop,
        autoencoder_steps=args.autoencoder_steps,
        diffusion_steps=args.steps, lr=args.lr, rotation_degrees=args.rotation_degrees, scaling=args.scaling,
        gamma=args.gamma,
        present_fraction=args.present_fraction, near_negative_fraction=args.near_negatives, ema_decay=args.ema_decay,
        decoded_mask_weight=args.decoded_mask_weight, high_noise_share=args.high_noise_share,
        checkpoint_every=args.checkpoint_every, seed=args.seed, workers=args.workers,
        device=resolve_device(args.device), precision=args.precision, cache_dir=args.cache_dir,
        model_options={**({"conditioning": args.conditioning} if args.conditioning else {}), **dict(args.model_option)},
        init_from=args.init_from or "", lora_rank=args.lora_rank,
    )
    bars = {}

    def progress(stage, step, total, loss):
        if stage not in bars:
            for bar in bars.values():
                bar.close()
            bars[stage] = tqdm(total=total, initial=step - 1, desc=stage, file=sys.stderr)
        bars[stage].update(1)
        bars[stage].set_postfix(loss=f"{loss:.4f}")

    folder = train(settings, progress)
    for bar in bars.values():
        bar.close()
    if rank() == 0:  # one line, under torchrun too
        trained = json.loads((folder / TRAINING_RECORD).read_text())[TRAINED_PARAMETERS]
        print(f"wrote {folder} (its {trained['stage']} stage trained {trained['trained']:,} of {trained['of']:,} "
              "parameters)")
    return 0


def _models(args) -> int:
    from .registry import list_models

    models = list_models()
    if args.json:
        print(json.dumps([{**dataclasses.asdict(m), "structures": list(m.structures)} for m in models], indent=2))
        return 0
    for m in models:
        print(f"{m.name}  ({m.family}, {m.modality}, {m.size_bytes / 1e6:.1f} MB{', bundled' if m.path else ''})")
        print(f"    {', '.join(m.structures)}")
    return 0


def _list(text: str | None) -> list[str] | None:
    return [item.strip() for item in text.split(",") if item.strip()] if text else None


if __name__ == "__main__":
    sys.exit(main())
