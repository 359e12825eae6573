"""MRML conversion without Qt: volume nodes to and from ``Volume``, masks to and from segments.

Slicer nodes place voxels in RAS patient coordinates; ``Volume`` (like SimpleITK and the engine)
uses LPS. The two differ by the sign of the first two axes; that flip happens here and nowhere else.
Only MRML and VTK classes are used, so this runs in Slicer and on the ``slicer-core`` wheel alike.
"""

from __future__ import annotations

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from TextDiffSegLib.volume import Volume

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: Prefix of the segment tags that record how a segment was made (prompt, model, seed, proposal).
TAG_PREFIX = "TextDiffSeg."


# --- geometry ----------------------------------------------------------------------------------


def ijkToRasFromVolume(volume: Volume) -> np.ndarray:
    """The 4x4 matrix from voxel index (i, j, k) = (x, y, z) to RAS mm."""
    ijkToLps = np.eye(4)
    ijkToLps[:3, :3] = np.asarray(volume.direction, dtype=float).reshape(3, 3) * np.asarray(volume.spacing, dtype=float)
    ijkToLps[:3, 3] = volume.origin
    return LPS_TO_RAS @ ijkToLps


def ijkToRasFromNode(volumeNode) -> np.ndarray:
    """A volume node's IJK-to-RAS matrix (without parent transforms) as a 4x4 array."""
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return _arrayFromVtkMatrix(matrix)


def _geometryFromIjkToRas(ijkToRas: np.ndarray) -> tuple[tuple, tuple, tuple]:
    """``(spacing, origin, direction)`` in ``Volume``'s LPS conventions."""
    ijkToLps = LPS_TO_RAS @ ijkToRas  # the flip is its own inverse
    axes = ijkToLps[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    direction = axes / spacing
    return tuple(map(float, spacing)), tuple(map(float, ijkToLps[:3, 3])), tuple(map(float, direction.ravel()))


def _vtkMatrixFromArray(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for row in range(4):
        for column in range(4):
            matrix.SetElement(row, column, float(array[row, column]))
    return matrix


def _arrayFromVtkMatrix(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(row, column) for column in range(4)] for row in range(4)])


def _imageDataFromArray(array: np.ndarray, imageData=None):
    """``array[z, y, x]`` copied into a vtkImageData (or the given one) of dimensions (x, y, z)."""
    array = np.ascontiguousarray(array)
    if array.ndim != 3:
        raise ValueError(f"expected a 3D array [z, y, x], got shape {array.shape}")
    imageData = imageData if imageData is not None else vtk.vtkImageData()
    imageData.SetDimensions(*reversed(array.shape))
    imageData.SetOrigin(0.0, 0.0, 0.0)
    imageData.SetSpacing(1.0, 1.0, 1.0)
    imageData.GetPointData().SetScalars(numpy_support.numpy_to_vtk(array.ravel(), deep=True))
    return imageData


def _arrayFromImageData(imageData) -> np.ndarray:
    """A copy of a vtkImageData's scalars as an array indexed [z, y, x]."""
    shape = tuple(reversed(imageData.GetDimensions()))
    return numpy_support.vtk_to_numpy(imageData.GetPointData().GetScalars()).reshape(shape).copy()


# --- volumes -----------------------------------------------------------------------------------


def volumeFromNode(volumeNode) -> Volume:
    """The voxels (copied) and geometry of a scalar volume node, in LPS.

    The geometry is the node's own; a parent transform is not applied (results come back on this
    same grid and are placed under the same transform, see ``addSegment``).
    """
    imageData = volumeNode.GetImageData() if volumeNode is not None else None
    if imageData is None or imageData.GetPointData().GetScalars() is None:
        raise ValueError("the input volume holds no image data; load an image or choose another volume")
    if imageData.GetNumberOfScalarComponents() != 1:
        raise ValueError(
            f"the input volume has {imageData.GetNumberOfScalarComponents()} components per voxel; "
            "TextDiffSeg needs a scalar (grey-level) CT or MR volume"
        )
    spacing, origin, direction = _geometryFromIjkToRas(ijkToRasFromNode(volumeNode))
    return Volume(_arrayFromImageData(imageData), spacing, origin, direction)


def updateNodeFromVolume(volumeNode, volume: Volume) -> None:
    """Set a volume node's voxels (copied) and geometry from a ``Volume``."""
    imageData = _imageDataFromArray(np.asarray(volume.array))
    volumeNode.SetIJKToRASMatrix(_vtkMatrixFromArray(ijkToRasFromVolume(volume)))
    volumeNode.SetAndObserveImageData(imageData)


def defaultInputVolume(scene):
    """The first volume the module's input selector offers, or None: a plain scalar volume not hidden from editors.

    The selector shows neither subclasses (labelmaps, vector volumes) nor hidden nodes, such as the
    module's own uncertainty map.
    """
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
        volumeNode = scene.GetNthNodeByClass(index, "vtkMRMLScalarVolumeNode")
        if volumeNode.GetClassName() == "vtkMRMLScalarVolumeNode" and not volumeNode.GetHideFromEditors():
            return volumeNode
    return None


def addVolumeNode(scene, volume: Volume, name: str, className: str = "vtkMRMLScalarVolumeNode"):
    """A new volume node in the scene holding the volume, with default display and storage nodes."""
    volumeNode = scene.AddNewNodeByClass(className, name)
    updateNodeFromVolume(volumeNode, volume)
    volumeNode.CreateDefaultDisplayNodes()
    return volumeNode


# --- segments ----------------------------------------------------------------------------------


def uniqueSegmentName(segmentationNode, name: str) -> str:
    """``name`` if no segment has it yet, else ``"name (2)"``, ``"name (3)"``... whichever is free."""
    segmentation = segmentationNode.GetSegmentation()
    candidate, number = name, 2
    while segmentation.GetSegmentIdBySegmentName(candidate):
        candidate, number = f"{name} ({number})", number + 1
    return candidate


def orientedImageFromMask(mask: np.ndarray, ijkToRas: np.ndarray):
    """A binary ``vtkOrientedImageData`` (uint8, 0/1) holding ``mask[z, y, x]`` on the given grid."""
    image = slicer.vtkOrientedImageData()
    _imageDataFromArray((np.asarray(mask) != 0).astype(np.uint8), image)
    image.SetImageToWorldMatrix(_vtkMatrixFromArray(ijkToRas))
    return image


def addSegment(
    segmentationNode,
    volumeNode,
    mask: np.ndarray,
    name: str,
    color: tuple[int, int, int],
    terminologyEntry: str = "",
    tags: dict[str, object] | None = None,
) -> str:
    """Add ``mask`` (on ``volumeNode``'s grid) as a new segment; returns the new segment's ID.

    Existing segments are never changed: when ``name`` is taken the new segment is called
    ``"name (2)"`` and so on. ``color`` is 0-255 RGB; ``terminologyEntry`` is Slicer's terminology
    string; ``tags`` are stored as ``TextDiffSeg.<key>`` segment tags (``|`` in values becomes ``/``,
    as Slicer's file format separates tags with it).
    """
    mask = np.asarray(mask)
    if volumeNode.GetImageData() is None or mask.shape != tuple(reversed(volumeNode.GetImageData().GetDimensions())):
        raise ValueError(f"the mask's shape {mask.shape} is not the grid of the volume {volumeNode.GetName()!r}")
    segmentation = segmentationNode.GetSegmentation()
    if segmentation.GetNumberOfSegments() == 0:  # nothing to keep: take the volume's grid
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)

    segment = slicer.vtkSegment()
    segment.SetName(uniqueSegmentName(segmentationNode, name))
    segment.SetColor(*(channel / 255.0 for channel in color))
    if terminologyEntry:
        segment.SetTag(segment.GetTerminologyEntryTagName(), terminologyEntry)
    for key, value in (tags or {}).items():
        segment.SetTag(TAG_PREFIX + key, str(value).replace("|", "/"))
    segmentId = segmentation.GenerateUniqueSegmentID(segment.GetName())
    segmentation.AddSegment(segment, segmentId)

    image = orientedImageFromMask(mask, ijkToRasFromNode(volumeNode))
    volumeParent, segmentationParent = volumeNode.GetParentTransformNode(), segmentationNode.GetParentTransformNode()
    if volumeParent is not segmentationParent:
        volumeToSegmentation = vtk.vtkGeneralTransform()
        slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(volumeParent, segmentationParent, volumeToSegmentation)
        slicer.vtkOrientedImageDataResample.TransformOrientedImage(image, volumeToSegmentation)
    if not slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        image, segmentationNode, segmentId, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE, image.GetExtent()
    ):
        segmentation.RemoveSegment(segmentId)
        raise RuntimeError(f"Slicer could not store the mask of segment {segment.GetName()!r}")
    return segmentId


def maskFromSegment(segmentationNode, segmentId: str, volumeNode) -> np.ndarray:
    """A segment as a uint8 0/1 array on ``volumeNode``'s grid (both nodes in the same transform)."""
    labelmap = slicer.vtkOrientedImageData()
    if not segmentationNode.GetBinaryLabelmapRepresentation(segmentId, labelmap):
        raise ValueError(f"segment {segmentId!r} has no binary labelmap representation")
    reference = slicer.vtkOrientedImageData()
    reference.SetExtent(volumeNode.GetImageData().GetExtent())
    reference.SetImageToWorldMatrix(_vtkMatrixFromArray(ijkToRasFromNode(volumeNode)))
    resampled = slicer.vtkOrientedImageData()
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(labelmap, reference, resampled)
    return (_arrayFromImageData(resampled) != 0).astype(np.uint8)


def replaceSegments(segmentationNode, volumeNode, masks: dict[str, np.ndarray], color: tuple[int, int, int]) -> None:
    """Make the segmentation hold exactly ``masks`` (name to mask), all in one colour: a preview."""
    segmentationNode.GetSegmentation().RemoveAllSegments()
    for name, mask in masks.items():
        addSegment(segmentationNode, volumeNode, mask, name, color)
