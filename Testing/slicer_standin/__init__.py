"""A small, faithful stand-in for 3D Slicer's Python environment (slicer, qt, ctk and MRML).

``install()`` puts ``slicer``, ``slicer.util``, ``slicer.ScriptedLoadableModule``,
``slicer.parameterNodeWrapper``, ``slicer.i18n``, ``qt`` and ``ctk`` into ``sys.modules``; ``vtk`` is
the real package. Widgets are real PySide6 widgets with PythonQt semantics (QT_QPA_PLATFORM=offscreen
works); volumes hold real VTK data. It offers only names that exist in Slicer
(../../../shared/slicer-api/, checked by Testing/test_slicer_manifest.py).
"""

from __future__ import annotations

import inspect
import os
import sys
import tempfile
import types


def _module(name: str, source, names) -> types.ModuleType:
    module = types.ModuleType(name)
    for attribute in names:
        setattr(module, attribute, getattr(source, attribute))
    sys.modules[name] = module
    return module


def publicNames(source) -> list[str]:
    """Functions and classes a stand-in module defines itself (not what it imports)."""
    return [name for name, value in vars(source).items()
            if not name.startswith("_") and (inspect.isfunction(value) or inspect.isclass(value))
            and getattr(value, "__module__", None) == source.__name__]


def install(temporaryPath: str | None = None) -> types.ModuleType:
    """Install the stand-in (once per process) and return the ``slicer`` module."""
    if "slicer" in sys.modules and getattr(sys.modules["slicer"], "_standin", False):
        return sys.modules["slicer"]
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6 import QtWidgets

    from . import mrml, parameter_node, pythonqt, scripted, state, util, widgets

    application = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    application.setStyle("Fusion")
    pythonqt.makeQtModule()
    _module("ctk", widgets, ["ctkCollapsibleButton", "ctkSliderWidget"])

    state.scene = mrml.vtkMRMLScene()
    state.app = widgets.qSlicerApplication(state.scene, temporaryPath or tempfile.mkdtemp(prefix="slicer-standin-"))
    state.app.layoutManager()  # a main window keeps the layout, slice and composite nodes in the scene

    slicer = types.ModuleType("slicer", "Stand-in for Slicer's slicer package")
    slicer._standin = True
    slicer.app = state.app
    slicer.mrmlScene = state.scene
    slicer.modules = types.SimpleNamespace()
    slicer.util = _module("slicer.util", util, publicNames(util))
    slicer.ScriptedLoadableModule = _module("slicer.ScriptedLoadableModule", scripted, publicNames(scripted))
    slicer.parameterNodeWrapper = _module("slicer.parameterNodeWrapper", parameter_node,
                                          ["parameterNodeWrapper", "WithinRange", "Choice"])
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    slicer.i18n = sys.modules["slicer.i18n"] = i18n
    for name in ("vtkMRMLScene",) + tuple(mrml.NODE_CLASSES):
        setattr(slicer, name, getattr(mrml, name))
    slicer.qMRMLNodeComboBox = widgets.qMRMLNodeComboBox
    slicer.qMRMLWidget = widgets.qMRMLWidget
    sys.modules["slicer"] = slicer
    return slicer
