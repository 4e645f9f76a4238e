"""``slicer.ScriptedLoadableModule`` stand-in: the four base classes with Slicer's behaviour."""

from __future__ import annotations

import os
import sys
import unittest

from PySide6 import QtWidgets

from . import state


class ScriptedLoadableModule:
    def __init__(self, parent) -> None:
        self.parent = parent
        self.moduleName = self.__class__.__name__
        parent.title = ""
        parent.categories = []
        parent.dependencies = []
        parent.contributors = []
        parent.helpText = ""
        parent.acknowledgementText = ""

    def resourcePath(self, filename: str) -> str:
        return os.path.join(os.path.dirname(sys.modules[self.__module__].__file__), "Resources", filename)


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None) -> None:
        self.moduleName = self.__class__.__name__[: -len("Widget")]
        self.developerMode = False
        self.parent = parent if parent is not None else QtWidgets.QWidget()
        self.layout = self.parent.layout() or QtWidgets.QVBoxLayout(self.parent)

    def resourcePath(self, filename: str) -> str:
        return os.path.join(os.path.dirname(sys.modules[self.__module__].__file__), "Resources", filename)

    def setup(self) -> None:
        pass

    def cleanup(self) -> None:
        pass


class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None) -> None:
        self.moduleName = self.__class__.__name__[: -len("Logic")]
        self.isSingletonParameterNode = True

    def createParameterNode(self):
        node = state.scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
        node.SetName(state.scene.GenerateUniqueName(self.moduleName))
        node.SetAttribute("ModuleName", self.moduleName)
        return node

    def getParameterNode(self):
        if self.isSingletonParameterNode:
            node = state.scene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
            if node:
                return node
        node = self.createParameterNode()
        if self.isSingletonParameterNode:
            node.SetSingletonTag(self.moduleName)
        return state.scene.AddNode(node)


class ScriptedLoadableModuleTest(unittest.TestCase):
    def delayDisplay(self, message, msec=1000) -> None:
        print(message)

    def setUp(self) -> None:
        pass
