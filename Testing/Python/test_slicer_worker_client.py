"""The Slicer-side worker client against a stand-in worker run with plain ``sys.executable``.

The stand-in lives in a temporary ``TextDiffSegLib/worker.py`` and is started by the same
launcher Slicer uses (``python -m TextDiffSegLib.worker`` in the engine folder), so these tests
cover the process handling: events, stray output, errors, crashes, cancel and shutdown, requests of
several callers, and the worker's output logged on the main thread.
"""

import logging
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "TextDiffSeg"))
from TextDiffSegHelpers.worker_client import PendingLog, WorkerClient, WorkerError, workerLauncher  # noqa: E402

STAND_IN = textwrap.dedent(
    """
    import json, subprocess, sys, time

    def emit(event):
        print(json.dumps(event), flush=True)

    for line in sys.stdin:
        request = json.loads(line)
        command = request.get("command")
        if command == "shutdown":
            break
        if command == "echo":
            for step in range(3):
                emit({"id": request["id"], "type": "progress", "stage": "sample", "fraction": step / 3, "message": "step"})
            print("stray text a library printed", flush=True)
            print("a warning on stderr", file=sys.stderr, flush=True)
            emit({"id": request["id"], "type": "result", "value": request["value"]})
        elif command == "fail":
            emit({"id": request["id"], "type": "error", "message": "Unknown structure 'livr'. Did you mean: liver?"})
        elif command == "crash":
            print("Traceback (most recent call last): the engine broke", file=sys.stderr, flush=True)
            sys.exit(3)
        elif command == "sleep":
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
            emit({"id": request["id"], "type": "progress", "stage": "sample", "fraction": 0.1, "message": str(child.pid)})
            time.sleep(600)
    """
)


@pytest.fixture
def client(tmp_path):
    package = tmp_path / "TextDiffSegLib"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "worker.py").write_text(STAND_IN)
    client = WorkerClient(workerLauncher(sys.executable, tmp_path))
    yield client
    client.cancel()


def test_a_request_gets_its_progress_and_result_and_the_worker_stays_warm(client):
    progress = []
    first = client.send("echo", value=1)
    assert client.wait(first, onEvent=progress.append, timeout=60) == {"id": first, "type": "result", "value": 1}
    assert [event["fraction"] for event in progress] == [0, 1 / 3, 2 / 3]
    pid = client._process.pid
    second = client.send("echo", value=2)
    assert client.wait(second, timeout=60)["value"] == 2
    assert client._process.pid == pid and second != first


def test_the_gui_polls_without_blocking(client):
    requestId = client.send("echo", value="x")
    events, deadline = [], time.monotonic() + 60
    while not any(event["type"] == "result" for event in events) and time.monotonic() < deadline:
        events += client.poll(requestId)
        time.sleep(0.01)
    assert [event["type"] for event in events] == ["progress"] * 3 + ["result"]
    assert all(event["id"] == requestId for event in events)
    assert client.poll(requestId) == []


def test_callers_sharing_the_worker_each_get_their_own_requests_events(client):
    first, second = client.send("echo", value=1), client.send("echo", value=2)
    assert client.wait(second, timeout=60)["value"] == 2  # the first request's events are kept for its caller
    events, deadline = [], time.monotonic() + 60
    while (not events or events[-1]["type"] != "result") and time.monotonic() < deadline:
        events += client.poll(first)
        time.sleep(0.01)
    assert [(event["id"], event["type"]) for event in events] == [(first, "progress")] * 3 + [(first, "result")]


def test_a_worker_error_reaches_the_caller_as_its_message(client):
    with pytest.raises(WorkerError, match="Did you mean: liver"):
        client.wait(client.send("fail"), timeout=60)
    assert client.isRunning()


def test_a_crash_is_reported_with_the_workers_last_words_and_the_next_request_restarts_it(client):
    with pytest.raises(WorkerError, match=r"stopped unexpectedly \(exit code 3\)(.|\n)*the engine broke"):
        client.wait(client.send("crash"), timeout=60)
    assert client.wait(client.send("echo", value="again"), timeout=60)["value"] == "again"


def test_cancel_kills_the_whole_process_tree(client):
    progress = []
    requestId = client.send("sleep")
    deadline = time.monotonic() + 60
    while not progress and time.monotonic() < deadline:
        progress += [event for event in client.poll(requestId) if event["type"] == "progress"]
        time.sleep(0.01)
    worker, child = client._process.pid, int(progress[0]["message"])
    assert psutil.pid_exists(child)

    client.cancel()

    assert not client.isRunning()
    for pid in (worker, child):
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert client.poll(requestId) == [{"id": requestId, "type": "cancelled", "message": "Cancelled by the user."}]
    secondId = client.send("sleep")  # a new worker
    client.cancel()
    with pytest.raises(WorkerError, match="Cancelled by the user"):
        client.wait(secondId, timeout=10)


def test_stop_asks_the_worker_to_exit(client):
    client.wait(client.send("echo", value=0), timeout=60)
    process = client._process
    client.stop()
    assert process.returncode == 0 and not client.isRunning()


class _ThreadRecorder(logging.Handler):
    """Records (thread name, message) of each log record."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append((record.threadName, record.getMessage()))


@pytest.fixture
def records():
    recorder, root = _ThreadRecorder(), logging.getLogger()
    level = root.level
    root.addHandler(recorder)
    root.setLevel(logging.DEBUG)
    yield recorder.records
    root.removeHandler(recorder)
    root.setLevel(level)


def test_pending_lines_are_logged_by_the_thread_that_flushes(records):
    log = PendingLog()
    reader = threading.Thread(target=lambda: [log.add(logging.INFO, "one"), log.add(logging.DEBUG, "two")])
    reader.start()
    reader.join()
    assert records == []
    log.flush()
    log.flush()
    main = threading.current_thread().name
    assert records == [(main, "TextDiffSeg worker: one"), (main, "TextDiffSeg worker: two")]


def test_the_workers_output_is_logged_on_the_thread_that_polls_or_waits(client, records):
    client.wait(client.send("echo", value=1), timeout=60)
    requestId = client.send("echo", value=2)
    lines = ["stray text a library printed", "a warning on stderr"]  # once per request
    expected = sorted(2 * [f"TextDiffSeg worker: {line}" for line in lines])

    def logged():
        return [(thread, message) for thread, message in records if message.startswith("TextDiffSeg worker:")]

    deadline = time.monotonic() + 60
    while sorted(message for _, message in logged()) != expected and time.monotonic() < deadline:
        client.poll(requestId)
        time.sleep(0.01)
    assert sorted(message for _, message in logged()) == expected
    assert {thread for thread, _ in logged()} == {threading.current_thread().name}
