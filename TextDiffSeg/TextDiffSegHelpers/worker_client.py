"""Slicer's side of the engine's worker process (``python -m TextDiffSegLib.worker``).

The worker is started once and kept warm: the model stays loaded between requests, until the worker
has been idle for a while and exits by itself; the next request starts it again. Requests go to its
stdin and events come back from its stdout, one JSON object per line. A background thread reads the
events into a queue per request, so that several callers can share one worker: the GUI polls its
request's queue with a timer (``poll``), a script waits on it (``wait``). The worker's other output
is logged by whoever polls or waits (``PendingLog``). ``cancel`` kills the worker's whole process tree
(``PythonSlicer`` is a launcher that starts the real Python as a child); the next request starts a new
worker.

How the process is started is up to the caller (``launch``), so tests run the worker with plain
``sys.executable`` and Slicer runs it with ``PythonSlicer``.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from TextDiffSegLib.volume import Volume, read_volume

#: Event types that end a request.
FINAL_EVENTS = ("result", "error", "cancelled")

#: Seconds ``WorkerClient.wait`` waits for an event before it logs the worker's output so far.
LOG_INTERVAL = 0.1


class WorkerError(RuntimeError):
    """The worker reported an error, stopped unexpectedly, or the request was cancelled."""


def workerLauncher(
    python: str, engineRoot: str | os.PathLike, environment: dict[str, str] | None = None
) -> Callable[[], subprocess.Popen]:
    """A launcher that runs ``python -m TextDiffSegLib.worker`` with the engine importable.

    ``-m`` puts the working folder first on ``sys.path``, so running in ``engineRoot`` (the folder
    holding ``TextDiffSegLib/``) is all the worker needs to find the engine.
    """
    command = [str(python), "-m", "TextDiffSegLib.worker"]
    environment = dict(os.environ if environment is None else environment, PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
    creationFlags = subprocess.CREATE_NO_WINDOW if sys.platform == "win32" else 0

    def launch() -> subprocess.Popen:
        return subprocess.Popen(
            command,
            cwd=str(engineRoot),
            env=environment,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            creationflags=creationFlags,
        )

    return launch


class PendingLog:
    """Log lines from background threads, logged by the thread that calls ``flush``.

    Slicer's log handlers write to Qt widgets (the Python console, the error log), which only the main
    thread may touch. So the threads that read the worker's output only queue it here, and the main
    thread logs it when it polls or waits for events, as Slicer's GUI does from a timer.
    """

    def __init__(self):
        self._lines: queue.SimpleQueue = queue.SimpleQueue()

    def add(self, level: int, line: str) -> None:
        self._lines.put((level, line))

    def flush(self) -> None:
        """Log the queued lines, oldest first."""
        while True:
            try:
                level, line = self._lines.get_nowait()
            except queue.Empty:
                return
            logging.log(level, "TextDiffSeg worker: %s", line)


class WorkerClient:
    """Talks to one worker process; restarts it when a request comes after it ended.

    Each request's events are kept apart, so several callers can share the worker: each polls or waits
    for its own requests. Every unanswered request gets exactly one final event (``FINAL_EVENTS``).
    """

    def __init__(self, launch: Callable[[], subprocess.Popen]):
        self._launch = launch
        self._process: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._pending: dict[int, subprocess.Popen] = {}  # unanswered request id: the process it went to
        self._events: dict[int, queue.Queue] = {}  # request id: its events that poll or wait has not taken yet
        self._nextId = 1
        self._stderrTail: collections.deque = collections.deque(maxlen=40)
        self.log = PendingLog()

    # --- process ------------------------------------------------------------------------------

    def isRunning(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the worker unless it is running already."""
        if self.isRunning():
            return
        process = self._launch()
        self._process = process
        self._stderrTail.clear()
        logThread = threading.Thread(target=self._readLog, args=(process,), daemon=True, name="TextDiffSeg worker log")
        logThread.start()
        threading.Thread(
            target=self._readEvents, args=(process, logThread), daemon=True, name="TextDiffSeg worker events"
        ).start()

    def cancel(self) -> None:
        """Kill the worker and everything it started; unanswered requests end as ``cancelled``."""
        process, self._process = self._process, None
        with self._lock:
            for requestId in sorted(self._pending):
                self._put({"id": requestId, "type": "cancelled", "message": "Cancelled by the user."})
        if process is not None:
            _killTree(process.pid)
            process.wait()

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the worker to exit; kill it if it has not within ``timeout`` seconds."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            try:
                process.stdin.write(json.dumps({"command": "shutdown"}) + "\n")
                process.stdin.flush()
                process.wait(timeout)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.cancel()

    # --- requests and events ------------------------------------------------------------------

    def send(self, command: str, **parameters) -> int:
        """Send one request (starting the worker if needed); returns its id."""
        self.start()
        with self._lock:
            requestId, self._nextId = self._nextId, self._nextId + 1
            self._pending[requestId] = self._process
            self._events[requestId] = queue.Queue()
        try:
            self._process.stdin.write(json.dumps({"id": requestId, "command": command, **parameters}) + "\n")
            self._process.stdin.flush()
        except OSError:
            with self._lock:
                self._pending.pop(requestId, None)
                self._events.pop(requestId, None)
            raise WorkerError(f"Could not send the request to the TextDiffSeg worker: {self._exitReason()}") from None
        return requestId

    def poll(self, requestId: int) -> list[dict]:
        """The events of request ``requestId`` that have arrived, without waiting; the worker's output is logged."""
        self.log.flush()
        with self._lock:
            waiting = self._events.get(requestId)
        events = []
        while waiting is not None:
            try:
                events.append(waiting.get_nowait())
            except queue.Empty:
                break
        if events and events[-1]["type"] in FINAL_EVENTS:
            self._forget(requestId)
        return events

    def wait(self, requestId: int, onEvent: Callable[[dict], None] | None = None, timeout: float | None = None) -> dict:
        """Block until request ``requestId`` ends; returns its ``result`` event.

        Other events of the request (progress) go to ``onEvent``; the worker's output is logged meanwhile.
        Raises ``WorkerError`` with the worker's message for an ``error`` or ``cancelled`` end,
        ``TimeoutError`` after ``timeout`` s.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            waiting = self._events[requestId]
        while True:
            self.log.flush()
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"the TextDiffSeg worker did not answer request {requestId} within {timeout} s")
            try:
                event = waiting.get(timeout=LOG_INTERVAL if remaining is None else min(remaining, LOG_INTERVAL))
            except queue.Empty:
                continue
            if event["type"] in FINAL_EVENTS:
                self._forget(requestId)
            if event["type"] == "result":
                return event
            if event["type"] in FINAL_EVENTS:
                raise WorkerError(event.get("message") or "The TextDiffSeg worker failed without a message.")
            if onEvent is not None:
                onEvent(event)

    def _forget(self, requestId: int) -> None:
        with self._lock:
            self._events.pop(requestId, None)

    def _put(self, event: dict) -> None:
        """Queue an event for its request, if that has not ended; a final event ends it. Call with ``_lock`` held."""
        requestId = event.get("id")
        if requestId not in self._pending:  # a request already cancelled, or no request at all
            self.log.add(logging.DEBUG, f"ignored an event of no running request: {event}")
            return
        if event["type"] in FINAL_EVENTS:
            del self._pending[requestId]
        self._events[requestId].put(event)

    # --- background threads -------------------------------------------------------------------

    def _readEvents(self, process: subprocess.Popen, logThread: threading.Thread) -> None:
        for line in process.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                event = None
            if not isinstance(event, dict) or "type" not in event:
                self.log.add(logging.INFO, line)
                continue
            with self._lock:
                self._put(event)
        process.wait()
        logThread.join(timeout=5)
        with self._lock:  # requests this process left unanswered
            for requestId in sorted(i for i, p in self._pending.items() if p is process):
                self._put({"id": requestId, "type": "error", "message": self._exitReason(process)})

    def _readLog(self, process: subprocess.Popen) -> None:
        for line in process.stderr:
            line = line.rstrip()
            if line:
                self._stderrTail.append(line)
                self.log.add(logging.DEBUG, line)

    def _exitReason(self, process: subprocess.Popen | None = None) -> str:
        process = process or self._process
        code = process.poll() if process is not None else None
        tail = "\n".join(list(self._stderrTail)[-15:])
        return f"the TextDiffSeg worker stopped unexpectedly (exit code {code})." + (f" Its last output:\n{tail}" if tail else "")


def _killTree(pid: int) -> None:
    """Kill a process and all its descendants (children first, so none is left orphaned and running)."""
    import psutil  # one of the engine's requirements, which Slicer installs after this module has loaded

    try:
        parent = psutil.Process(pid)
        children = parent.children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for process in children + [parent]:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(children, timeout=5)


@dataclass
class Proposals:
    """The worker's proposals for one prompt: files on the input volume's grid, read on demand.

    ``structure`` is the canonical name the prompt resolved to; ``seeds[i]`` reproduces proposal
    ``i`` with ``models[i]``, the model that sampled it (an ensemble's ``model`` names all of them); ``scores[i]`` is its agreement with the others (mean Dice, 1 = all agree); ``warning`` says
    when the fused mask's volume is far outside the sizes the model was trained on.
    """

    prompt: str
    structure: str
    model: str
    seeds: list[int]
    models: list[str]
    scores: list[float]
    proposalPaths: list[str]
    fusedPath: str
    uncertaintyPath: str
    thumbnailPaths: list[str]
    warning: str | None = None

    def __len__(self) -> int:
        return len(self.proposalPaths)

    def mask(self, index: int) -> np.ndarray:
        """Proposal ``index`` as a uint8 0/1 array [z, y, x]."""
        return _readMask(self.proposalPaths[index])

    def fusedMask(self) -> np.ndarray:
        """The fusion of all proposals, as the engine computed it."""
        return _readMask(self.fusedPath)

    def uncertainty(self) -> Volume:
        """Voxel-wise disagreement of the proposals, float32 in [0, 1], with the input's geometry."""
        return read_volume(self.uncertaintyPath)


def _readMask(path: str) -> np.ndarray:
    return (read_volume(path).array != 0).astype(np.uint8)


def proposalsFromResult(event: dict) -> list[Proposals]:
    """The ``Proposals`` of each prompt in a ``result`` event."""
    try:
        proposals = [
            Proposals(
                prompt=str(result["prompt"]),
                structure=str(result["structure"]),
                model=str(result["model"]),
                seeds=[int(seed) for seed in result["seeds"]],
                models=[str(model) for model in result["models"]],
                scores=[float(score) for score in result["scores"]],
                proposalPaths=[str(path) for path in result["proposals"]],
                fusedPath=str(result["fused"]),
                uncertaintyPath=str(result["uncertainty"]),
                thumbnailPaths=[str(path) for path in result.get("thumbnails", [])],
                warning=str(result["warning"]) if result.get("warning") else None,
            )
            for result in event["results"]
        ]
    except (KeyError, TypeError, ValueError) as error:
        raise WorkerError(f"The TextDiffSeg worker sent a malformed result ({error!r}); update the extension.") from None
    for item in proposals:
        if not (len(item.proposalPaths) == len(item.seeds) == len(item.models) == len(item.scores) > 0):
            raise WorkerError(f"The TextDiffSeg worker sent mismatched proposals, seeds, models and scores for "
                              f"{item.prompt!r}.")
    return proposals
