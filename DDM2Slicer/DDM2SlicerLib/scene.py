"""Scene <-> files: a DWI node out to the engine, the engine's results back in as nodes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import vtk
from vtk.util import numpy_support

import slicer

from DDM2SlicerLib.nrrdio import writeDwiNrrd

# Display of the scalar maps: colour table and fixed window (so input and denoised maps compare).
# Diffusivities are in mm^2/s; 3e-3 is about free water at body temperature, the top of tissue.
MAP_DISPLAY = {
    "fa": ("vtkMRMLColorTableNodeFileInferno.txt", 0.0, 1.0),
    "md": ("vtkMRMLColorTableNodeFileViridis.txt", 0.0, 3.0e-3),
    "ad": ("vtkMRMLColorTableNodeFileViridis.txt", 0.0, 3.0e-3),
    "rd": ("vtkMRMLColorTableNodeFileViridis.txt", 0.0, 3.0e-3),
}
MAP_NAMES = tuple(MAP_DISPLAY)
DWMRI_ATTRIBUTE_PREFIX = "DWMRI_"


def matrixToArray(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(row, column) for column in range(4)] for row in range(4)])


def ijkToRasArray(volumeNode) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return matrixToArray(matrix)


def measurementFrameArray(dwiNode) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    dwiNode.GetMeasurementFrameMatrix(matrix)
    return matrixToArray(matrix)[:3, :3]


def gradientTable(dwiNode) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3) gradients in the measurement frame and (N,) b-values of a DWI node."""
    gradients = numpy_support.vtk_to_numpy(dwiNode.GetDiffusionGradients()).reshape(-1, 3).astype(np.float64)
    bValues = numpy_support.vtk_to_numpy(dwiNode.GetBValues()).astype(np.float64)
    return gradients, bValues


def writeDwiNode(dwiNode, path: str | os.PathLike) -> Path:
    """Write a DWI node as a DWI NRRD (voxels, geometry, gradients, measurement frame, b-values)."""
    gradients, bValues = gradientTable(dwiNode)
    return writeDwiNrrd(path, slicer.util.arrayFromVolume(dwiNode), ijkToRasArray(dwiNode),
                        gradients, bValues, measurementFrameArray(dwiNode))


def removeNodeAndHelpers(node) -> None:
    """Remove a node with its display and storage nodes (a loaded-then-copied node leaves nothing)."""
    scene = node.GetScene()
    helpers = [node.GetNthDisplayNode(index) for index in range(node.GetNumberOfDisplayNodes())]
    helpers.append(node.GetStorageNode())
    for helper in helpers:
        if helper is not None:
            scene.RemoveNode(helper)
    scene.RemoveNode(node)


def readVoxels(path: str | os.PathLike, referenceNode) -> np.ndarray:
    """The voxels of an engine output, checked to lie on the reference node's voxel grid.

    The file is loaded through Slicer's reader into a throw-away node, so only its voxels are kept:
    none of its header keys (node attributes) can leak into the result.
    """
    loaded = slicer.util.loadVolume(str(path), {"show": False})
    try:
        if not np.allclose(ijkToRasArray(loaded), ijkToRasArray(referenceNode), atol=1e-3):
            raise RuntimeError(f"{Path(path).name} does not lie on the input's voxel grid; "
                               "the engine must keep the input's geometry")
        return np.array(slicer.util.arrayFromVolume(loaded), copy=True)
    finally:
        removeNodeAndHelpers(loaded)


def fillDwiNode(targetNode, referenceNode, voxels: np.ndarray):
    """Make ``targetNode`` a DWI with ``voxels`` and the reference's geometry and gradient table."""
    for name in targetNode.GetAttributeNames() or ():
        if name.startswith(DWMRI_ATTRIBUTE_PREFIX):
            targetNode.RemoveAttribute(name)  # stale keys would be re-emitted when the node is saved
    targetNode.CopyOrientation(referenceNode)
    frame = vtk.vtkMatrix4x4()
    referenceNode.GetMeasurementFrameMatrix(frame)
    targetNode.SetMeasurementFrameMatrix(frame)
    gradients = vtk.vtkDoubleArray()
    gradients.DeepCopy(referenceNode.GetDiffusionGradients())
    bValues = vtk.vtkDoubleArray()
    bValues.DeepCopy(referenceNode.GetBValues())
    targetNode.SetNumberOfGradients(referenceNode.GetNumberOfGradients())
    targetNode.SetDiffusionGradients(gradients)
    targetNode.SetBValues(bValues)
    slicer.util.updateVolumeFromArray(targetNode, np.asarray(voxels, dtype=np.float32))
    if targetNode.GetDisplayNode() is None:
        targetNode.CreateDefaultDisplayNodes()
    return targetNode


def newDwiNode(referenceNode, voxels: np.ndarray, name: str):
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLDiffusionWeightedVolumeNode",
                                              slicer.mrmlScene.GenerateUniqueName(name))
    return fillDwiNode(node, referenceNode, voxels)


def loadScalarVolume(path: str | os.PathLike, name: str, targetNode=None):
    """Load a 3-D engine output as a scalar volume (into ``targetNode`` when one is given)."""
    loaded = slicer.util.loadVolume(str(path), {"show": False, "name": name})
    if targetNode is None:
        return loaded
    targetNode.CopyOrientation(loaded)
    slicer.util.updateVolumeFromArray(targetNode, np.array(slicer.util.arrayFromVolume(loaded), copy=True))
    removeNodeAndHelpers(loaded)
    if targetNode.GetDisplayNode() is None:
        targetNode.CreateDefaultDisplayNodes()
    return targetNode


def setDisplay(volumeNode, colorNodeId: str, low: float, high: float) -> None:
    display = volumeNode.GetDisplayNode()
    if display is None:
        volumeNode.CreateDefaultDisplayNodes()
        display = volumeNode.GetDisplayNode()
    display.SetAndObserveColorNodeID(colorNodeId)
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(low, high)


def styleMap(volumeNode, mapName: str) -> None:
    """Colour map and fixed window of an FA/MD/AD/RD map."""
    setDisplay(volumeNode, *MAP_DISPLAY[mapName])


def styleResidualRms(volumeNode) -> None:
    """Grey, from 0 to the 99th percentile: the residual's structure, not its few outliers."""
    values = slicer.util.arrayFromVolume(volumeNode)
    high = float(np.percentile(values, 99)) if values.size else 1.0
    setDisplay(volumeNode, "vtkMRMLColorTableNodeGrey", 0.0, high if high > 0 else 1.0)
