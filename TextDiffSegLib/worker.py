"""The engine as a long-lived process for 3D Slicer: JSON requests on stdin, JSON events on stdout.

Slicer runs ``PythonSlicer -m TextDiffSegLib.worker`` once and keeps it: a model is loaded on its
first use and stays loaded. After ``$TEXTDIFFSEG_WORKER_IDLE_MINUTES`` (30 by default) without a
request the worker exits, which frees the model's memory; Slicer starts it again for the next request.
Each stdin line is one request::

    {"id": 1, "command": "segment", "input": "/tmp/x/volume.nrrd", "prompts": ["liver"],
     "model": null, "model_weights": null, "num_proposals": 5, "seed": 0, "steps": null, "device": "auto",
     "output_dir": "/tmp/x/out", "thumbnails": {"size": 128, "window": [40, 400]}}
    {"command": "shutdown"}

``model`` is a registered name or a model folder (``null``: the default model), or a list of them: an ensemble
(``ensemble.Ensemble``), whose proposals are numbered across its models in their order; ``model_weights``, an
ensemble's weight of each model per structure: an object (``{"pancreas": {"a": 1, "b": 0}}``), or the path of a
JSON file of them or of an evaluate report, as ``--model-weights`` (``ensemble.read_model_weights``); ``device`` is
``"auto"``, ``"cpu"`` or ``"cuda"`` (or ``"mps"``, where torch has it: ``machine.resolve_device``);
``thumbnails`` (optional; ``window`` is centre and width, or ``null`` for automatic) asks for a PNG per proposal. Each stdout line is one event of a request::

    {"id": 1, "type": "progress", "stage": "sample", "fraction": 0.4, "message": "..."}
    {"id": 1, "type": "result", "results": [{"prompt": "liver", "structure": "liver", "model": "...",
     "seeds": [0, 1], "models": ["...", "..."], "scores": [0.9, 0.8],
     "proposals": ["<output_dir>/1-liver/proposal-1.nrrd", ...],
     "fused": ".../fused.nrrd", "uncertainty": ".../uncertainty.nrrd", "thumbnails": [".../proposal-1.png", ...],
     "warning": null}]}
    {"id": 1, "type": "error", "message": "..."}

Every volume file is on the input volume's grid (masks uint8, uncertainty float32). ``model`` names the
model (an ensemble's models asked for the structure, joined by commas), ``models`` each proposal's. ``warning``
holds what was doubtful about the scan, which of an ensemble's models could not segment this structure, and a
sentence where the fused mask's volume is far outside the model's training cases' (``typical_size``).
An error a user can fix (``TextDiffSegError``) comes back with its message; anything else as a short
message, with the traceback on stderr. The worker keeps serving after an error. Whatever libraries print goes to
stderr, so stdout carries only events.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sys
import threading
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Callable, TextIO

from .allocator import keep_freed_memory, release_freed_memory
from .ensemble import asked_together, read_model_weights
from .errors import InputImageError, OutputError, TextDiffSegError, TextDiffSegWarning
from .machine import resolve_device
from .registry import resolve_model
from .segmenter import ProposalSet, Segmenter
from .thumbnails import thumbnail, write_png
from .volume import Volume, read_volume, write_volume

#: Minutes without a request after which the worker exits, unless ``$TEXTDIFFSEG_WORKER_IDLE_MINUTES`` says otherwise.
IDLE_MINUTES = 30.0


class Worker:
    """Serves requests, keeping each loaded model (by folder and device) for the next request."""

    def __init__(self, emit: Callable[[dict], None]):
        self._emit = emit
        self._segmenters: dict = {}

    def handle(self, request: dict) -> None:
        """Answer one request with progress events and exactly one result or error event."""
        request_id = request.get("id")
        try:
            if request.get("command") != "segment":
                raise TextDiffSegError(f"unknown worker command {request.get('command')!r}; expected 'segment' or 'shutdown'")
            results = self._segment(request, lambda event: self._emit({"id": request_id, **event}))
            self._emit({"id": request_id, "type": "result", "results": results})
        except TextDiffSegError as error:
            self._emit({"id": request_id, "type": "error", "message": str(error)})
        except Exception as error:  # noqa: BLE001 - the worker must outlive any failure and say what it was
            traceback.print_exc(file=sys.stderr)
            self._emit({"id": request_id, "type": "error", "message": f"Unexpected error in the TextDiffSeg engine: {error!r}"})

    def _segment(self, request: dict, report: Callable[[dict], None]) -> list[dict]:
        prompts = request.get("prompts")
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise TextDiffSegError("no prompt given: name at least one structure, e.g. 'liver'")
        num_proposals = _integer(request, "num_proposals", 5, 1, 64)
        seed = _integer(request, "seed", 0, 0, 2**31 - 1)
        steps = None if request.get("steps") is None else _integer(request, "steps", None, 1, 10_000)
        if not request.get("input"):
            raise InputImageError("no input image given")
        if not request.get("output_dir") or not Path(request["output_dir"]).is_dir():
            raise OutputError(f"the output folder {request.get('output_dir')!r} does not exist")
        output_dir = Path(request["output_dir"])
        thumbnails = _thumbnail_options(request.get("thumbnails"))

        volume = read_volume(request["input"])
        models = request.get("model")
        if isinstance(models, list) and not (models and all(isinstance(m, str) and m.strip() for m in models)):
            raise TextDiffSegError(f"model must be a model's name or folder, or a list of them, not {models!r}")
        device = str(request.get("device") or "auto")
        names = models if isinstance(models, list) else [models]
        weights = request.get("model_weights")
        if isinstance(weights, str):
            weights = read_model_weights(weights)
        elif weights is not None and not isinstance(weights, dict):
            raise TextDiffSegError(f"model_weights must be a JSON file's path or the weights, not {weights!r}")
        segmenter = asked_together([self._segmenter(name, device, report) for name in names], weights)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", TextDiffSegWarning)
            proposal_sets = segmenter.propose_many(
                volume, prompts, num_proposals=num_proposals, seed=seed, steps=steps, callback=report
            )
        notes = []  # (the structure it concerns, or None for every one; the sentence)
        for caught_warning in caught:  # the engine's warnings are said with the results; others go to stderr
            if issubclass(caught_warning.category, TextDiffSegWarning):
                notes.append((getattr(caught_warning.message, "structure", None), str(caught_warning.message)))
            else:
                warnings.showwarning(caught_warning.message, caught_warning.category, caught_warning.filename,
                                     caught_warning.lineno)
        return [_write(volume, proposals, output_dir / f"{number}-{proposals.structure.name}", thumbnails,
                       [note for structure, note in notes if structure in (None, proposals.structure.name)])
                for number, proposals in enumerate(proposal_sets, start=1)]

    def _segmenter(self, model, device: str, report: Callable[[dict], None]) -> Segmenter:
        def downloading(done: int, total: int) -> None:
            fraction = done / total if total else 0.0
            report({"type": "progress", "stage": "download", "fraction": round(min(fraction, 1.0), 4),
                    "message": f"downloading the model: {done / 1e6:.0f} of {total / 1e6:.0f} MB"})

        folder = resolve_model(model, progress=downloading).resolve()
        key = (str(folder), resolve_device(device))
        if key not in self._segmenters:
            report({"type": "progress", "stage": "load", "fraction": 0.0, "message": f"loading the model {folder.name}"})
            self._segmenters[key] = Segmenter.from_pretrained(folder, device=key[1])
        return self._segmenters[key]


def _thumbnail_options(options) -> tuple[int, tuple[float, float] | None] | None:
    """``(size, window)`` from a request's ``thumbnails`` field, or None when none are wanted."""
    if options is None:
        return None
    problem = f"thumbnails must be {{'size': 16 to 1024, 'window': [centre, width] or null}}, not {options!r}"
    if not isinstance(options, dict) or isinstance(options.get("size"), bool) or not isinstance(options.get("size"), int):
        raise TextDiffSegError(problem)
    window = options.get("window")
    if not 16 <= options["size"] <= 1024 or not (
        window is None or (isinstance(window, list) and len(window) == 2 and all(isinstance(v, (int, float)) for v in window))
    ):
        raise TextDiffSegError(problem)
    return options["size"], None if window is None else (float(window[0]), float(window[1]))


def _write(volume: Volume, proposals: ProposalSet, folder: Path, thumbnails: tuple | None, notes: list[str]) -> dict:
    """Write one prompt's masks, uncertainty and thumbnails on the input grid; their paths and metadata (with
    ``notes``, the engine's warnings of the run that concern this structure, before the size warning in
    ``warning``)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, pictures = [], []
    for number, mask in enumerate(proposals.proposals, start=1):
        paths.append(str(write_volume(folder / f"proposal-{number}.nrrd", volume.with_array(mask), overwrite=True)))
        if thumbnails:
            pictures.append(str(folder / f"proposal-{number}.png"))
            write_png(thumbnail(volume, mask, proposals.structure.color, *thumbnails), pictures[-1])
    fused = write_volume(folder / "fused.nrrd", volume.with_array(proposals.fused), overwrite=True)
    uncertainty = write_volume(folder / "uncertainty.nrrd", volume.with_array(proposals.uncertainty), overwrite=True)
    return {
        "prompt": proposals.prompt,
        "structure": proposals.structure.name,
        "model": proposals.model,
        "seeds": [int(seed) for seed in proposals.seeds],
        "models": list(proposals.models),
        "scores": [float(score) for score in proposals.scores],
        "proposals": paths,
        "fused": str(fused),
        "uncertainty": str(uncertainty),
        "thumbnails": pictures,
        "warning": "; ".join(note for note in [*notes, proposals.warning] if note) or None,
    }


def _integer(request: dict, key: str, default, minimum: int, maximum: int) -> int:
    value = request.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise TextDiffSegError(f"{key} must be a whole number from {minimum} to {maximum}, not {value!r}")
    return value


def _protocol_stream() -> TextIO:
    """A private copy of stdout for events; file descriptor 1 (``print``, C libraries) then goes to stderr."""
    stream = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8", buffering=1)
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    return stream


def _requests(stream: TextIO, idle_minutes: float) -> Iterator[str]:
    """The lines of ``stream`` until it ends or none has come for ``idle_minutes`` since the last was handled.

    A thread reads them, since a pipe cannot be read with a timeout on every platform (Windows).
    """
    lines: queue.Queue = queue.Queue()

    def read() -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True, name="requests").start()
    while True:
        try:
            line = lines.get(timeout=idle_minutes * 60)
        except queue.Empty:
            logging.info("no request for %g minutes: the worker exits to free its memory", idle_minutes)
            return
        if line is None:
            return
        yield line


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    events = _protocol_stream()

    def emit(event: dict) -> None:
        events.write(json.dumps(event) + "\n")
        events.flush()

    keep_freed_memory()
    worker = Worker(emit)
    for line in _requests(sys.stdin, float(os.environ.get("TEXTDIFFSEG_WORKER_IDLE_MINUTES", IDLE_MINUTES))):
        if not line.strip():
            continue
        try:
            request = json.loads(line)
        except json.JSONDecodeError as error:
            emit({"id": None, "type": "error", "message": f"the worker received a malformed request: {error}"})
            continue
        if not isinstance(request, dict):
            emit({"id": None, "type": "error", "message": "the worker received a request that is not a JSON object"})
            continue
        if request.get("command") == "shutdown":
            break
        worker.handle(request)
        release_freed_memory()  # what sampling freed goes back to the system while the worker waits


if __name__ == "__main__":
    main()
