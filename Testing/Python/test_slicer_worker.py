"""The real worker (``python -m TextDiffSegLib.worker``) driven by the Slicer-side client, end to end.

A tiny random model segments a real CT: progress events arrive, proposals come back as files on the
input's exact grid, the worker stays warm, Cancel kills it mid-run, an idle worker exits by itself,
and user errors come back as readable messages while the worker keeps serving.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import SimpleITK as sitk
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "TextDiffSeg"))
from TextDiffSegHelpers.worker_client import WorkerClient, WorkerError, proposalsFromResult, workerLauncher  # noqa: E402

from TextDiffSegLib.volume import from_sitk, write_volume  # noqa: E402

pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def ct_file(shared_data, tmp_path_factory) -> Path:
    """Part of a real CT (the upper abdomen, for speed) as the Slicer module hands it over (NRRD), made
    oblique to keep the geometry honest."""
    image = sitk.ReadImage(str(shared_data / "btcv/imagesTr/btcv_0005.nii.gz"))
    volume = from_sitk(image[20:240, 30:230, 50:90])
    angle = np.deg2rad(15.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    volume.direction = tuple(rotation.ravel())
    volume.origin = (-120.5, 30.25, -410.0)
    return write_volume(tmp_path_factory.mktemp("input") / "volume.nrrd", volume)


@pytest.fixture(scope="module")
def client():
    client = WorkerClient(workerLauncher(sys.executable, REPO))
    yield client
    client.stop()


def _request(ct_file, tiny_model_dir, output_dir, **overrides):
    output_dir.mkdir(parents=True, exist_ok=True)
    request = dict(input=str(ct_file), prompts=["liver", "left kidney"], model=str(tiny_model_dir), num_proposals=2,
                   seed=7, steps=None, device="cpu", output_dir=str(output_dir),
                   thumbnails={"size": 64, "window": [40, 400]})
    return {**request, **overrides}


def test_proposals_come_back_on_the_inputs_grid_with_progress(client, ct_file, tiny_model_dir, tmp_path):
    progress = []
    event = client.wait(client.send("segment", **_request(ct_file, tiny_model_dir, tmp_path / "a")),
                        onEvent=progress.append, timeout=600)

    stages = [e["stage"] for e in progress]
    assert "load" in stages and "sample" in stages
    sampling = [e["fraction"] for e in progress if e["stage"] == "sample"]
    assert sampling == sorted(sampling) and 0 <= sampling[0] and sampling[-1] <= 1
    assert all(e["type"] == "progress" and e["message"] for e in progress)

    reference = sitk.ReadImage(str(ct_file))
    results = proposalsFromResult(event)
    assert [r.structure for r in results] == ["liver", "kidney_left"]
    assert [r.prompt for r in results] == ["liver", "left kidney"]
    for result in results:
        assert result.model == "tiny" and result.seeds == [7, 8] and result.models == ["tiny", "tiny"]
        assert len(result.scores) == 2 and all(0 <= s <= 1 for s in result.scores)
        for path in result.proposalPaths + [result.fusedPath, result.uncertaintyPath]:
            image = sitk.ReadImage(path)
            assert image.GetSize() == reference.GetSize()
            np.testing.assert_allclose(image.GetSpacing(), reference.GetSpacing(), atol=1e-6)
            np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-6)
            np.testing.assert_allclose(image.GetDirection(), reference.GetDirection(), atol=1e-9)
        assert set(np.unique(result.mask(0))) <= {0, 1}
        uncertainty = result.uncertainty()
        assert uncertainty.array.dtype == np.float32 and 0 <= uncertainty.array.min() <= uncertainty.array.max() <= 1
        assert len(result.thumbnailPaths) == 2
        assert max(sitk.ReadImage(result.thumbnailPaths[0]).GetSize()) == 64


def test_a_size_warning_comes_back_with_the_proposals(client, ct_file, size_checked_model_dir, tmp_path):
    event = client.wait(client.send("segment", **_request(ct_file, size_checked_model_dir, tmp_path / "a")), timeout=600)
    liver, kidney = proposalsFromResult(event)
    assert liver.warning.startswith("the liver found measures") and kidney.warning is None


def test_a_doubtful_scan_is_said_with_every_result(client, shared_data, size_checked_model_dir, tmp_path):
    mr = str(shared_data / "chaos_t2/imagesTr/chaos_t2_01.nii.gz")  # an MR, given to a CT model
    request = {**_request(mr, size_checked_model_dir, tmp_path / "a"), "num_proposals": 1}
    liver, kidney = proposalsFromResult(client.wait(client.send("segment", **request), timeout=600))
    assert kidney.warning.startswith("the scan does not look like a CT in Hounsfield units")
    scan_note, size_note = liver.warning.split("; the liver found measures")  # the scan first, then the size
    assert scan_note == kidney.warning


def test_the_worker_stays_warm_and_a_seed_reproduces_its_proposal(client, ct_file, tiny_model_dir, tmp_path):
    first = client.wait(client.send("segment", **_request(ct_file, tiny_model_dir, tmp_path / "a", prompts=["liver"])),
                        timeout=600)
    pid, progress = client._process.pid, []
    # proposal 2 of seed 7 is proposal 1 of seed 8
    second = client.wait(client.send("segment", **_request(ct_file, tiny_model_dir, tmp_path / "b", prompts=["liver"],
                                                           seed=8, num_proposals=1)),
                         onEvent=progress.append, timeout=600)
    assert client._process.pid == pid
    assert "load" not in [e["stage"] for e in progress]
    np.testing.assert_array_equal(proposalsFromResult(first)[0].mask(1), proposalsFromResult(second)[0].mask(0))


def test_user_errors_come_back_as_messages_and_the_worker_keeps_serving(client, ct_file, tiny_model_dir, tmp_path):
    not_an_image = tmp_path / "notes.nrrd"
    not_an_image.write_text("this is not an image")
    cases = [
        (dict(input=str(not_an_image)), "cannot read"),
        (dict(prompts=["livr"]), "liver"),
        (dict(prompts=["aorta"]), "cannot segment"),
        (dict(model=str(tmp_path / "no-such-model")), "does not exist"),
        (dict(num_proposals=0), "num_proposals"),
    ]
    if not torch.cuda.is_available():
        cases.append((dict(device="cuda"), "no CUDA GPU"))
    client.start()
    pid = client._process.pid
    for overrides, message in cases:
        with pytest.raises(WorkerError, match=message):
            client.wait(client.send("segment", **_request(ct_file, tiny_model_dir, tmp_path / "out", **overrides)),
                        timeout=600)
    assert client._process.pid == pid


def test_cancel_kills_the_worker_mid_run_and_the_next_request_starts_a_new_one(ct_file, tiny_model_dir, tmp_path):
    client = WorkerClient(workerLauncher(sys.executable, REPO))
    try:
        requestId = client.send("segment", **_request(ct_file, tiny_model_dir, tmp_path / "long", num_proposals=16,
                                                      steps=50))
        deadline, sampling = time.monotonic() + 600, False
        while not sampling and time.monotonic() < deadline:
            sampling = any(e.get("stage") == "sample" for e in client.poll(requestId))
            time.sleep(0.02)
        assert sampling, "sampling did not start"
        process = psutil.Process(client._process.pid)
        tree = [process] + process.children(recursive=True)

        client.cancel()

        assert not client.isRunning()
        assert all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in tree)
        assert client.poll(requestId)[-1] == {"id": requestId, "type": "cancelled", "message": "Cancelled by the user."}
        event = client.wait(client.send("segment", **_request(ct_file, tiny_model_dir, tmp_path / "again",
                                                              prompts=["spleen"], num_proposals=1)), timeout=600)
        assert proposalsFromResult(event)[0].structure == "spleen"
    finally:
        client.stop()


def test_an_idle_worker_exits_by_itself_and_the_next_request_starts_another(ct_file, tiny_model_dir, tmp_path):
    # 0.01 minutes (0.6 s) idle ends the worker; a request taking longer (loading the model alone does) does not
    environment = dict(os.environ, TEXTDIFFSEG_WORKER_IDLE_MINUTES="0.01")
    client = WorkerClient(workerLauncher(sys.executable, REPO, environment))
    request = _request(ct_file, tiny_model_dir, tmp_path / "a", prompts=["liver"], num_proposals=1)
    try:
        client.wait(client.send("segment", **request), timeout=600)
        first = client._process
        assert first.wait(timeout=60) == 0  # a clean exit, with its stdin still open: it ended itself
        assert not client.isRunning()

        event = client.wait(client.send("segment", **request), timeout=600)
        assert proposalsFromResult(event)[0].structure == "liver" and client._process is not first
    finally:
        client.stop()


def test_a_model_download_shows_as_progress_and_unknown_commands_are_refused(monkeypatch, ct_file, tiny_model_dir,
                                                                              tmp_path):
    from TextDiffSegLib import worker

    def resolve(model, progress):  # the registry downloading a 100 MB model
        assert model == "big-model"
        for megabytes in (0, 50, 100):
            progress(megabytes * 10**6, 100 * 10**6)
        return tiny_model_dir

    monkeypatch.setattr(worker, "resolve_model", resolve)
    events = []
    serve = worker.Worker(events.append)
    serve.handle({"id": 5, "command": "segment",
                  **_request(ct_file, tiny_model_dir, tmp_path, model="big-model", prompts=["liver"], num_proposals=1)})
    downloads = [event for event in events if event.get("stage") == "download"]
    assert [event["fraction"] for event in downloads] == [0, 0.5, 1.0]
    assert downloads[-1]["message"] == "downloading the model: 100 of 100 MB"
    assert events[-1]["type"] == "result" and all(event["id"] == 5 for event in events)

    serve.handle({"id": 6, "command": "dance"})
    assert events[-1] == {"id": 6, "type": "error",
                          "message": "unknown worker command 'dance'; expected 'segment' or 'shutdown'"}


def test_malformed_requests_are_answered_and_shutdown_ends_the_worker():
    requests = 'not json\n[1, 2]\n\n{"command": "shutdown"}\n{"id": 9, "command": "segment"}\n'
    result = subprocess.run([sys.executable, "-m", "TextDiffSegLib.worker"], input=requests, cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(e["id"], e["type"]) for e in events] == [(None, "error"), (None, "error")]  # nothing after shutdown
    assert "malformed request" in events[0]["message"] and "not a JSON object" in events[1]["message"]
