"""``slicer.util`` stand-in: the functions the module calls, with Slicer's parameter names.

loadVolume reads NRRD (pynrrd) and NIfTI (nibabel) the way Slicer's readers do for our files: a
DWMRI NRRD becomes a DWI node (gradients normalised per the NA-MIC convention, measurement frame
stored RAS-based, every header key copied to a node attribute), anything 3-D a scalar volume.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import types
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import vtk
from PySide6 import QtCore, QtUiTools, QtWidgets
from vtk.util import numpy_support

from . import pythonqt, state, widgets

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
_STANDIN_WIDGETS = {cls.__name__: cls for cls in (widgets.qMRMLWidget, widgets.qMRMLNodeComboBox,
                                                   widgets.ctkCollapsibleButton, widgets.ctkSliderWidget)}


def vtkMatrixFromArray(narray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for row in range(4):
        for column in range(4):
            matrix.SetElement(row, column, float(narray[row][column]))
    return matrix


def arrayFromVolume(volumeNode) -> np.ndarray:
    imageData = volumeNode.GetImageData()
    columns, rows, slices = imageData.GetDimensions()
    components = imageData.GetNumberOfScalarComponents()
    shape = (slices, rows, columns) + ((components,) if volumeNode.GetClassName() == "vtkMRMLDiffusionWeightedVolumeNode" else ())
    return numpy_support.vtk_to_numpy(imageData.GetPointData().GetScalars()).reshape(shape)


def updateVolumeFromArray(volumeNode, narray) -> None:
    narray = np.asarray(narray)
    if narray.dtype == np.int64:
        raise ValueError("64-bit integer arrays are not supported by VTK; cast the array")
    components = narray.shape[3] if narray.ndim == 4 else 1
    imageData = vtk.vtkImageData()
    imageData.SetDimensions(narray.shape[2], narray.shape[1], narray.shape[0])
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(narray).reshape(-1, components), deep=True)
    imageData.GetPointData().SetScalars(scalars)
    volumeNode.SetAndObserveImageData(imageData)


def getNodesByClass(className: str, scene=None) -> list:
    scene = scene or state.scene
    collection = scene.GetNodesByClass(className)
    return [collection.GetItemAsObject(index) for index in range(collection.GetNumberOfItems())]


def tempDirectory(key: str = "__SlicerTemp__", tempDir=None, includeDateTime: bool = True) -> str:
    return tempfile.mkdtemp(prefix=key + "-", dir=tempDir or state.app.temporaryPath)


def startupEnvironment() -> dict:
    return dict(os.environ)


def _readNrrd(path: str, name: str):
    import nrrd

    array, header = nrrd.read(path, index_order="C")  # C order: (slowest ... fastest) = (K, J, I[, N])
    space = header.get("space", "left-posterior-superior")
    toRas = _LPS_TO_RAS if space.startswith("left-posterior") else np.eye(3)
    kinds = header["kinds"]
    spatial = [index for index, kind in enumerate(kinds) if kind in ("domain", "space")]
    directions = np.asarray(header["space directions"], dtype=np.float64)[spatial]
    ijkToRas = np.eye(4)
    ijkToRas[:3, :3] = toRas @ directions.T
    ijkToRas[:3, 3] = toRas @ np.asarray(header["space origin"], dtype=np.float64)
    isDwi = header.get("modality", "") == "DWMRI"
    node = state.scene.AddNewNodeByClass("vtkMRMLDiffusionWeightedVolumeNode" if isDwi else "vtkMRMLScalarVolumeNode",
                                         state.scene.GenerateUniqueName(name))
    node.SetIJKToRASMatrix(vtkMatrixFromArray(ijkToRas))
    for key, value in header.items():
        if key not in ("type", "dimension", "sizes", "endian", "encoding"):
            node.SetAttribute(key, str(value))
    if isDwi:
        listAxis = kinds.index("list") if "list" in kinds else kinds.index("vector")
        # Stored gradient-fastest in the file: (N, I, J, K) in Fortran order = (K, J, I, N) in C order.
        voxels = np.moveaxis(array, 3 - listAxis, 3) if array.ndim == 4 else array
        count = voxels.shape[3]
        gradients = np.array([[float(v) for v in header[f"DWMRI_gradient_{i:04d}"].split()] for i in range(count)])
        norms = np.linalg.norm(gradients, axis=1)
        bValues = float(header["DWMRI_b-value"]) * (norms / norms.max()) ** 2
        node.SetNumberOfGradients(count)
        for index in range(count):
            node.SetDiffusionGradient(index, gradients[index] / norms[index] if norms[index] > 0 else np.zeros(3))
            node.SetBValue(index, bValues[index])
        frame = np.asarray(header.get("measurement frame", np.eye(3)), dtype=np.float64).T
        node.SetMeasurementFrameMatrix((toRas @ frame).tolist())
    else:
        voxels = array
    updateVolumeFromArray(node, np.asarray(voxels, dtype=np.float32))
    return node


def _readNifti(path: str, name: str):
    import nibabel

    image = nibabel.load(path)
    voxels = np.asarray(image.dataobj, dtype=np.float32)
    if voxels.ndim != 3:
        raise RuntimeError(f"Failed to load volume: {path} is not 3-D")
    node = state.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", state.scene.GenerateUniqueName(name))
    node.SetIJKToRASMatrix(vtkMatrixFromArray(image.affine))
    updateVolumeFromArray(node, np.transpose(voxels, (2, 1, 0)))
    return node


def loadVolume(filename, properties={}, returnNode=False):
    path = str(filename)
    name = properties.get("name") or Path(path).name.split(".")[0]
    try:
        node = _readNrrd(path, name) if path.endswith((".nrrd", ".nhdr")) else _readNifti(path, name)
    except (OSError, KeyError, ValueError) as error:
        raise RuntimeError(f"Failed to load volume from {path}: {error}") from None
    storage = state.scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(path)
    node.SetAndObserveStorageNodeID(storage.GetID())
    node.CreateDefaultDisplayNodes()
    state.loadedFiles.append(path)
    return node


class _UiLoader(QtUiTools.QUiLoader):
    """Creates the PythonQt-behaving classes: qt wrappers for Qt widgets, stand-ins for CTK/Slicer."""

    def createWidget(self, className, parent=None, name=""):
        cls = _STANDIN_WIDGETS.get(className) or pythonqt.wrappedQtClass(className)
        if cls is None:
            raise RuntimeError(f"the stand-in has no widget class {className}")
        widget = cls(parent)
        widget.setObjectName(name)
        return widget


def loadUI(path):
    """Load a .ui like Slicer; the <connections> are made with PythonQt's string-signature connect."""
    tree = ElementTree.parse(str(path))
    connections = tree.getroot().find("connections")
    if connections is not None:
        tree.getroot().remove(connections)  # PySide's meta signatures say PyObject, not vtkMRMLScene*
    buffer = QtCore.QBuffer()
    buffer.setData(ElementTree.tostring(tree.getroot()))
    buffer.open(QtCore.QIODevice.ReadOnly)
    widget = _UiLoader().load(buffer)
    if widget is None:
        raise RuntimeError(f"could not load UI file {path}")
    for connection in connections if connections is not None else []:
        find = lambda name: widget if widget.name == name else widget.findChild(QtCore.QObject, name)
        find(connection.findtext("sender")).connect(connection.findtext("signal"), find(connection.findtext("receiver")),
                                                    connection.findtext("slot"))
    return widget


def childWidgetVariables(widget):
    names = types.SimpleNamespace()
    for child in [widget] + widget.findChildren(QtCore.QObject):
        name = QtCore.QObject.objectName(child)
        if name:
            setattr(names, name, child)
    return names


def errorDisplay(text, windowTitle=None, parent=None, standardButtons=None, **kwargs) -> None:
    state.messages.append(("error", text))


def confirmOkCancelDisplay(text, windowTitle=None, parent=None, **kwargs) -> bool:
    state.messages.append(("confirm", text))
    return state.confirmAnswer


@contextlib.contextmanager
def tryWithErrorDisplay(message=None, show=True, waitCursor=False):
    if waitCursor:
        QtWidgets.QApplication.setOverrideCursor(QtCore.Qt.WaitCursor)
    try:
        yield
    except Exception as error:
        if show and not state.app.testingEnabled():
            errorDisplay(f"{message}\n\n{error}" if message else str(error))
        raise
    finally:
        if waitCursor:
            QtWidgets.QApplication.restoreOverrideCursor()


def pip_install(requirements) -> None:
    state.pipInstalls.append(requirements)


class VTKObservationMixin:
    """Tracks (object, event, method) -> observer tag, like slicer.util.VTKObservationMixin."""

    def __init__(self) -> None:
        super().__init__()
        self.Observations = []

    def addObserver(self, obj, event, method, group="none", priority=0.0):
        if self.hasObserver(obj, event, method):
            return
        tag = obj.AddObserver(event, method, priority)
        self.Observations.append([obj, event, method, group, tag, priority])

    def removeObserver(self, obj, event, method):
        for observation in list(self.Observations):
            if observation[0] is obj and observation[1] == event and observation[2] == method:
                obj.RemoveObserver(observation[4])
                self.Observations.remove(observation)

    def removeObservers(self, method=None):
        for observation in list(self.Observations):
            if method is None or observation[2] == method:
                observation[0].RemoveObserver(observation[4])
                self.Observations.remove(observation)

    def hasObserver(self, obj, event, method):
        return any(o[0] is obj and o[1] == event and o[2] == method for o in self.Observations)
