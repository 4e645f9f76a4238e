"""MRML scene and node stand-ins: Python subclasses of the real ``vtk.vtkObject`` holding real VTK
data objects (vtkImageData, vtkDoubleArray, vtkMatrix4x4).

Every public method here exists on the Slicer class of the same name (checked against mrml.json by
Testing/test_slicer_manifest.py), with Slicer's behaviour where the module depends on it: gradients
must be unit or zero, SetNumberOfGradients resets the table, scalar-volume combo boxes can list DWIs
(a DWI *is* a scalar volume), observers fire ModifiedEvent through VTK itself.
"""

from __future__ import annotations

import itertools

import numpy as np
import vtk

_ids = itertools.count(1)


class vtkMRMLNode(vtk.vtkObject):
    _classChain = ("vtkMRMLNode",)

    def __init__(self) -> None:
        super().__init__()
        self._id = None
        self._name = ""
        self._scene = None
        self._attributes: dict[str, str] = {}
        self._references: dict[str, str | None] = {}
        self._singletonTag = None
        self._modifyDepth = 0
        self._modifiedPending = False

    def GetClassName(self) -> str:
        return type(self).__name__

    def IsA(self, className: str) -> bool:
        return className in type(self)._classChain or className == "vtkObject"

    def GetID(self):
        return self._id

    def GetName(self):
        return self._name

    def SetName(self, name: str) -> None:
        self._name = name
        self.Modified()

    def GetScene(self):
        return self._scene

    def SetAttribute(self, name: str, value: str) -> None:
        self._attributes[name] = value

    def GetAttribute(self, name: str):
        return self._attributes.get(name)

    def GetAttributeNames(self) -> tuple:
        return tuple(self._attributes)

    def RemoveAttribute(self, name: str) -> None:
        self._attributes.pop(name, None)

    def SetSingletonTag(self, tag: str) -> None:
        self._singletonTag = tag

    def GetSingletonTag(self):
        return self._singletonTag

    def SetNodeReferenceID(self, role: str, nodeId: str | None):
        self._references[role] = nodeId
        self.Modified()
        return self.GetNodeReference(role)

    def GetNodeReferenceID(self, role: str):
        return self._references.get(role)

    def GetNodeReference(self, role: str):
        nodeId = self._references.get(role)
        return self._scene.GetNodeByID(nodeId) if nodeId and self._scene else None

    def StartModify(self) -> int:
        self._modifyDepth += 1
        return self._modifyDepth - 1

    def EndModify(self, previous: int) -> int:
        self._modifyDepth = previous
        if previous == 0 and self._modifiedPending:
            self._modifiedPending = False
            self.Modified()
        return previous

    def Modified(self) -> None:
        if self._modifyDepth:
            self._modifiedPending = True
            return
        super().Modified()


class vtkMRMLScriptedModuleNode(vtkMRMLNode):
    _classChain = ("vtkMRMLScriptedModuleNode", "vtkMRMLNode")

    def __init__(self) -> None:
        super().__init__()
        self._parameters: dict[str, str] = {}

    def SetParameter(self, name: str, value: str) -> None:
        if self._parameters.get(name) != value:
            self._parameters[name] = str(value)
            self.Modified()

    def GetParameter(self, name: str) -> str:
        return self._parameters.get(name, "")

    def HasParameter(self, name: str) -> bool:
        return name in self._parameters

    def UnsetParameter(self, name: str) -> None:
        if self._parameters.pop(name, None) is not None:
            self.Modified()

    def GetParameterNames(self) -> tuple:
        return tuple(self._parameters)


class vtkMRMLStorageNode(vtkMRMLNode):
    _classChain = ("vtkMRMLStorageNode", "vtkMRMLNode")

    def __init__(self) -> None:
        super().__init__()
        self._fileName = None

    def SetFileName(self, fileName: str) -> None:
        self._fileName = fileName

    def GetFileName(self):
        return self._fileName


class vtkMRMLVolumeArchetypeStorageNode(vtkMRMLStorageNode):
    _classChain = ("vtkMRMLVolumeArchetypeStorageNode",) + vtkMRMLStorageNode._classChain


class vtkMRMLNRRDStorageNode(vtkMRMLStorageNode):
    _classChain = ("vtkMRMLNRRDStorageNode",) + vtkMRMLStorageNode._classChain


class vtkMRMLScalarVolumeDisplayNode(vtkMRMLNode):
    _classChain = ("vtkMRMLScalarVolumeDisplayNode", "vtkMRMLVolumeDisplayNode", "vtkMRMLDisplayNode", "vtkMRMLNode")

    def __init__(self) -> None:
        super().__init__()
        self._colorNodeId = "vtkMRMLColorTableNodeGrey"
        self._autoWindowLevel = True
        self._window, self._level = 256.0, 128.0

    def SetAndObserveColorNodeID(self, colorNodeId: str) -> None:
        self._colorNodeId = colorNodeId
        self.Modified()

    def GetColorNodeID(self):
        return self._colorNodeId

    def AutoWindowLevelOff(self) -> None:
        self._autoWindowLevel = False

    def AutoWindowLevelOn(self) -> None:
        self._autoWindowLevel = True

    def GetAutoWindowLevel(self) -> bool:
        return self._autoWindowLevel

    def SetWindowLevelMinMax(self, low: float, high: float) -> None:
        self._window, self._level = high - low, (high + low) / 2.0
        self.Modified()

    def GetWindowLevelMin(self) -> float:
        return self._level - self._window / 2.0

    def GetWindowLevelMax(self) -> float:
        return self._level + self._window / 2.0


class vtkMRMLDiffusionWeightedVolumeDisplayNode(vtkMRMLScalarVolumeDisplayNode):
    _classChain = ("vtkMRMLDiffusionWeightedVolumeDisplayNode",) + vtkMRMLScalarVolumeDisplayNode._classChain

    def __init__(self) -> None:
        super().__init__()
        self._diffusionComponent = 0

    def SetDiffusionComponent(self, component: int) -> None:
        self._diffusionComponent = int(component)
        self.Modified()

    def GetDiffusionComponent(self) -> int:
        return self._diffusionComponent


class vtkMRMLScalarVolumeNode(vtkMRMLNode):
    _classChain = ("vtkMRMLScalarVolumeNode", "vtkMRMLVolumeNode", "vtkMRMLDisplayableNode",
                   "vtkMRMLTransformableNode", "vtkMRMLStorableNode", "vtkMRMLNode")
    _displayNodeClass = "vtkMRMLScalarVolumeDisplayNode"

    def __init__(self) -> None:
        super().__init__()
        self._ijkToRas = vtk.vtkMatrix4x4()
        self._imageData = None
        self._displayNodeIds: list[str] = []
        self._storageNodeId = None

    def SetIJKToRASMatrix(self, matrix: vtk.vtkMatrix4x4) -> None:
        self._ijkToRas.DeepCopy(matrix)
        self.Modified()

    def GetIJKToRASMatrix(self, matrix: vtk.vtkMatrix4x4) -> None:
        matrix.DeepCopy(self._ijkToRas)

    def CopyOrientation(self, node) -> None:
        matrix = vtk.vtkMatrix4x4()
        node.GetIJKToRASMatrix(matrix)
        self.SetIJKToRASMatrix(matrix)

    def GetImageData(self):
        return self._imageData

    def SetAndObserveImageData(self, imageData) -> None:
        self._imageData = imageData
        self.Modified()

    def GetDisplayNode(self):
        return self.GetNthDisplayNode(0)

    def GetNumberOfDisplayNodes(self) -> int:
        return len(self._displayNodeIds)

    def GetNthDisplayNode(self, index: int):
        if index >= len(self._displayNodeIds) or self._scene is None:
            return None
        return self._scene.GetNodeByID(self._displayNodeIds[index])

    def SetAndObserveDisplayNodeID(self, nodeId: str) -> None:
        self._displayNodeIds = [nodeId] if nodeId else []
        self.Modified()

    def GetStorageNode(self):
        return self._scene.GetNodeByID(self._storageNodeId) if self._storageNodeId and self._scene else None

    def SetAndObserveStorageNodeID(self, nodeId: str) -> None:
        self._storageNodeId = nodeId

    def CreateDefaultDisplayNodes(self) -> None:
        if self.GetDisplayNode() is None and self._scene is not None:
            display = self._scene.AddNewNodeByClass(self._displayNodeClass)
            self.SetAndObserveDisplayNodeID(display.GetID())


class vtkMRMLDiffusionWeightedVolumeNode(vtkMRMLScalarVolumeNode):
    _classChain = ("vtkMRMLDiffusionWeightedVolumeNode",) + vtkMRMLScalarVolumeNode._classChain
    _displayNodeClass = "vtkMRMLDiffusionWeightedVolumeDisplayNode"

    def __init__(self) -> None:
        super().__init__()
        self._measurementFrame = vtk.vtkMatrix4x4()
        self._gradients = vtk.vtkDoubleArray()
        self._gradients.SetNumberOfComponents(3)
        self._bValues = vtk.vtkDoubleArray()
        self.SetNumberOfGradients(7)  # Slicer's constructor default

    def SetNumberOfGradients(self, count: int) -> None:
        # As in Slicer: setting the count zeroes every gradient and b-value.
        self._gradients.SetNumberOfTuples(count)
        self._gradients.Fill(0.0)
        self._bValues.SetNumberOfTuples(count)
        self._bValues.Fill(0.0)

    def GetNumberOfGradients(self) -> int:
        return self._gradients.GetNumberOfTuples()

    @staticmethod
    def _acceptable(gradient) -> bool:
        norm = float(np.linalg.norm(gradient))
        return abs(norm) < 1e-6 or abs(norm - 1.0) < 1e-6

    def SetDiffusionGradient(self, index: int, gradient) -> None:
        if not self._acceptable(gradient):
            return  # Slicer logs an error and leaves the table unchanged
        self._gradients.SetTuple3(index, *[float(value) for value in gradient])
        self.Modified()

    def GetDiffusionGradient(self, index: int, gradient=None):
        return self._gradients.GetTuple3(index)

    def SetDiffusionGradients(self, gradients: vtk.vtkDoubleArray) -> None:
        for index in range(gradients.GetNumberOfTuples()):
            if not self._acceptable(gradients.GetTuple3(index)):
                return
        self._gradients.DeepCopy(gradients)
        self.Modified()

    def GetDiffusionGradients(self):
        return self._gradients

    def SetBValue(self, index: int, value: float) -> None:
        self._bValues.SetValue(index, float(value))
        self.Modified()

    def GetBValue(self, index: int) -> float:
        return self._bValues.GetValue(index)

    def SetBValues(self, bValues: vtk.vtkDoubleArray) -> None:
        self._bValues.DeepCopy(bValues)
        self.Modified()

    def GetBValues(self):
        return self._bValues

    def SetMeasurementFrameMatrix(self, matrix) -> None:
        if isinstance(matrix, vtk.vtkMatrix4x4):
            self._measurementFrame.DeepCopy(matrix)
        else:
            for row in range(3):
                for column in range(3):
                    self._measurementFrame.SetElement(row, column, float(matrix[row][column]))
        self.Modified()

    def GetMeasurementFrameMatrix(self, matrix: vtk.vtkMatrix4x4) -> None:
        matrix.DeepCopy(self._measurementFrame)


class vtkMRMLSliceCompositeNode(vtkMRMLNode):
    _classChain = ("vtkMRMLSliceCompositeNode", "vtkMRMLNode")

    def __init__(self) -> None:
        super().__init__()
        self._layoutName = ""
        self._background = self._foreground = None
        self._foregroundOpacity = 0.0
        self._linked = False

    def SetLayoutName(self, name: str) -> None:
        self._layoutName = name

    def GetLayoutName(self) -> str:
        return self._layoutName

    def SetBackgroundVolumeID(self, nodeId) -> None:
        self._background = nodeId
        self.Modified()

    def GetBackgroundVolumeID(self):
        return self._background

    def SetForegroundVolumeID(self, nodeId) -> None:
        self._foreground = nodeId
        self.Modified()

    def GetForegroundVolumeID(self):
        return self._foreground

    def SetForegroundOpacity(self, opacity: float) -> None:
        self._foregroundOpacity = float(opacity)
        self.Modified()

    def GetForegroundOpacity(self) -> float:
        return self._foregroundOpacity

    def SetLinkedControl(self, linked: bool) -> None:
        self._linked = bool(linked)

    def GetLinkedControl(self) -> bool:
        return self._linked


class vtkMRMLSliceNode(vtkMRMLNode):
    _classChain = ("vtkMRMLSliceNode", "vtkMRMLAbstractViewNode", "vtkMRMLNode")

    def __init__(self) -> None:
        super().__init__()
        self._layoutName = ""
        self._orientation = "Axial"

    def SetLayoutName(self, name: str) -> None:
        self._layoutName = name

    def GetLayoutName(self) -> str:
        return self._layoutName

    def SetOrientation(self, orientation: str) -> bool:
        self._orientation = orientation
        self.Modified()
        return True

    def GetOrientation(self) -> str:
        return self._orientation


class vtkMRMLLayoutNode(vtkMRMLNode):
    _classChain = ("vtkMRMLLayoutNode", "vtkMRMLAbstractLayoutNode", "vtkMRMLNode")

    def __init__(self) -> None:
        super().__init__()
        self._descriptions: dict[int, str] = {}
        self._arrangement = 3  # SlicerLayoutFourUpView

    def AddLayoutDescription(self, layout: int, description: str) -> bool:
        if layout in self._descriptions:
            return False
        self._descriptions[layout] = description
        return True

    def IsLayoutDescription(self, layout: int) -> bool:
        return layout in self._descriptions

    def GetLayoutDescription(self, layout: int) -> str:
        return self._descriptions.get(layout, "")

    def SetViewArrangement(self, layout: int) -> None:
        self._arrangement = int(layout)
        self.Modified()

    def GetViewArrangement(self) -> int:
        return self._arrangement

    def GetCurrentLayoutDescription(self) -> str:
        return self._descriptions.get(self._arrangement, "")


NODE_CLASSES = {cls.__name__: cls for cls in (
    vtkMRMLScriptedModuleNode, vtkMRMLVolumeArchetypeStorageNode, vtkMRMLNRRDStorageNode,
    vtkMRMLScalarVolumeDisplayNode, vtkMRMLDiffusionWeightedVolumeDisplayNode, vtkMRMLScalarVolumeNode,
    vtkMRMLDiffusionWeightedVolumeNode, vtkMRMLSliceCompositeNode, vtkMRMLSliceNode, vtkMRMLLayoutNode)}


class vtkMRMLScene(vtk.vtkObject):
    """Nodes by ID, singleton lookup, unique names, add/remove events (also to plain Python listeners,
    which the stand-in widgets use in place of Qt's scene model)."""

    NodeAddedEvent = 8193
    NodeRemovedEvent = 8195
    StartCloseEvent = 8451
    EndCloseEvent = 8707

    def __init__(self) -> None:
        super().__init__()
        self._nodes: list[vtkMRMLNode] = []
        self._listeners: list = []

    def GetClassName(self) -> str:
        return "vtkMRMLScene"

    def _notify(self, kind: str, node) -> None:
        for listener in list(self._listeners):
            listener(kind, node)
        self.InvokeEvent(self.NodeAddedEvent if kind == "added" else self.NodeRemovedEvent)

    def CreateNodeByClass(self, className: str):
        return NODE_CLASSES[className]()

    def AddNode(self, node):
        node._id = f"{node.GetClassName()}{next(_ids)}"
        node._scene = self
        if not node.GetName():
            node._name = self.GenerateUniqueName(node.GetClassName().replace("vtkMRML", "").replace("Node", ""))
        self._nodes.append(node)
        self._notify("added", node)
        return node

    def AddNewNodeByClass(self, className: str, nodeBaseName: str = ""):
        node = self.CreateNodeByClass(className)
        if nodeBaseName:
            node._name = nodeBaseName
        return self.AddNode(node)

    def RemoveNode(self, node) -> None:
        if node in self._nodes:
            self._nodes.remove(node)
            self._notify("removed", node)
            node._scene = None

    def GetNodeByID(self, nodeId):
        return next((node for node in self._nodes if node.GetID() == nodeId), None)

    def GetFirstNodeByClass(self, className: str):
        return next((node for node in self._nodes if node.IsA(className)), None)

    def GetFirstNodeByName(self, name: str):
        return next((node for node in self._nodes if node.GetName() == name), None)

    def GetNodesByClass(self, className: str) -> vtk.vtkCollection:
        collection = vtk.vtkCollection()
        for node in self._nodes:
            if node.IsA(className):
                collection.AddItem(node)
        return collection

    def GetNumberOfNodes(self) -> int:
        return len(self._nodes)

    def GetSingletonNode(self, singletonTag: str, className: str):
        return next((node for node in self._nodes
                     if node.GetSingletonTag() == singletonTag and node.IsA(className)), None)

    def GenerateUniqueName(self, baseName: str) -> str:
        names = {node.GetName() for node in self._nodes}
        if baseName not in names:
            return baseName
        return next(f"{baseName}_{index}" for index in itertools.count(1) if f"{baseName}_{index}" not in names)

    def Clear(self, removeSingletons: bool = False) -> None:
        self.InvokeEvent(self.StartCloseEvent)
        for node in list(self._nodes):
            if removeSingletons or node.GetSingletonTag() is None:
                self.RemoveNode(node)
        self.InvokeEvent(self.EndCloseEvent)
