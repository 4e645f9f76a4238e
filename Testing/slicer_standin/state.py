"""The stand-in application's state, shared by its modules and inspected by tests."""

scene = None  # the vtkMRMLScene stand-in (slicer.mrmlScene)
app = None  # the qSlicerApplication stand-in (slicer.app)
messages: list = []  # (kind, text) of every dialog the module would have shown
confirmAnswer = True  # what confirm dialogs answer
pipInstalls: list = []  # requirements passed to slicer.util.pip_install
loadedFiles: list = []  # paths read by slicer.util.loadVolume
