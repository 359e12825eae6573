"""The module's Qt-free MRML helper on Slicer's real MRML classes (the slicer-core wheel).

A real CT becomes a volume node and back with identical geometry (checked against Slicer's own
reader, which does its own LPS to RAS conversion); proposals become segments with names, colours,
terminology and tags that survive a ``.seg.nrrd`` save and reload; existing segments are kept.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer")
import vtk  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "TextDiffSeg"))
from TextDiffSegHelpers import mrml  # noqa: E402

from TextDiffSegLib import terminology  # noqa: E402
from TextDiffSegLib.volume import Volume, from_sitk, write_volume  # noqa: E402

CASE = "btcv/imagesTr/btcv_0005.nii.gz"
LABEL = "btcv/labelsTr/btcv_0005.nii.gz"
BTCV_LIVER, BTCV_SPLEEN = 6, 1


@pytest.fixture
def scene():
    scene = slicer.vtkMRMLScene()
    slicer.vtkSlicerSegmentationsModuleLogic().SetMRMLScene(scene)
    return scene


@pytest.fixture(scope="module")
def ct(shared_data) -> Volume:
    return from_sitk(sitk.ReadImage(str(shared_data / CASE)))


@pytest.fixture(scope="module")
def labels(shared_data) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(shared_data / LABEL)))


def _oblique(volume: Volume) -> Volume:
    """The same voxels with a rotated (oblique) direction and an odd origin."""
    angle_z, angle_x = np.deg2rad(20.0), np.deg2rad(-12.0)
    rz = np.array([[np.cos(angle_z), -np.sin(angle_z), 0], [np.sin(angle_z), np.cos(angle_z), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(angle_x), -np.sin(angle_x)], [0, np.sin(angle_x), np.cos(angle_x)]])
    direction = rz @ rx @ np.diag([1.0, -1.0, 1.0])  # a flipped axis too
    return Volume(volume.array, volume.spacing, (12.5, -40.25, 77.0), tuple(direction.ravel()))


def _readWithSlicer(scene, path: Path):
    """A volume node read by Slicer's own archetype reader (ITK inside, LPS to RAS done by Slicer)."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "read by Slicer")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    node.SetAndObserveStorageNodeID(storage.GetID())
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    return node


def _assertSameGeometry(a: Volume, b: Volume):
    np.testing.assert_allclose(a.spacing, b.spacing, rtol=0, atol=1e-9)
    np.testing.assert_allclose(a.origin, b.origin, rtol=0, atol=1e-9)
    np.testing.assert_allclose(a.direction, b.direction, rtol=0, atol=1e-12)


@pytest.mark.realdata
def test_ct_round_trips_through_a_volume_node(scene, ct):
    node = mrml.addVolumeNode(scene, ct, "btcv_0005")
    back = mrml.volumeFromNode(node)
    assert back.array.dtype == ct.array.dtype and back.array.shape == ct.array.shape
    np.testing.assert_array_equal(back.array, ct.array)
    _assertSameGeometry(back, ct)
    # RAS in the node: SimpleITK's LPS origin (0, 0, 0) and identity direction flip in x and y
    np.testing.assert_allclose(node.GetSpacing(), ct.spacing)
    ijkToRas = mrml.ijkToRasFromNode(node)
    np.testing.assert_allclose(np.diag(ijkToRas)[:3], [-ct.spacing[0], -ct.spacing[1], ct.spacing[2]])


@pytest.mark.realdata
def test_geometry_agrees_with_slicers_own_reader(scene, ct, shared_data):
    slicerNode = _readWithSlicer(scene, shared_data / CASE)
    np.testing.assert_allclose(mrml.ijkToRasFromNode(slicerNode), mrml.ijkToRasFromVolume(ct), atol=1e-6)
    fromSlicer = mrml.volumeFromNode(slicerNode)
    np.testing.assert_array_equal(fromSlicer.array, ct.array)
    np.testing.assert_allclose(fromSlicer.origin, ct.origin, atol=1e-6)
    np.testing.assert_allclose(fromSlicer.direction, ct.direction, atol=1e-6)


@pytest.mark.realdata
def test_oblique_geometry_round_trips_and_agrees_with_slicer(scene, ct, tmp_path):
    oblique = _oblique(ct)
    back = mrml.volumeFromNode(mrml.addVolumeNode(scene, oblique, "oblique"))
    np.testing.assert_array_equal(back.array, oblique.array)
    _assertSameGeometry(back, oblique)

    # Slicer's reader puts the same voxels at the same RAS points, though it may index them
    # differently: with this left-handed direction it reverses k to keep its grid right-handed
    path = write_volume(tmp_path / "oblique.nrrd", oblique)
    slicerNode = _readWithSlicer(scene, path)
    _assertSameImageInSpace(mrml.volumeFromNode(slicerNode), oblique)
    _assertSameImageInSpace(back, oblique)


def _assertSameImageInSpace(a: Volume, b: Volume):
    """a and b hold the same voxel values at the same LPS points (their grids may differ by axis flips)."""
    aToB = np.linalg.inv(_ijkToLps(b)) @ _ijkToLps(a)  # a's voxel index to b's voxel index
    np.testing.assert_allclose(aToB, np.round(aToB), atol=1e-6)
    aToB = np.round(aToB).astype(int)
    assert sorted(np.abs(aToB[:3, :3]).sum(axis=0)) == [1, 1, 1], "the grids differ by more than axis flips"
    k, j, i = np.meshgrid(*(np.arange(n) for n in a.array.shape), indexing="ij")
    ijkInB = aToB[:3, :3] @ np.stack([i.ravel(), j.ravel(), k.ravel()]) + aToB[:3, 3:]
    np.testing.assert_array_equal(a.array.ravel(), b.array[ijkInB[2], ijkInB[1], ijkInB[0]])


def _ijkToLps(volume: Volume) -> np.ndarray:
    return mrml.LPS_TO_RAS @ mrml.ijkToRasFromVolume(volume)


def _tag(segment, name: str) -> str:
    value = vtk.reference("")
    assert segment.GetTag(name, value), f"segment {segment.GetName()!r} has no tag {name!r}"
    return str(value)


def _segmentationFor(scene, volumeNode):
    segmentationNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "TextDiffSeg")
    segmentationNode.CreateDefaultDisplayNodes()
    segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
    return segmentationNode


@pytest.mark.realdata
def test_proposals_become_segments_with_name_colour_terminology_and_tags(scene, ct, labels, tmp_path):
    volumeNode = mrml.addVolumeNode(scene, ct, "btcv_0005")
    segmentationNode = _segmentationFor(scene, volumeNode)
    liver, spleen = terminology.get_structure("liver"), terminology.get_structure("spleen")
    liverMask = (labels == BTCV_LIVER).astype(np.uint8)
    spleenMask = labels == BTCV_SPLEEN
    tags = {"prompt": "the liver | please", "model": "tiny", "seed": 3, "proposal": 2}
    liverId = mrml.addSegment(
        segmentationNode, volumeNode, liverMask, liver.display_name, liver.color, terminology.terminology_entry(liver), tags
    )
    spleenId = mrml.addSegment(segmentationNode, volumeNode, spleenMask, spleen.display_name, spleen.color,
                               terminology.terminology_entry(spleen), {"prompt": "spleen"})

    segment = segmentationNode.GetSegmentation().GetSegment(liverId)
    assert segment.GetName() == "liver"
    np.testing.assert_allclose(segment.GetColor(), np.array(liver.color) / 255.0)
    assert _tag(segment, segment.GetTerminologyEntryTagName()) == terminology.terminology_entry(liver)
    assert _tag(segment, "TextDiffSeg.prompt") == "the liver / please"
    assert _tag(segment, "TextDiffSeg.seed") == "3" and _tag(segment, "TextDiffSeg.proposal") == "2"
    np.testing.assert_array_equal(mrml.maskFromSegment(segmentationNode, liverId, volumeNode), liverMask)
    np.testing.assert_array_equal(mrml.maskFromSegment(segmentationNode, spleenId, volumeNode), spleenMask)

    # saved as .seg.nrrd and read back by Slicer's segmentation storage node
    path = tmp_path / "result.seg.nrrd"
    storage = segmentationNode.CreateDefaultStorageNode()
    scene.AddNode(storage)
    segmentationNode.SetAndObserveStorageNodeID(storage.GetID())
    storage.SetFileName(str(path))
    assert storage.WriteData(segmentationNode)

    reloaded = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "reloaded")
    reader = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    reloaded.SetAndObserveStorageNodeID(reader.GetID())
    reader.SetFileName(str(path))
    assert reader.ReadData(reloaded)
    segmentation = reloaded.GetSegmentation()
    assert [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())] == ["liver", "spleen"]
    again = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("liver"))
    np.testing.assert_allclose(again.GetColor(), np.array(liver.color) / 255.0, atol=1e-6)
    assert _tag(again, again.GetTerminologyEntryTagName()) == terminology.terminology_entry(liver)
    assert _tag(again, "TextDiffSeg.prompt") == "the liver / please"
    assert _tag(again, "TextDiffSeg.model") == "tiny"
    np.testing.assert_array_equal(
        mrml.maskFromSegment(reloaded, segmentation.GetSegmentIdBySegmentName("liver"), volumeNode), liverMask
    )


@pytest.mark.realdata
def test_an_existing_segment_of_the_same_name_survives(scene, ct, labels):
    volumeNode = mrml.addVolumeNode(scene, ct, "btcv_0005")
    segmentationNode = _segmentationFor(scene, volumeNode)
    manual = (labels == BTCV_LIVER).astype(np.uint8)
    manualId = mrml.addSegment(segmentationNode, volumeNode, manual, "liver", (200, 0, 0))
    proposal = np.zeros_like(manual)
    proposal[40:60, 100:150, 80:160] = 1

    secondId = mrml.addSegment(segmentationNode, volumeNode, proposal, "liver", (221, 130, 101))
    thirdId = mrml.addSegment(segmentationNode, volumeNode, proposal, "liver", (221, 130, 101))

    segmentation = segmentationNode.GetSegmentation()
    assert len({manualId, secondId, thirdId}) == 3
    assert [segmentation.GetSegment(i).GetName() for i in (manualId, secondId, thirdId)] == ["liver", "liver (2)", "liver (3)"]
    np.testing.assert_array_equal(mrml.maskFromSegment(segmentationNode, manualId, volumeNode), manual)
    np.testing.assert_allclose(segmentation.GetSegment(manualId).GetColor(), np.array([200, 0, 0]) / 255.0)
    np.testing.assert_array_equal(mrml.maskFromSegment(segmentationNode, secondId, volumeNode), proposal)


def test_a_segmentation_with_only_an_empty_segment_takes_the_proposal_on_an_oblique_grid(scene):
    direction = (1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, -1.0, 0.0)  # a coronal acquisition
    volume = Volume(np.zeros((10, 20, 30), np.int16), (1.5, 1.5, 3.0), (5.0, 6.0, 7.0), direction)
    volumeNode = mrml.addVolumeNode(scene, volume, "coronal")
    segmentationNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    existingId = segmentationNode.GetSegmentation().AddEmptySegment("", "liver")
    mask = np.zeros(volume.array.shape, np.uint8)
    mask[2:5, 3:9, 4:20] = 1
    segmentId = mrml.addSegment(segmentationNode, volumeNode, mask, "liver", (1, 2, 3))
    assert segmentationNode.GetSegmentation().GetSegment(segmentId).GetName() == "liver (2)"
    assert segmentationNode.GetSegmentation().GetSegment(existingId).GetName() == "liver"
    np.testing.assert_array_equal(mrml.maskFromSegment(segmentationNode, segmentId, volumeNode), mask)


def test_a_mask_off_the_volume_grid_is_refused(scene):
    volume = Volume(np.zeros((4, 5, 6), np.int16), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0))
    volumeNode = mrml.addVolumeNode(scene, volume, "small")
    segmentationNode = _segmentationFor(scene, volumeNode)
    with pytest.raises(ValueError, match="not the grid"):
        mrml.addSegment(segmentationNode, volumeNode, np.zeros((4, 5, 7), np.uint8), "liver", (1, 2, 3))
    assert segmentationNode.GetSegmentation().GetNumberOfSegments() == 0


def test_a_segment_follows_the_volumes_parent_transform(scene):
    volume = Volume(np.zeros((6, 7, 8), np.int16), (1.0, 1.5, 2.0), (10.0, 20.0, 30.0))
    volumeNode = mrml.addVolumeNode(scene, volume, "moved")
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 5.0)
    shift.SetElement(2, 3, -7.0)
    transformNode = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    transformNode.SetMatrixTransformToParent(shift)
    volumeNode.SetAndObserveTransformNodeID(transformNode.GetID())
    segmentationNode = _segmentationFor(scene, volumeNode)  # not transformed
    mask = np.zeros(volume.array.shape, np.uint8)
    mask[2:4, 3:5, 4:6] = 1

    segmentId = mrml.addSegment(segmentationNode, volumeNode, mask, "box", (1, 2, 3))

    labelmap = slicer.vtkOrientedImageData()
    segmentationNode.GetBinaryLabelmapRepresentation(segmentId, labelmap)
    imageToWorld = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(imageToWorld)
    volumeCorner = mrml.ijkToRasFromNode(volumeNode) @ np.array([4, 3, 2, 1.0])
    extent = labelmap.GetExtent()
    segmentCorner = mrml._arrayFromVtkMatrix(imageToWorld) @ np.array([extent[0], extent[2], extent[4], 1.0])
    np.testing.assert_allclose(segmentCorner[:3], volumeCorner[:3] + [5.0, 0.0, -7.0], atol=1e-6)


def test_preview_holds_exactly_the_given_masks(scene):
    volume = Volume(np.zeros((3, 4, 5), np.int16), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    volumeNode = mrml.addVolumeNode(scene, volume, "small")
    preview = _segmentationFor(scene, volumeNode)
    first = np.zeros((3, 4, 5), np.uint8)
    first[1, 1, 1] = 1
    mrml.replaceSegments(preview, volumeNode, {"#1": first, "#2": first}, (10, 20, 30))
    mrml.replaceSegments(preview, volumeNode, {"#3": first}, (10, 20, 30))
    segmentation = preview.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 1 and segmentation.GetNthSegment(0).GetName() == "#3"


def test_the_default_input_is_the_first_volume_the_input_selector_offers(scene):
    volume = Volume(np.zeros((3, 4, 5), np.int16), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    labelmap = mrml.addVolumeNode(scene, volume, "labels", "vtkMRMLLabelMapVolumeNode")
    uncertainty = mrml.addVolumeNode(scene, volume, "TextDiffSeg uncertainty")
    uncertainty.SetHideFromEditors(True)  # as the module makes it
    assert mrml.defaultInputVolume(scene) is None

    ct = mrml.addVolumeNode(scene, volume, "ct")
    assert scene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode") is labelmap  # which the module used to take
    assert mrml.defaultInputVolume(scene) is ct
