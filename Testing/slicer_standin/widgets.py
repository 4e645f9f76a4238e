"""Stand-ins of the CTK and Slicer widget classes the module's .ui uses, plus the layout manager, its
slice views (which draw voxel slices, so the comparison layout can be rendered offscreen) and
``slicer.app``. Public members are only those widgets.json lists for the class; Qt's own API comes
from the real PySide6 base class.
"""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree

import numpy as np
from PySide6 import QtCore, QtGui, QtWidgets
from PySide6.QtCore import Property, Signal

from .pythonqt import PythonQtObject


class qMRMLWidget(PythonQtObject, QtWidgets.QWidget):
    mrmlSceneChanged = Signal(object)
    _pythonQtSignals = ("mrmlSceneChanged(vtkMRMLScene*)",)

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._scene = None

    def setMRMLScene(self, scene) -> None:
        self._scene = scene
        self.mrmlSceneChanged.emit(scene)

    def mrmlScene(self):
        return self._scene


class qMRMLNodeComboBox(PythonQtObject, QtWidgets.QWidget):
    """A node selector over the scene: nodeTypes filter, none/add entries, auto-select when none is off."""

    currentNodeChanged = Signal((object,), (bool,))
    currentNodeIDChanged = Signal(str)
    _pythonQtSignals = ("currentNodeChanged(vtkMRMLNode*)", "currentNodeChanged(bool)", "currentNodeIDChanged(QString)")

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._scene = None
        self._nodeTypes: list[str] = []
        self._showChildNodeTypes = True
        self._noneEnabled = False
        self._addEnabled = False
        self._removeEnabled = False
        self._renameEnabled = False
        self._noneDisplay = "None"
        self._baseName = ""
        self._nodes: list = []
        self._current = None
        self._combo = QtWidgets.QComboBox(self)
        layout = QtWidgets.QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self._combo)
        self._combo.activated.connect(self._onActivated)

    def _get(attribute):
        return lambda self: getattr(self, attribute)

    def _set(attribute):
        def setter(self, value):
            setattr(self, attribute, list(value) if isinstance(value, (list, tuple)) else value)
            self._refresh()
        return setter

    nodeTypes = Property("QStringList", _get("_nodeTypes"), _set("_nodeTypes"))
    showChildNodeTypes = Property(bool, _get("_showChildNodeTypes"), _set("_showChildNodeTypes"))
    noneEnabled = Property(bool, _get("_noneEnabled"), _set("_noneEnabled"))
    addEnabled = Property(bool, _get("_addEnabled"), _set("_addEnabled"))
    removeEnabled = Property(bool, _get("_removeEnabled"), _set("_removeEnabled"))
    renameEnabled = Property(bool, _get("_renameEnabled"), _set("_renameEnabled"))
    noneDisplay = Property(str, _get("_noneDisplay"), _set("_noneDisplay"))
    baseName = Property(str, _get("_baseName"), _set("_baseName"))
    currentNodeID = Property(str, lambda self: self._current.GetID() if self._current else "",
                             lambda self, nodeId: self.setCurrentNodeID(nodeId))
    del _get, _set

    def setMRMLScene(self, scene) -> None:
        if self._scene is not None:
            self._scene._listeners.remove(self._onSceneChanged)
        self._scene = scene
        if scene is not None:
            scene._listeners.append(self._onSceneChanged)
        self._refresh()

    def mrmlScene(self):
        return self._scene

    def _accepts(self, node) -> bool:
        if self._showChildNodeTypes:
            return any(node.IsA(nodeType) for nodeType in self._nodeTypes)
        return node.GetClassName() in self._nodeTypes

    def _onSceneChanged(self, kind: str, node) -> None:
        if kind == "removed" and node is self._current:
            self._current = None
            self._refresh()
            self._emitCurrent()
        else:
            self._refresh()

    def _refresh(self) -> None:
        self._nodes = [node for node in (self._scene._nodes if self._scene else []) if self._accepts(node)]
        if self._current is not None and self._current not in self._nodes:
            self._current = None
        autoSelect = self._current is None and not self._noneEnabled and self._nodes
        if autoSelect:
            self._current = self._nodes[0]
        self._combo.blockSignals(True)
        self._combo.clear()
        if self._noneEnabled:
            self._combo.addItem(self._noneDisplay)
        for node in self._nodes:
            self._combo.addItem(node.GetName())
        if self._addEnabled:
            self._combo.addItem(f"Create new {self._nodeTypes[0].replace('vtkMRML', '').replace('Node', '')}"
                                if self._nodeTypes else "Create new")
        self._combo.setCurrentIndex(self._indexOf(self._current))
        self._combo.blockSignals(False)
        if autoSelect:
            self._emitCurrent()

    def _indexOf(self, node) -> int:
        offset = 1 if self._noneEnabled else 0
        return self._nodes.index(node) + offset if node in self._nodes else (0 if self._noneEnabled else -1)

    def _onActivated(self, index: int) -> None:
        offset = 1 if self._noneEnabled else 0
        if self._addEnabled and index == self._combo.count() - 1:
            self.addNode()
        else:
            self.setCurrentNode(self._nodes[index - offset] if index >= offset else None)

    def _emitCurrent(self) -> None:
        self.currentNodeChanged[object].emit(self._current)
        self.currentNodeChanged[bool].emit(self._current is not None)
        self.currentNodeIDChanged.emit(self._current.GetID() if self._current else "")

    def currentNode(self):
        return self._current

    def setCurrentNode(self, node) -> None:
        if node is self._current:
            return
        if node is not None and node not in self._nodes:
            self._refresh()
            if node not in self._nodes:
                return
        self._current = node
        self._combo.setCurrentIndex(self._indexOf(node))
        self._emitCurrent()

    def setCurrentNodeID(self, nodeId: str) -> None:
        self.setCurrentNode(self._scene.GetNodeByID(nodeId) if self._scene and nodeId else None)

    def addNode(self):
        node = self._scene.AddNewNodeByClass(self._nodeTypes[0], self._scene.GenerateUniqueName(
            self._baseName or self._nodeTypes[0].replace("vtkMRML", "").replace("Node", "")))
        self.setCurrentNode(node)
        return node

    def nodeCount(self) -> int:
        return len(self._nodes)

    def nodeFromIndex(self, index: int):
        return self._nodes[index] if 0 <= index < len(self._nodes) else None


class ctkCollapsibleButton(PythonQtObject, QtWidgets.QAbstractButton):
    """A button-looking header over its own contents; clicking it collapses them."""

    contentsCollapsed = Signal(bool)
    _pythonQtSignals = ("contentsCollapsed(bool)",)
    _headerHeight = 24

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._collapsed = False
        self.setContentsMargins(4, self._headerHeight + 4, 4, 4)
        self.setSizePolicy(QtWidgets.QSizePolicy.Preferred, QtWidgets.QSizePolicy.Preferred)
        QtWidgets.QAbstractButton.clicked.__get__(self).connect(lambda: self._setCollapsed(not self._collapsed))

    def _setCollapsed(self, collapsed: bool) -> None:
        self._collapsed = bool(collapsed)
        for child in self.findChildren(QtWidgets.QWidget, options=QtCore.Qt.FindDirectChildrenOnly):
            child.setVisible(not self._collapsed)
        margins = (4, self._headerHeight, 4, 0) if self._collapsed else (4, self._headerHeight + 4, 4, 4)
        self.setContentsMargins(*margins)
        self.contentsCollapsed.emit(self._collapsed)
        self.updateGeometry()

    collapsed = Property(bool, lambda self: self._collapsed, _setCollapsed)

    def sizeHint(self) -> QtCore.QSize:
        layout = QtWidgets.QWidget.layout(self)
        inner = layout.sizeHint() if layout is not None and not self._collapsed else QtCore.QSize(0, 0)
        margins = self.contentsMargins()
        return QtCore.QSize(max(inner.width() + margins.left() + margins.right(), 120),
                            inner.height() + margins.top() + margins.bottom())

    def minimumSizeHint(self) -> QtCore.QSize:
        return self.sizeHint()

    def hitButton(self, position: QtCore.QPoint) -> bool:
        return position.y() < self._headerHeight

    # paintEvent reads geometry through the Qt base: under PythonQt semantics ``self.width``,
    # ``self.rect`` and ``self.palette`` are properties, not methods.
    def paintEvent(self, event) -> None:
        width, height = QtWidgets.QWidget.width(self), QtWidgets.QWidget.height(self)
        painter = QtWidgets.QStylePainter(self)
        option = QtWidgets.QStyleOptionButton()
        option.initFrom(self)
        option.rect = QtCore.QRect(0, 0, width, self._headerHeight)
        painter.drawControl(QtWidgets.QStyle.CE_PushButtonBevel, option)
        arrow = QtWidgets.QStyleOption()
        arrow.initFrom(self)
        arrow.rect = QtCore.QRect(6, 6, 12, 12)
        primitive = QtWidgets.QStyle.PE_IndicatorArrowRight if self._collapsed else QtWidgets.QStyle.PE_IndicatorArrowDown
        painter.drawPrimitive(primitive, arrow)
        painter.drawText(QtCore.QRect(24, 0, width - 28, self._headerHeight),
                         QtCore.Qt.AlignVCenter | QtCore.Qt.AlignLeft, QtWidgets.QAbstractButton.text(self))
        if not self._collapsed:
            painter.setPen(QtWidgets.QWidget.palette(self).mid().color())
            painter.drawRect(0, self._headerHeight, width - 1, height - self._headerHeight - 1)


class ctkSliderWidget(PythonQtObject, QtWidgets.QWidget):
    """A slider with a spin box; ``value``/``minimum``/``maximum``/``singleStep`` are properties only."""

    valueChanged = Signal(float)
    _pythonQtSignals = ("valueChanged(double)",)
    _ticks = 1000

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._spinBox = QtWidgets.QDoubleSpinBox(self)
        self._slider = QtWidgets.QSlider(QtCore.Qt.Horizontal, self)
        self._slider.setRange(0, self._ticks)
        layout = QtWidgets.QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self._slider, 1)
        layout.addWidget(self._spinBox)
        self._spinBox.valueChanged.connect(self._onSpinBox)
        self._slider.valueChanged.connect(self._onSlider)

    def _onSpinBox(self, value: float) -> None:
        low, high = self._spinBox.minimum(), self._spinBox.maximum()
        self._slider.blockSignals(True)
        self._slider.setValue(int(round((value - low) / (high - low) * self._ticks)) if high > low else 0)
        self._slider.blockSignals(False)
        self.valueChanged.emit(value)

    def _onSlider(self, tick: int) -> None:
        low, high = self._spinBox.minimum(), self._spinBox.maximum()
        self._spinBox.setValue(low + (high - low) * tick / self._ticks)

    def setValue(self, value: float) -> None:
        self._spinBox.setValue(float(value))

    def _setMinimum(self, value: float) -> None:
        self._spinBox.setMinimum(float(value))
        self._onSpinBox(self._spinBox.value())

    def _setMaximum(self, value: float) -> None:
        self._spinBox.setMaximum(float(value))
        self._onSpinBox(self._spinBox.value())

    value = Property(float, lambda self: self._spinBox.value(), setValue)
    minimum = Property(float, lambda self: self._spinBox.minimum(), _setMinimum)
    maximum = Property(float, lambda self: self._spinBox.maximum(), _setMaximum)
    singleStep = Property(float, lambda self: self._spinBox.singleStep(), lambda self, v: self._spinBox.setSingleStep(v))
    decimals = Property(int, lambda self: self._spinBox.decimals(), lambda self, v: self._spinBox.setDecimals(v))


# ----------------------------------------------------------------------------- views and layout

_COLOR_MAPS = {"Inferno": "inferno", "Viridis": "viridis"}


def _lookupTable(colorNodeId: str) -> np.ndarray:
    """(256, 3) uint8 colours of a Slicer colour node id (grey unless a known matplotlib map)."""
    for key, name in _COLOR_MAPS.items():
        if key in (colorNodeId or ""):
            from matplotlib import colormaps

            return (colormaps[name](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)
    return np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)


def _sliceRgb(volumeNode, sliceIndex: int | None) -> tuple[np.ndarray, np.ndarray] | None:
    """The voxel slice k of a volume as RGB through its display node, and where it has data."""
    from vtk.util import numpy_support

    imageData = volumeNode.GetImageData() if volumeNode else None
    if imageData is None:
        return None
    columns, rows, slices = imageData.GetDimensions()
    components = imageData.GetNumberOfScalarComponents()
    voxels = numpy_support.vtk_to_numpy(imageData.GetPointData().GetScalars()).reshape(slices, rows, columns, components)
    display = volumeNode.GetDisplayNode()
    component = display.GetDiffusionComponent() if hasattr(display, "GetDiffusionComponent") else 0
    plane = voxels[slices // 2 if sliceIndex is None else sliceIndex, :, :, component].astype(np.float64)
    if display.GetAutoWindowLevel():
        low, high = np.percentile(voxels[..., component], [1, 99])
    else:
        low, high = display.GetWindowLevelMin(), display.GetWindowLevelMax()
    scaled = np.clip((plane - low) / max(high - low, 1e-12), 0, 1)
    rgb = _lookupTable(display.GetColorNodeID())[(scaled * 255).astype(int)]
    return rgb[::-1], (plane != 0)[::-1]  # row 0 at the bottom, as a slice view shows anterior up


class qMRMLSliceWidget(PythonQtObject, QtWidgets.QWidget):
    """A slice view: draws the middle voxel slice of its background, the foreground blended on top."""

    def __init__(self, name: str, color: str, label: str, compositeNode, sliceNode, parent=None) -> None:
        super().__init__(parent)
        self._viewName, self._color, self._label = name, color, label
        self._composite, self._sliceNode = compositeNode, sliceNode
        self.setMinimumSize(160, 160)

    def mrmlSliceCompositeNode(self):
        return self._composite

    def mrmlSliceNode(self):
        return self._sliceNode

    def fitSliceToBackground(self) -> None:
        self.update()

    def _image(self) -> QtGui.QImage | None:
        scene = self._composite.GetScene()
        background = _sliceRgb(scene.GetNodeByID(self._composite.GetBackgroundVolumeID()), None)
        if background is None:
            return None
        rgb, _ = background
        foreground = _sliceRgb(scene.GetNodeByID(self._composite.GetForegroundVolumeID()), None)
        if foreground is not None and foreground[0].shape == rgb.shape:
            alpha = self._composite.GetForegroundOpacity() * foreground[1][..., None]
            rgb = (rgb * (1 - alpha) + foreground[0] * alpha).astype(np.uint8)
        rgb = np.ascontiguousarray(rgb)
        return QtGui.QImage(rgb.data, rgb.shape[1], rgb.shape[0], 3 * rgb.shape[1], QtGui.QImage.Format_RGB888).copy()

    def paintEvent(self, event) -> None:
        width, height = QtWidgets.QWidget.width(self), QtWidgets.QWidget.height(self)
        painter = QtGui.QPainter(self)
        painter.fillRect(0, 0, width, height, QtGui.QColor("black"))
        image = self._image()
        if image is not None:
            target = QtCore.QRect(0, 22, width, height - 22)
            scaled = image.scaled(target.size(), QtCore.Qt.KeepAspectRatio, QtCore.Qt.FastTransformation)
            painter.drawImage(target.x() + (target.width() - scaled.width()) // 2,
                              target.y() + (target.height() - scaled.height()) // 2, scaled)
        painter.fillRect(0, 0, width, 20, QtGui.QColor(self._color))
        painter.setPen(QtGui.QColor("black"))
        painter.drawText(QtCore.QRect(6, 0, width - 12, 20), QtCore.Qt.AlignVCenter, self._label)


class qSlicerLayoutManager(PythonQtObject, QtCore.QObject):
    """Builds its viewport from the layout node's current description (view singleton tags)."""

    _defaultViews = (("Red", "#F34A33", "R"), ("Yellow", "#EDD54C", "Y"), ("Green", "#6EB04B", "G"))

    def __init__(self, scene) -> None:
        super().__init__()
        self._scene = scene
        self._viewport = QtWidgets.QWidget()
        self._viewport.resize(1200, 420)
        QtWidgets.QHBoxLayout(self._viewport).setContentsMargins(0, 0, 0, 0)
        self._sliceWidgets: dict[str, qMRMLSliceWidget] = {}
        self._layoutNode = None

    def _ensureSceneNodes(self) -> None:
        """The singleton layout, slice and composite nodes a Slicer main window keeps in the scene."""
        if self._layoutNode is None or self._layoutNode.GetScene() is None:
            self._layoutNode = self._scene.GetFirstNodeByClass("vtkMRMLLayoutNode")
            if self._layoutNode is None:
                node = self._scene.CreateNodeByClass("vtkMRMLLayoutNode")
                node.SetSingletonTag("vtkMRMLLayoutNode")
                self._layoutNode = self._scene.AddNode(node)
            self._layoutNode.AddObserver("ModifiedEvent", lambda caller, event: self._rebuild())
        for name, color, label in self._defaultViews:
            for className in ("vtkMRMLSliceNode", "vtkMRMLSliceCompositeNode"):
                if self._scene.GetSingletonNode(name, className) is None:
                    node = self._scene.CreateNodeByClass(className)
                    node.SetSingletonTag(name)
                    node.SetLayoutName(name)
                    self._scene.AddNode(node)

    def _rebuild(self) -> None:
        layout = self._viewport.layout()
        while layout.count():
            layout.takeAt(0).widget().setParent(None)
        description = self._layoutNode.GetCurrentLayoutDescription()
        names = [(view.get("singletontag"), {p.get("name"): p.text for p in view.findall("property")})
                 for view in ElementTree.fromstring(description).iter("view")] if description else []
        for name, properties in names:
            widget = self.sliceWidget(name)
            widget._color = properties.get("viewcolor", widget._color)
            widget._label = properties.get("viewlabel", widget._label)
            layout.addWidget(widget)
            widget.show()

    def sliceWidget(self, name: str):
        self._ensureSceneNodes()
        if name not in self._sliceWidgets:
            color, label = next(((c, l) for n, c, l in self._defaultViews if n == name), ("#888888", name))
            self._sliceWidgets[name] = qMRMLSliceWidget(
                name, color, label, self._scene.GetSingletonNode(name, "vtkMRMLSliceCompositeNode"),
                self._scene.GetSingletonNode(name, "vtkMRMLSliceNode"))
        return self._sliceWidgets[name]

    def viewport(self):
        return self._viewport


class qSlicerApplication:
    """``slicer.app``: the members of qSlicerApplication the module and the stand-in use."""

    def __init__(self, scene, temporaryPath: str) -> None:
        self.temporaryPath = temporaryPath
        self._scene = scene
        self._layoutManager = qSlicerLayoutManager(scene)

    def processEvents(self) -> None:
        QtWidgets.QApplication.processEvents()

    def layoutManager(self):
        self._layoutManager._ensureSceneNodes()
        return self._layoutManager

    @staticmethod
    def testingEnabled() -> bool:
        return True

    def mrmlScene(self):
        return self._scene
