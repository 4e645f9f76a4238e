"""``slicer.parameterNodeWrapper`` stand-in: typed parameters stored as strings and node references
in a vtkMRMLScriptedModuleNode, and connectGui through the same widget connectors Slicer has
(exact widget type -> data type), bound by the widgets' ``SlicerParameterName`` dynamic property.
"""

from __future__ import annotations

import math
import typing

import vtk

from . import widgets

SlicerParameterNamePropertyName = "SlicerParameterName"


class WithinRange:
    def __init__(self, minimum, maximum) -> None:
        self.minimum, self.maximum = minimum, maximum

    def validate(self, value) -> None:
        if not self.minimum <= value <= self.maximum:
            raise ValueError(f"{value} is not within [{self.minimum}, {self.maximum}]")


class Choice:
    def __init__(self, choices) -> None:
        self.choices = tuple(choices)

    def validate(self, value) -> None:
        if value not in self.choices:
            raise ValueError(f"{value!r} is not one of {self.choices}")


def _isNodeType(datatype) -> bool:
    return isinstance(datatype, type) and datatype.__name__.startswith("vtkMRML")


class _Parameter:
    def __init__(self, name: str, hint, default) -> None:
        self.name = name
        if typing.get_origin(hint) is typing.Annotated:
            self.datatype, *self.annotations = typing.get_args(hint)
        else:
            self.datatype, self.annotations = hint, []
        self.isNode = _isNodeType(self.datatype)
        self.default = None if self.isNode else (default if default is not None else self.datatype())

    def annotation(self, kind):
        return next((a for a in self.annotations if isinstance(a, kind)), None)

    def read(self, node):
        if self.isNode:
            return node.GetNodeReference(self.name)
        if not node.HasParameter(self.name):
            return self.default
        text = node.GetParameter(self.name)
        return text == "True" if self.datatype is bool else self.datatype(text)

    def write(self, node, value) -> None:
        if self.isNode:
            node.SetNodeReferenceID(self.name, value.GetID() if value is not None else None)
            return
        value = self.datatype(value)
        for validator in self.annotations:
            validator.validate(value)
        node.SetParameter(self.name, str(value))


def _connector(widget, parameter: _Parameter):
    """(write-to-widget, read-from-widget, change signal) for the widget type, as Slicer's connectors."""
    import qt

    kind = type(widget)
    if kind is widgets.qMRMLNodeComboBox and parameter.isNode:
        widget.nodeTypes = [parameter.datatype.__name__]
        return widget.setCurrentNode, widget.currentNode, widget.currentNodeChanged
    if kind is qt.QSpinBox and parameter.datatype is int:
        bounds = parameter.annotation(WithinRange)
        if bounds:
            widget.minimum, widget.maximum = bounds.minimum, bounds.maximum
        return (lambda value: setattr(widget, "value", value)), (lambda: widget.value), widget.valueChanged
    if kind is qt.QDoubleSpinBox and parameter.datatype is float:
        bounds = parameter.annotation(WithinRange)
        widget.minimum, widget.maximum = (bounds.minimum, bounds.maximum) if bounds else (-math.inf, math.inf)
        return (lambda value: setattr(widget, "value", value)), (lambda: widget.value), widget.valueChanged
    if kind is widgets.ctkSliderWidget and parameter.datatype in (int, float):
        bounds = parameter.annotation(WithinRange)
        if bounds is None:
            raise RuntimeError("Cannot have a connection to ctkSliderWidget where the float types is unbounded.")
        widget.minimum, widget.maximum = bounds.minimum, bounds.maximum
        return (lambda value: setattr(widget, "value", value)), (lambda: widget.value), widget.valueChanged
    if kind is qt.QComboBox and parameter.datatype in (int, float, str, bool):
        choice = parameter.annotation(Choice)
        if choice is None:
            raise RuntimeError("ComboBoxToStringableConnector requires the Choice annotation to be used.")
        widget.clear()
        for item in choice.choices:
            widget.addItem(str(item))
        return ((lambda value: setattr(widget, "currentIndex", choice.choices.index(value))),
                (lambda: choice.choices[widget.currentIndex]), widget.currentIndexChanged)
    if kind is qt.QCheckBox and parameter.datatype is bool:
        return (lambda value: setattr(widget, "checked", value)), (lambda: widget.checked), widget.toggled
    raise RuntimeError(f"no connector for a {kind.__name__} and {parameter.datatype}")


def parameterNodeWrapper(classtype=None):
    def wrap(cls):
        hints = typing.get_type_hints(cls, include_extras=True)
        parameters = {name: _Parameter(name, hint, cls.__dict__.get(name)) for name, hint in hints.items()}

        def __init__(self, parameterNode, prefix=None) -> None:
            object.__setattr__(self, "parameterNode", parameterNode)
            object.__setattr__(self, "_guiConnections", {})
            for parameter in parameters.values():
                if not parameter.isNode and not parameterNode.HasParameter(parameter.name):
                    parameter.write(parameterNode, parameter.default)

        def makeProperty(parameter):
            return property(lambda self: parameter.read(self.parameterNode),
                            lambda self, value: parameter.write(self.parameterNode, value))

        def connectGui(self, gui):
            candidates = gui.findChildren(object) if hasattr(gui, "findChildren") else vars(gui).values()
            bindings = []
            for widget in candidates:
                name = widget.property(SlicerParameterNamePropertyName) if hasattr(widget, "property") else None
                if name in parameters:
                    writeWidget, readWidget, signal = _connector(widget, parameters[name])
                    bindings.append((parameters[name], writeWidget, readWidget, signal))

            updating = [False]

            def toWidgets(caller=None, event=None):
                updating[0] = True
                try:
                    for parameter, writeWidget, _, _ in bindings:
                        writeWidget(parameter.read(self.parameterNode))
                finally:
                    updating[0] = False

            def fromWidget(parameter, readWidget):
                def changed(*args):
                    if not updating[0]:
                        parameter.write(self.parameterNode, readWidget())
                return changed

            slots = []
            for parameter, _, readWidget, signal in bindings:
                slot = fromWidget(parameter, readWidget)
                signal.connect(slot)
                slots.append((signal, slot))
            toWidgets()
            tag = self.parameterNode.AddObserver(vtk.vtkCommand.ModifiedEvent, toWidgets)
            self._guiConnections[tag] = slots
            return tag

        def disconnectGui(self, guiTag) -> None:
            for signal, slot in self._guiConnections.pop(guiTag, []):
                signal.disconnect(slot)
            self.parameterNode.RemoveObserver(guiTag)

        members = {
            "__init__": __init__, "connectGui": connectGui, "disconnectGui": disconnectGui,
            "AddObserver": lambda self, event, callback, priority=0.0: self.parameterNode.AddObserver(event, callback, priority),
            "RemoveObserver": lambda self, tag: self.parameterNode.RemoveObserver(tag),
            "StartModify": lambda self: self.parameterNode.StartModify(),
            "EndModify": lambda self, wasModified: self.parameterNode.EndModify(wasModified),
            "default": lambda self, paramName: parameters[paramName].default,
            "allParameters": property(lambda self: {name: getattr(self, name) for name in parameters}),
        }
        members.update({name: makeProperty(parameter) for name, parameter in parameters.items()})
        return type(cls.__name__, (), dict(members, __module__=cls.__module__, __doc__=cls.__doc__))

    return wrap if classtype is None else wrap(classtype)
