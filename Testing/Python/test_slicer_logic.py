"""The module's Logic on Slicer's real MRML classes, with the real worker process and a tiny model.

Slicer's application object and its GUI-only Python modules (``qt``, ``slicer.i18n``,
``slicer.ScriptedLoadableModule``, ``slicer.parameterNodeWrapper``) exist only inside Slicer. The
few the Logic touches are replaced by minimal stand-ins (an application with a temporary folder, a
scene, a markups logic and a slice-view setter that record what they are asked), so the Logic's own
code runs here: a volume node to the worker and back, proposals into segments, preview and
uncertainty nodes, polling and cancel, one worker shared by every Logic. The module's
ScriptedLoadableModuleTest covers the rest in Slicer.
"""

import dataclasses
import json
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import vtk

slicer = pytest.importorskip("slicer")

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "TextDiffSeg"))
from TextDiffSegHelpers import mrml  # noqa: E402
from TextDiffSegHelpers.worker_client import WorkerClient, workerLauncher  # noqa: E402

from TextDiffSegLib import terminology  # noqa: E402
from TextDiffSegLib.errors import PromptError  # noqa: E402
from TextDiffSegLib.fusion import fuse  # noqa: E402
from TextDiffSegLib.volume import from_sitk  # noqa: E402

pytestmark = pytest.mark.realdata


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))


def _standIns(tmp_path) -> dict[str, types.ModuleType]:
    def module(name, **attributes):
        stand_in = types.ModuleType(name)
        stand_in.__dict__.update(attributes)
        return stand_in

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            pass

    return {
        "qt": module("qt"),
        "slicer.i18n": module("slicer.i18n", tr=lambda text: text, translate=lambda context, text: text),
        "slicer.ScriptedLoadableModule": module(
            "slicer.ScriptedLoadableModule", ScriptedLoadableModuleLogic=ScriptedLoadableModuleLogic,
            **{name: type(name, (), {}) for name in
               ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleTest")}),
        "slicer.parameterNodeWrapper": module(
            "slicer.parameterNodeWrapper", parameterNodeWrapper=lambda cls: cls, Choice=lambda choices: None,
            WithinRange=lambda low, high: None),
        "slicer.parameterNodeWrapper.guiConnectors": module(
            "slicer.parameterNodeWrapper.guiConnectors",
            QLineEditToStrConnector=type("QLineEditToStrConnector", (), {})),
    }


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model_dir, shared_data):
    """The TextDiffSeg module imported with the stand-ins, a scene, a real CT volume node, a Logic and the worker
    client every Logic shares (running the worker with this Python instead of PythonSlicer)."""
    tmp_path = tmp_path_factory.mktemp("slicer")
    scene = slicer.vtkMRMLScene()
    slicer.vtkSlicerSegmentationsModuleLogic().SetMRMLScene(scene)
    jumps, layers = Recorder(), Recorder()
    with pytest.MonkeyPatch.context() as patch:
        for name, stand_in in _standIns(tmp_path).items():
            patch.setitem(sys.modules, name, stand_in)
        patch.setattr(slicer, "app", types.SimpleNamespace(temporaryPath=str(tmp_path), testingEnabled=lambda: True),
                      raising=False)
        patch.setattr(slicer, "mrmlScene", scene, raising=False)
        markups = types.SimpleNamespace(logic=lambda: types.SimpleNamespace(JumpSlicesToLocation=jumps))
        patch.setattr(slicer, "modules", types.SimpleNamespace(markups=markups), raising=False)
        patch.setattr(slicer.util, "setSliceViewerLayers", layers)
        sys.modules.pop("TextDiffSeg", None)
        import TextDiffSeg

        image = sitk.ReadImage(str(shared_data / "btcv/imagesTr/btcv_0005.nii.gz"))[20:240, 30:230, 50:90]
        volumeNode = mrml.addVolumeNode(scene, from_sitk(image), "btcv_0005")
        worker = WorkerClient(workerLauncher(sys.executable, REPO))
        patch.setattr(TextDiffSeg, "_sharedWorker", worker)
        logic = TextDiffSeg.TextDiffSegLogic()
        yield types.SimpleNamespace(module=TextDiffSeg, scene=scene, volumeNode=volumeNode, logic=logic, worker=worker,
                                    model=str(tiny_model_dir), jumps=jumps, layers=layers)
        logic.cleanup()
        worker.stop()
        sys.modules.pop("TextDiffSeg", None)


@pytest.fixture(scope="module")
def console_run(env):
    """``segment`` as typed in Slicer's Python console, with a segmentation to add the fusions to."""
    segmentationNode = env.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "console")
    progress = []
    proposals = env.logic.segment(env.volumeNode, "liver; left kidney", numProposals=2, model=env.model, device="cpu",
                                  segmentationNode=segmentationNode, progressCallback=progress.append)
    return proposals, segmentationNode, progress


def _tag(segment, name):
    value = vtk.reference("")
    assert segment.GetTag(name, value), name
    return str(value)


def test_segment_returns_proposals_and_adds_each_prompts_fusion(env, console_run):
    proposals, segmentationNode, progress = console_run
    assert [p.structure for p in proposals] == ["liver", "kidney_left"]
    assert all(len(p) == 2 and p.seeds == [0, 1] for p in proposals)
    assert progress and {event["type"] for event in progress} == {"progress"}
    assert not env.logic.isRunning()

    segmentation = segmentationNode.GetSegmentation()
    assert [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())] == [
        "liver", "left kidney"]
    kidney = segmentation.GetNthSegment(1)
    assert _tag(kidney, kidney.GetTerminologyEntryTagName()) == terminology.terminology_entry("kidney_left")
    assert _tag(kidney, "TextDiffSeg.proposal") == "fused 1,2" and _tag(kidney, "TextDiffSeg.seed") == "0,1"
    assert _tag(kidney, "TextDiffSeg.prompt") == "left kidney" and _tag(kidney, "TextDiffSeg.model") == "tiny"
    np.testing.assert_allclose(kidney.GetColor(), np.array(terminology.get_structure("kidney_left").color) / 255)
    np.testing.assert_array_equal(
        mrml.maskFromSegment(segmentationNode, segmentation.GetNthSegmentID(0), env.volumeNode), proposals[0].fusedMask())


def test_accept_and_fuse_add_new_segments_and_keep_the_old(env, console_run):
    proposals, segmentationNode, _ = console_run
    liver = proposals[0]
    before = mrml.maskFromSegment(segmentationNode, segmentationNode.GetSegmentation().GetNthSegmentID(0), env.volumeNode)

    acceptedId = env.logic.acceptProposal(liver, 2, env.volumeNode, segmentationNode)
    fusedId = env.logic.fuseProposals(liver, [2, 1], env.volumeNode, segmentationNode)

    segmentation = segmentationNode.GetSegmentation()
    accepted, fused = segmentation.GetSegment(acceptedId), segmentation.GetSegment(fusedId)
    assert (accepted.GetName(), fused.GetName()) == ("liver (2)", "liver (3)")
    assert (_tag(accepted, "TextDiffSeg.proposal"), _tag(accepted, "TextDiffSeg.seed")) == ("2", "1")
    assert _tag(fused, "TextDiffSeg.proposal") == "fused 1,2"
    np.testing.assert_array_equal(mrml.maskFromSegment(segmentationNode, acceptedId, env.volumeNode), liver.mask(1))
    np.testing.assert_array_equal(mrml.maskFromSegment(segmentationNode, fusedId, env.volumeNode),
                                  fuse([liver.mask(0), liver.mask(1)]))
    np.testing.assert_array_equal(
        mrml.maskFromSegment(segmentationNode, segmentation.GetNthSegmentID(0), env.volumeNode), before)
    # An ensemble's proposals: each segment names the models of the proposals it is made of.
    ensemble = dataclasses.replace(liver, model="tiny,other", models=["tiny", "other"])
    segment = segmentation.GetSegment(env.logic.acceptProposal(ensemble, 2, env.volumeNode, segmentationNode))
    assert _tag(segment, "TextDiffSeg.model") == "other"
    segment = segmentation.GetSegment(env.logic.fuseProposals(ensemble, [1, 2], env.volumeNode, segmentationNode))
    assert _tag(segment, "TextDiffSeg.model") == "tiny,other"
    with pytest.raises(ValueError, match="at least two"):
        env.logic.fuseProposals(liver, [1], env.volumeNode, segmentationNode)
    with pytest.raises(ValueError, match="no proposal 3"):
        env.logic.acceptProposal(liver, 3, env.volumeNode, segmentationNode)


def test_a_misspelt_prompt_or_no_volume_fails_before_the_worker_is_asked(env):
    with pytest.raises(PromptError, match="liver"):
        env.logic.segment(env.volumeNode, "livr")
    with pytest.raises(ValueError, match="input volume"):
        env.logic.segment(None, "liver")
    assert not env.logic.isRunning()


def test_model_weights_reach_the_worker_as_a_file_or_as_the_weights(env, tmp_path):
    from TextDiffSegHelpers.worker_client import WorkerError

    weights = {"liver": {"tiny": 1}}
    weightsFile = tmp_path / "weights.json"
    weightsFile.write_text(json.dumps(weights))
    # one model given weights: the worker read them, and says they need an ensemble (or that it cannot read them)
    for modelWeights, message in ((weights, "ask several models together"), (weightsFile, "ask several models together"),
                                  (str(tmp_path / "missing.json"), "cannot read the model weights")):
        with pytest.raises(WorkerError, match=message):
            env.logic.segment(env.volumeNode, "liver", numProposals=1, model=env.model, device="cpu",
                              modelWeights=modelWeights)
        assert not env.logic.isRunning()


def test_the_gui_polls_for_results_and_can_cancel(env):
    requestId = env.logic.segment(env.volumeNode, ["spleen"], numProposals=1, model=env.model, device="auto",
                                  waitForCompletion=False)
    assert env.logic.isRunning()
    events, deadline = [], time.monotonic() + 600
    while env.logic.isRunning() and time.monotonic() < deadline:
        events += env.logic.pollEvents()
        time.sleep(0.05)
    assert events[-1]["type"] == "result" and all(e["id"] == requestId for e in events)
    assert events[-1]["proposals"][0].structure == "spleen"
    assert max(sitk.ReadImage(events[-1]["proposals"][0].thumbnailPaths[0]).GetSize()) == env.module.THUMBNAIL_SIZE

    env.logic.segment(env.volumeNode, "liver", numProposals=1, model=env.model, waitForCompletion=False)
    env.logic.cancel()
    assert not env.logic.isRunning() and env.logic.pollEvents() == []


def test_every_logic_shares_one_worker_and_gets_its_own_results(env):
    other = env.module.TextDiffSegLogic()  # as made in the Python console, beside the GUI's
    try:
        for logic, prompt in ((env.logic, "spleen"), (other, "liver")):
            logic.segment(env.volumeNode, prompt, numProposals=1, model=env.model, device="cpu",
                          waitForCompletion=False)
        worker = env.worker._process
        events, deadline = {env.logic: [], other: []}, time.monotonic() + 600
        while (env.logic.isRunning() or other.isRunning()) and time.monotonic() < deadline:
            for logic in events:
                events[logic] += logic.pollEvents()
            time.sleep(0.05)
        assert [events[logic][-1]["type"] for logic in events] == ["result", "result"]
        assert [events[logic][-1]["proposals"][0].structure for logic in events] == ["spleen", "liver"]
        assert env.module.sharedWorker() is env.worker and env.worker._process is worker and worker.poll() is None
    finally:
        other.cleanup()


def test_selected_proposals_are_previewed_and_the_uncertainty_shown(env, console_run):
    liver = console_run[0][0]
    env.logic.showProposals(liver, [2, 1], env.volumeNode)

    preview = [n for n in slicer.util.getNodesByClass("vtkMRMLSegmentationNode") if n.GetAttribute("TextDiffSeg.Role")]
    assert len(preview) == 1 and preview[0].GetHideFromEditors() and not preview[0].GetSaveWithScene()
    segmentation = preview[0].GetSegmentation()
    assert [segmentation.GetNthSegment(i).GetName() for i in range(2)] == ["liver #2", "liver #1"]
    if liver.mask(1).any():  # the slice views go to the first selected proposal's centre
        centre = np.append(np.argwhere(liver.mask(1)).mean(axis=0)[::-1], 1.0)
        np.testing.assert_allclose(env.jumps.calls[-1][0][:3], (mrml.ijkToRasFromNode(env.volumeNode) @ centre)[:3])
    env.logic.clearPreview()
    assert segmentation.GetNumberOfSegments() == 0

    env.logic.showUncertainty(liver, env.volumeNode)
    node = env.layers.calls[-1][1]["foreground"]
    np.testing.assert_array_equal(mrml.volumeFromNode(node).array, liver.uncertainty().array)
    assert node.GetDisplayNode().GetColorNodeID() == "vtkMRMLColorTableNodeFileInferno.txt"
    env.logic.showUncertainty(None, env.volumeNode)
    assert env.layers.calls[-1][1] == {"foreground": None}
