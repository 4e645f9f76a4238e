"""Names the stand-in offers and names the module uses must exist in real Slicer 5.10.

The manifest is ../shared/slicer-api/ (extracted from Slicer, CTK and SlicerDMRI sources); see its
README section "Using the manifest in tests".
"""

from __future__ import annotations

import ast
import inspect
import json
import re
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest
import vtk
from PySide6 import QtCore, QtGui, QtUiTools, QtWidgets

import slicer_standin
from slicer_standin import mrml, parameter_node, pythonqt, scripted, util, widgets

slicer = slicer_standin.install()

ROOT = Path(__file__).resolve().parents[1]
API = ROOT.parent / "shared" / "slicer-api"
MODULE_SOURCES = [ROOT / "DDM2Slicer" / "DDM2Slicer.py", *sorted((ROOT / "DDM2Slicer" / "DDM2SlicerLib").glob("*.py"))]
UI_FILE = ROOT / "DDM2Slicer" / "Resources" / "UI" / "DDM2Slicer.ui"
TARGET = "5.10"

pytestmark = pytest.mark.skipif(not API.is_dir(), reason="the Slicer API manifest is not checked out beside the repository")


def load(name: str) -> dict:
    return json.loads((API / name).read_text())


@pytest.fixture(scope="module")
def manifest():
    return {"util": load("util.json"), "mrml": load("mrml.json"), "widgets": load("widgets.json")}


def utilFunctions(manifest) -> dict:
    return manifest["util"]["slicer.util"]["functions"]


def paramsIn(entry: dict) -> list[str] | None:
    params = entry.get("params_in_release", {}).get(TARGET, entry["params"])
    return None if params == "absent" else params


def parameterNames(params: list[str]) -> set[str]:
    return {p.split("=")[0].lstrip("*") for p in params} - {"self", "", "/"}


def mrmlMethods(manifest, className: str) -> set[str]:
    return set(manifest["mrml"]["classes"][className]["methods"]) | set(manifest["mrml"]["vtkObject"]["methods"]) \
        | set(manifest["mrml"]["classes"][className].get("constants", {}))


def widgetMembers(manifest, className: str) -> set[str]:
    entry = manifest["widgets"]["classes"][className]
    names = set(entry["properties"])
    for kind in ("slots", "signals", "invokables"):
        names |= {member["sig"].split("(")[0] for member in entry[kind] if TARGET not in member.get("absent_in", [])}
    return names | set(entry.get("decorator_methods") or [])


def ownPublicNames(cls: type, stopAt: tuple[type, ...]) -> set[str]:
    names = set()
    for klass in cls.__mro__:
        if klass in stopAt or klass.__module__.startswith(("PySide6", "Shiboken", "vtkmodules", "builtins")):
            continue
        names |= {name for name in vars(klass) if not name.startswith("_") and name not in ("staticMetaObject",)}
    return names


# ------------------------------------------------------------------------------ the stand-in


def test_standin_slicer_util_offers_only_real_functions_with_real_parameters(manifest):
    functions = utilFunctions(manifest)
    classes = manifest["util"]["slicer.util"]["classes"]
    for name in slicer_standin.publicNames(util):
        assert name in functions or name in classes, f"slicer.util.{name} does not exist in Slicer"
        if name in functions:
            real = paramsIn(functions[name])
            assert real is not None, f"slicer.util.{name} is absent in Slicer {TARGET}"
            ours = parameterNames(list(inspect.signature(getattr(util, name)).parameters))
            assert ours <= parameterNames(real), f"slicer.util.{name}{ours} vs Slicer {real}"
    realMixin = set(classes["VTKObservationMixin"]["methods"]) | {"Observations"}
    assert ownPublicNames(util.VTKObservationMixin, ()) <= realMixin


def test_standin_scripted_module_classes_and_parameter_node_wrapper_are_real(manifest):
    real = manifest["util"]["slicer.ScriptedLoadableModule"]["classes"]
    for name in slicer_standin.publicNames(scripted):
        assert name in real
        methods = {m for m in vars(getattr(scripted, name)) if not m.startswith("_")}
        assert methods <= set(real[name]["methods"]), f"{name}: {methods - set(real[name]['methods'])}"
    exports = manifest["util"]["slicer.parameterNodeWrapper"]["exports"]
    for name in ("parameterNodeWrapper", "WithinRange", "Choice", "SlicerParameterNamePropertyName"):
        assert name in exports and hasattr(parameter_node, name)
    added = set(manifest["util"]["slicer.parameterNodeWrapper"]["members_added_by_parameterNodeWrapper_decorator"])

    @parameter_node.parameterNodeWrapper
    class Probe:
        value: int = 1

    assert {m for m in vars(Probe) if not m.startswith("_")} - {"value"} <= added


def test_standin_slicer_namespace_holds_only_real_names(manifest):
    namespace = manifest["util"]["slicer"]
    allowed = set(namespace["attributes_set_only_inside_the_application"]) \
        | {s.split(" ")[0] for s in namespace["submodules"]} \
        | set(manifest["mrml"]["classes"]) | set(manifest["widgets"]["classes"]) | {"vtkMRMLScene"}
    for name in vars(slicer):
        if not name.startswith("_"):
            assert name in allowed, f"slicer.{name} does not exist in Slicer"


@pytest.mark.parametrize("className", sorted(mrml.NODE_CLASSES) + ["vtkMRMLScene"])
def test_standin_mrml_classes_offer_only_real_methods(manifest, className):
    offered = ownPublicNames(getattr(mrml, className), ())
    real = mrmlMethods(manifest, className)
    assert offered <= real, f"{className} offers {sorted(offered - real)}, which Slicer's class lacks"


@pytest.mark.parametrize("cls", [widgets.qMRMLNodeComboBox, widgets.qMRMLWidget, widgets.ctkCollapsibleButton,
                                 widgets.ctkSliderWidget, widgets.qMRMLSliceWidget, widgets.qSlicerLayoutManager])
def test_standin_widgets_offer_only_real_members(manifest, cls):
    real = widgetMembers(manifest, cls.__name__)
    # PythonQtObject's connect/exec_ are PythonQt's helpers on every QObject (pythonqt.md).
    offered = ownPublicNames(cls, (pythonqt.PythonQtObject,))
    # Overrides of the Qt base class's virtual methods (paintEvent, sizeHint) are Qt's own API.
    qtBase = qtClass(manifest["widgets"]["classes"][cls.__name__]["qt_base"])
    extra = {name for name in offered - real if not hasattr(qtBase, name)}
    assert not extra, f"{cls.__name__} offers {sorted(extra)}"
    signals = {s["sig"] for s in manifest["widgets"]["classes"][cls.__name__]["signals"]}
    assert set(cls._pythonQtSignals) <= signals


def test_standin_application_offers_only_real_members(manifest):
    common = {key.split("(")[0].split(" ")[0] for key in manifest["widgets"]["slicer_app"]["commonly_used"]}
    assert ownPublicNames(widgets.qSlicerApplication, ()) <= common | {"temporaryPath"}


# ------------------------------------------------------------------------------ the module's own code


def uiWidgetClasses() -> dict[str, str]:
    return {w.get("name"): w.get("class") for w in ElementTree.parse(UI_FILE).iter("widget") if w.get("name")}


def qtClass(name: str):
    return next((getattr(m, name) for m in (QtWidgets, QtGui, QtCore, QtUiTools) if hasattr(m, name)), None)


def qtMembers(cls) -> set[str]:
    meta = cls.staticMetaObject
    properties = {meta.property(i).name() for i in range(meta.propertyCount())}
    return properties | {name for name in dir(cls) if not name.startswith("_")} | {"name"}


def qtSignals(cls) -> set[str]:
    meta = cls.staticMetaObject
    return {meta.method(i).methodSignature().data().decode() for i in range(meta.methodCount())
            if meta.method(i).methodType() == QtCore.QMetaMethod.Signal}


def dotted(node) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id] + parts[::-1])
    return None


@pytest.fixture(scope="module")
def moduleUses():
    """Every attribute chain and call in the module's sources, with the file it is in."""
    attributes, calls = [], []
    for path in MODULE_SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute):
                chain = dotted(node)
                if chain:
                    attributes.append((path.name, chain))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                calls.append((path.name, node))
    return attributes, calls


def test_module_uses_only_real_slicer_util_functions_and_parameters(manifest, moduleUses):
    functions, classes = utilFunctions(manifest), manifest["util"]["slicer.util"]["classes"]
    attributes, calls = moduleUses
    used = {chain.split(".")[2] for _, chain in attributes if chain.startswith("slicer.util.")}
    assert used, "the scan found no slicer.util use: the scan is broken"
    for name in used:
        assert name in classes or (name in functions and paramsIn(functions[name]) is not None), name
    for fileName, call in calls:
        chain = dotted(call.func)
        if chain and chain.startswith("slicer.util.") and chain.split(".")[2] in functions:
            real = parameterNames(paramsIn(functions[chain.split(".")[2]]))
            assert {k.arg for k in call.keywords if k.arg} <= real, f"{fileName}: {chain} keywords"


def test_module_uses_only_real_slicer_names_scene_and_app_members(manifest, moduleUses):
    attributes, _ = moduleUses
    namespace = manifest["util"]["slicer"]
    allowed = set(namespace["attributes_set_only_inside_the_application"]) \
        | {s.split(" ")[0] for s in namespace["submodules"]} | set(manifest["mrml"]["classes"]) \
        | set(manifest["widgets"]["classes"])
    sceneMembers = mrmlMethods(manifest, "vtkMRMLScene") | set(manifest["mrml"]["classes"]["vtkMRMLScene"]["events"])
    appMembers = {key.split("(")[0] for key in manifest["widgets"]["slicer_app"]["commonly_used"]} \
        | widgetMembers(manifest, "qSlicerApplication")
    for fileName, chain in attributes:
        parts = chain.split(".")
        if parts[0] == "slicer" and len(parts) > 1:
            assert parts[1] in allowed, f"{fileName}: {chain}"
            if parts[1] == "mrmlScene" and len(parts) > 2:
                assert parts[2] in sceneMembers, f"{fileName}: {chain}"
            if parts[1] == "app" and len(parts) > 2:
                assert parts[2] in appMembers, f"{fileName}: {chain}"
        if parts[0] == "qt" and len(parts) > 1:
            assert qtClass(parts[1]) is not None, f"{fileName}: {chain}"
        if parts[0] == "ctk" and len(parts) > 1:
            assert parts[1] in manifest["widgets"]["classes"], f"{fileName}: {chain}"


def test_module_uses_only_members_and_signals_of_its_panel_widgets(manifest, moduleUses):
    classes = uiWidgetClasses()
    attributes, calls = moduleUses
    checked = 0
    for fileName, chain in attributes:
        match = re.fullmatch(r"self\.ui\.(\w+)\.(\w+)", chain)
        if not match:
            continue
        widgetName, member = match.groups()
        assert widgetName in classes, f"{fileName}: no widget {widgetName} in the .ui"
        className = classes[widgetName]
        if className in manifest["widgets"]["classes"]:
            assert member in widgetMembers(manifest, className), f"{fileName}: {chain}"
            assert member not in manifest["widgets"]["classes"][className]["public_methods_not_callable_from_python"] \
                or member in manifest["widgets"]["classes"][className]["properties"]
        else:
            assert member in qtMembers(qtClass(className)), f"{fileName}: {chain}"
        checked += 1
    assert checked > 10
    for fileName, call in calls:
        chain = dotted(call.func) or ""
        match = re.fullmatch(r"self\.ui\.(\w+)\.connect", chain)
        if match and call.args and isinstance(call.args[0], ast.Constant):
            className = classes[match.group(1)]
            signature = call.args[0].value
            if className in manifest["widgets"]["classes"]:
                assert signature in {s["sig"] for s in manifest["widgets"]["classes"][className]["signals"]}
            else:
                assert signature in qtSignals(qtClass(className)), f"{fileName}: {signature} on {className}"


# Calls on these are plain Python (threading.Thread, psutil.Process), not Slicer or VTK.
PYTHON_MODULES = {"threading", "subprocess", "queue", "psutil", "np", "os", "shutil", "json", "importlib", "signal",
                  "PyTorchUtils"}  # PyTorchUtils: the PyTorch extension's module, not part of Slicer core


def test_module_calls_only_mrml_and_vtk_methods_that_exist_in_slicer(manifest, moduleUses):
    _, calls = moduleUses
    known = set(manifest["mrml"]["vtkObject"]["methods"])
    for entry in manifest["mrml"]["classes"].values():
        for name, overloads in entry["methods"].items():
            if any(TARGET not in overload.get("absent_in", []) for overload in overloads):
                known.add(name)
    vtkClasses = (vtk.vtkMatrix4x4, vtk.vtkDoubleArray, vtk.vtkImageData)
    used = {call.func.attr for _, call in calls if re.fullmatch(r"[A-Z]\w*", call.func.attr)
            and (dotted(call.func) or "").split(".")[0] not in PYTHON_MODULES}
    used -= {"Path", "DenoiseSettings", "JobResult", "EngineJob"}  # our own Python classes
    assert {"SetMeasurementFrameMatrix", "SetDiffusionGradients", "SetDiffusionComponent"} <= used
    for name in used:
        assert name in known or any(hasattr(cls, name) for cls in vtkClasses), f"{name} is not a Slicer/VTK method"


def test_every_panel_parameter_name_is_a_parameter_of_the_wrapper():
    bound = {}
    for widget in ElementTree.parse(UI_FILE).iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.findtext("string")] = widget.get("class")
    import DDM2Slicer as module

    parameters = {name for name, value in vars(module.DDM2SlicerParameterNode).items() if isinstance(value, property)}
    parameters.discard("allParameters")
    assert set(bound) == parameters
    assert bound["inputVolume"] == "qMRMLNodeComboBox" and bound["overlayOpacity"] == "ctkSliderWidget"

