"""PythonQt semantics on real PySide6 widgets, and the flat ``qt`` module built from them.

What Slicer's PythonQt does and PySide6 does not (../../../shared/slicer-api/pythonqt.md):
Qt properties read and write as attributes (``button.text = "Cancel"``), ``.name`` is objectName,
dynamic properties read as attributes once set, ``obj.connect("clicked(bool)", fn)`` connects by
signature string (checked against the meta-object), and ``exec_()`` calls ``exec()``.
"""

from __future__ import annotations

import re
import sys
import types

from PySide6 import QtCore, QtGui, QtUiTools, QtWidgets

# C++ signal argument types -> the Python types PySide6 uses to pick an overload.
_SIGNAL_ARGUMENT_TYPES = {"bool": bool, "int": int, "double": float, "float": float, "QString": str,
                          "vtkMRMLNode*": object, "vtkMRMLScene*": object}
_propertyNamesCache: dict[type, frozenset] = {}


# Properties named like a virtual method (QWidget.sizeHint): Shiboken looks the method up by name on
# the instance whenever C++ calls it, so those names must keep resolving to the method. Slicer code
# never reads these as properties.
_VIRTUAL_METHOD_PROPERTIES = frozenset({"sizeHint", "minimumSizeHint"})


def _propertyNames(cls: type) -> frozenset:
    names = _propertyNamesCache.get(cls)
    if names is None:
        meta = cls.staticMetaObject
        names = frozenset(meta.property(index).name() for index in range(meta.propertyCount())) - _VIRTUAL_METHOD_PROPERTIES
        _propertyNamesCache[cls] = names
    return names


def _dynamicPropertyNames(obj) -> set[str]:
    return {bytes(name).decode() for name in QtCore.QObject.dynamicPropertyNames(obj)}


# While Qt reads a property, Shiboken looks up virtual overrides by name on the instance (reading
# QProgressBar's "text" calls the virtual text()): that lookup must find the method, not the property.
_readingProperty: set[tuple[int, str]] = set()


class PythonQtObject:
    """Mixin giving a PySide6 QObject subclass the attribute behaviour of PythonQt."""

    # Signatures (PythonQt form) of signals declared in Python by stand-in classes; their meta-object
    # signatures say "PyObject" where Slicer's say "vtkMRMLNode*".
    _pythonQtSignals: tuple[str, ...] = ()

    def __getattribute__(self, name: str):
        key = (id(self), name)
        if not name.startswith("_") and key not in _readingProperty:
            if name in _propertyNames(type(self)) or name in _dynamicPropertyNames(self):
                _readingProperty.add(key)
                try:
                    return QtCore.QObject.property(self, name)
                finally:
                    _readingProperty.discard(key)
            if name == "name":
                return QtCore.QObject.objectName(self)
            if name in _PYTHONQT_METHODS:
                # Shiboken resolves QObject.connect to the C++ static before a Python override.
                return types.MethodType(_PYTHONQT_METHODS[name], self)
        return super().__getattribute__(name)

    def __setattr__(self, name: str, value) -> None:
        if not name.startswith("_"):
            if name in _propertyNames(type(self)) or name in _dynamicPropertyNames(self):
                QtCore.QObject.setProperty(self, name, value)
                return
            if name == "name":
                QtCore.QObject.setObjectName(self, value)
                return
        super().__setattr__(name, value)

    def _hasSignal(self, signature: str) -> bool:
        if signature in type(self)._pythonQtSignals:
            return True
        normalized = QtCore.QMetaObject.normalizedSignature(signature).data().decode()
        return type(self).staticMetaObject.indexOfSignal(normalized) >= 0

    def connect(self, signature: str, receiver, slot: str | None = None) -> bool:
        """``obj.connect("signal(args)", callable)`` or ``obj.connect("signal(args)", obj2, "slot(args)")``."""
        match = re.fullmatch(r"(\w+)\((.*)\)", signature.replace(" ", ""))
        if not match or not self._hasSignal(signature.replace(" ", "")):
            raise AttributeError(f"{type(self).__name__} has no signal {signature}")
        name, arguments = match.group(1), [a for a in match.group(2).split(",") if a]
        signal = super().__getattribute__(name)
        if arguments:
            key = tuple(_SIGNAL_ARGUMENT_TYPES.get(argument, object) for argument in arguments)
            signal = signal[key if len(key) > 1 else key[0]]
        if slot is not None:
            receiver = getattr(receiver, slot.split("(")[0])
        signal.connect(receiver)
        return True

    def exec_(self, *args):
        return self.exec(*args)


_PYTHONQT_METHODS = {"connect": PythonQtObject.connect, "exec_": PythonQtObject.exec_}
_wrappedClasses: dict[str, type] = {}


def wrappedQtClass(name: str) -> type | None:
    """The PythonQt-behaving subclass of the Qt class ``name`` (created once), or None."""
    if name in _wrappedClasses:
        return _wrappedClasses[name]
    for module in (QtWidgets, QtGui, QtCore, QtUiTools):
        base = getattr(module, name, None)
        if base is not None:
            break
    else:
        return None
    if isinstance(base, type) and issubclass(base, QtCore.QObject) and base is not QtCore.QObject:
        wrapped = type(name, (PythonQtObject, base), {"__module__": "qt"})
    else:
        wrapped = base  # enums, value types, QTimer's static singleShot: PySide already matches
    _wrappedClasses[name] = wrapped
    return wrapped


def makeQtModule() -> types.ModuleType:
    """The flat ``qt`` module: ``qt.QPushButton``, ``qt.Qt.AlignLeft``, ``qt.QTimer.singleShot``."""
    module = types.ModuleType("qt", "Stand-in for Slicer's flat PythonQt module")

    def __getattr__(name: str):
        wrapped = wrappedQtClass(name)
        if wrapped is None:
            raise AttributeError(f"module 'qt' has no attribute {name!r}")
        return wrapped

    module.__getattr__ = __getattr__
    sys.modules["qt"] = module
    return module
