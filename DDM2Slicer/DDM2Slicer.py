"""DDM2Slicer: self-supervised DDM2 denoising of diffusion MRI in 3D Slicer (5.10 and later).

The panel binds a parameter node to the logic; the logic writes the DWI node to a temporary NRRD,
runs the engine (``PythonSlicer -m ddm2 denoise ... --progress json``) as a background process, and
loads its results back as nodes. torch only ever runs in that process, never in Slicer's.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import vtk

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin
from slicer import vtkMRMLDiffusionWeightedVolumeNode, vtkMRMLScalarVolumeNode

from DDM2SlicerLib import dependencies, engine, jobs, scene, views

LOG_LIMIT_CHARACTERS = 256 * 1024  # the log box is trimmed beyond this, keeping the newest lines


class DDM2Slicer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("DDM2 Denoising")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Diffusion")]
        self.parent.dependencies = []
        self.parent.contributors = ["DDM2Slicer team"]
        self.parent.helpText = _(
            "Self-supervised denoising of a diffusion-weighted volume with DDM2 (Xiang et al., ICLR 2023). "
            "Choose a DWI, the number of neighbouring volumes and the training steps, and press Apply: "
            "training runs in the background on the GPU (or CPU), then the denoised DWI, a residual map "
            "and FA/MD/AD/RD maps appear in the scene. Compare shows input | denoised | residual side by "
            "side. See <a href=\"https://github.com/ddm2slicer/DDM2Slicer\">the project page</a>.")
        self.parent.acknowledgementText = _(
            "DDM2 is by Tiange Xiang, Mahmut Yurt, Ali B Syed, Kawin Setsompop and Akshay Chaudhari. "
            "The module follows the patterns of SlicerTotalSegmentator and SlicerMONAIAuto3DSeg.")


@parameterNodeWrapper
class DDM2SlicerParameterNode:
    """The panel's state, saved with the scene."""

    inputVolume: vtkMRMLDiffusionWeightedVolumeNode
    neighbours: Annotated[int, WithinRange(0, 10)] = 0  # 0: auto
    stage1Steps: Annotated[int, WithinRange(1, 1000000)] = engine.PRESET_STEPS["quick preview"][0]
    stage3Steps: Annotated[int, WithinRange(1, 1000000)] = engine.PRESET_STEPS["quick preview"][1]
    preset: Annotated[str, Choice(list(engine.PRESET_ARGUMENTS))] = "quick preview"
    device: Annotated[str, Choice(list(engine.DEVICE_ARGUMENTS))] = "auto"
    noiseSigma: Annotated[float, WithinRange(0.0, 1.0e9)] = 0.0
    b0Guide: Annotated[str, Choice(list(engine.B0_GUIDE_ARGUMENTS))] = "auto"
    outputVolume: vtkMRMLDiffusionWeightedVolumeNode
    residualVolume: vtkMRMLScalarVolumeNode
    faVolume: vtkMRMLScalarVolumeNode
    loadFullResidual: bool = False
    keepTemporaryFiles: bool = False
    mapsInputVolume: vtkMRMLDiffusionWeightedVolumeNode
    overlayOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.4


class DDM2SlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Binds the panel to the parameter node and the logic; holds no computation."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._dependenciesChecked = False
        self._lastPreset = None
        self._warnings: list[str] = []  # the engine's, of the run in progress: shown with its results

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DDM2Slicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = DDM2SlicerLogic()
        self.logic.logCallback = self.appendLog

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.compareButton.connect("clicked(bool)", self.onCompareButton)
        self.ui.computeMapsButton.connect("clicked(bool)", self.onComputeMapsButton)
        self.ui.progressBar.hide()

        self.initializeParameterNode()
        self.ui.deviceLabel.text = _("Detecting the GPU...")
        self.logic.detectDevice(self.onDeviceDetected)

    def cleanup(self) -> None:
        self.removeObservers()
        if self.logic:
            self.logic.cancel()
            self.logic.discardResumableRun()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstDwi = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLDiffusionWeightedVolumeNode")
            if firstDwi:
                self._parameterNode.inputVolume = firstDwi

    def setParameterNode(self, inputParameterNode: DDM2SlicerParameterNode | None) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._lastPreset = self._parameterNode.preset
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self.onParameterNodeModified()

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        parameters = self._parameterNode
        if parameters.preset != self._lastPreset:
            # Choosing a preset fills in its step counts; the user may still edit them afterwards.
            self._lastPreset = parameters.preset
            parameters.stage1Steps, parameters.stage3Steps = engine.PRESET_STEPS[parameters.preset]
        views.setOverlayOpacity(parameters.overlayOpacity)
        self.updateButtons()

    def updateButtons(self) -> None:
        parameters = self._parameterNode
        if parameters is None:
            return
        running = self.logic.busy
        if running:
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop training; the run can be resumed with Apply")
            self.ui.applyButton.enabled = not self.logic.cancelling
        else:
            resumable = parameters.inputVolume and self.logic.canResume(parameters.inputVolume, self.currentSettings())
            self.ui.applyButton.text = _("Resume") if resumable else _("Apply")
            self.ui.applyButton.enabled = bool(parameters.inputVolume)
            self.ui.applyButton.toolTip = (_("Denoise the selected DWI") if parameters.inputVolume
                                           else _("Select a diffusion-weighted volume first"))
        self.ui.compareButton.enabled = bool(parameters.inputVolume and parameters.outputVolume) and not running
        self.ui.computeMapsButton.enabled = bool(parameters.mapsInputVolume) and not running

    def currentSettings(self) -> engine.DenoiseSettings:
        return self.logic.settingsFromParameterNode(self._parameterNode)

    # ------------------------------------------------------------------ actions

    def ensureDependencies(self) -> bool:
        """Check the engine's packages once; offer to install what is missing."""
        if self._dependenciesChecked:
            return True
        versions = dependencies.installedVersions()
        missing = dependencies.missingPackages(versions)
        if missing and not slicer.util.confirmOkCancelDisplay(
                _("DDM2 needs these Python packages, which are not installed yet: {packages}. "
                  "Install them now? This can take several minutes.").format(packages=", ".join(missing))):
            return False
        if missing:
            with slicer.util.tryWithErrorDisplay(_("Installing the DDM2 packages failed."), waitCursor=True):
                dependencies.installPackages(missing)
            versions = dependencies.installedVersions()
        self.ui.dependenciesLabel.text = dependencies.describeVersions(versions)
        self._dependenciesChecked = True
        return True

    def onApplyButton(self) -> None:
        if self.logic.busy:
            self.appendLog(_("Cancelling: the engine stops at its next step and keeps a checkpoint."))
            self.logic.cancel()
            self.updateButtons()
            return
        if not self.ensureDependencies():
            return
        parameters = self._parameterNode
        self.ui.statusLabel.text = ""
        self._warnings = []
        self.ui.progressBar.value = 0
        self.ui.progressBar.format = _("Starting...")
        self.ui.progressBar.show()
        with slicer.util.tryWithErrorDisplay(_("Failed to start denoising."), waitCursor=True):
            self.logic.keepTemporaryFiles = parameters.keepTemporaryFiles
            self.logic.startDenoising(parameters.inputVolume, self.currentSettings(),
                                      onEvent=self.onEngineEvent, onFinished=self.onDenoisingFinished)
        self.updateButtons()

    def onEngineEvent(self, event: dict) -> None:
        if event["event"] == "progress":
            percent, text = engine.describeProgress(event)
            self.ui.progressBar.value = percent
            self.ui.progressBar.format = f"{percent}%  {text}"
        elif event["event"] == "start":
            self.appendLog(_("Engine started on {device}; run folder {folder}").format(
                device=event.get("device", "?"), folder=event.get("run_dir", "?")))
        elif event["event"] == "error":
            self.appendLog(_("Engine error: {message}").format(message=event.get("message", "")))
        elif event["event"] == "warning":  # the log box has it already, from the engine's log
            self._warnings.append(event.get("message", ""))

    def onDenoisingFinished(self, result: jobs.JobResult) -> None:
        parameters = self._parameterNode
        if result.state == jobs.DONE:
            self.ui.progressBar.format = _("Loading results...")
            with slicer.util.tryWithErrorDisplay(_("Failed to load the results."), waitCursor=True):
                nodes = self.logic.loadResults(result, parameters.inputVolume, parameters.outputVolume,
                                               parameters.residualVolume, parameters.faVolume,
                                               parameters.loadFullResidual)
                parameters.outputVolume = nodes["denoised"]
                parameters.residualVolume = nodes["residual_rms"]
                parameters.faVolume = nodes["fa"]
                parameters.mapsInputVolume = nodes["denoised"]
                self.ui.progressBar.value = 100
                self.ui.progressBar.format = _("Done")
                self.ui.statusLabel.text = " ".join(
                    [_("Denoised: the results are in the scene.")]
                    + [_("Check: {warning}.").format(warning=warning) for warning in self._warnings])
        elif result.state == jobs.CANCELLED:
            self.ui.progressBar.format = _("Cancelled: press Resume to continue")
            self.ui.statusLabel.text = _("Cancelled; the run can be resumed.")
        else:
            self.ui.progressBar.format = _("Failed")
            self.ui.statusLabel.text = result.errorMessage
            if not slicer.app.testingEnabled():
                slicer.util.errorDisplay(_("Denoising failed: {message}").format(message=result.errorMessage))
        self.updateButtons()

    def onCompareButton(self) -> None:
        parameters = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to set up the comparison."), waitCursor=True):
            self.logic.setupCompareView(parameters.inputVolume, parameters.outputVolume, parameters.residualVolume,
                                        parameters.faVolume, parameters.overlayOpacity)

    def onComputeMapsButton(self) -> None:
        if not self.ensureDependencies():
            return
        self.ui.progressBar.value = 0
        self.ui.progressBar.format = _("Computing DTI maps...")
        self.ui.progressBar.show()
        with slicer.util.tryWithErrorDisplay(_("Failed to start the map computation."), waitCursor=True):
            self.logic.startMaps(self._parameterNode.mapsInputVolume, onFinished=self.onMapsFinished)
        self.updateButtons()

    def onMapsFinished(self, nodes: dict | None, result: jobs.JobResult) -> None:
        if nodes:
            self.ui.progressBar.value = 100
            names = ", ".join(node.GetName() for node in nodes.values())
            self.ui.progressBar.format = _("Maps loaded: {names}").format(names=names)
        else:
            self.ui.progressBar.format = _("Maps failed")
            self.ui.statusLabel.text = result.errorMessage
        self.updateButtons()

    def onDeviceDetected(self, info: dict) -> None:
        self.ui.deviceLabel.text = dependencies.describeDevice(info)

    def appendLog(self, text: str) -> None:
        log = self.ui.logTextEdit
        if len(log.plainText) > LOG_LIMIT_CHARACTERS:
            log.setPlainText(log.plainText[-LOG_LIMIT_CHARACTERS // 2:])
        log.appendPlainText(text)


class DDM2SlicerLogic(ScriptedLoadableModuleLogic):
    """Denoising, maps and the comparison view; usable without the widget (scripts, tests).

    Blocking use: ``DDM2SlicerLogic().process(inputNode)``. The widget uses the non-blocking
    ``startDenoising``/``cancel`` and gets results through callbacks on the GUI thread.
    Plain attributes a caller may set: ``logCallback`` (one log line), ``keepTemporaryFiles``.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.logCallback = None
        self.keepTemporaryFiles = False
        self.job: jobs.EngineJob | None = None
        self._resumable: tuple | None = None  # (key, temporary folder) of the last cancelled run
        self._ownedFolders: set[Path] = set()  # temporary folders this logic made and may remove
        self._deviceJob: jobs.EngineJob | None = None

    def getParameterNode(self) -> DDM2SlicerParameterNode:
        return DDM2SlicerParameterNode(super().getParameterNode())

    @staticmethod
    def settingsFromParameterNode(parameters: DDM2SlicerParameterNode) -> engine.DenoiseSettings:
        return engine.DenoiseSettings(neighbours=parameters.neighbours, stage1Steps=parameters.stage1Steps,
                                      stage3Steps=parameters.stage3Steps, preset=parameters.preset,
                                      device=parameters.device, noiseSigma=parameters.noiseSigma,
                                      b0Guide=parameters.b0Guide)

    def log(self, text: str) -> None:
        if self.logCallback:
            self.logCallback(text)

    @property
    def busy(self) -> bool:
        return self.job is not None and self.job.running

    @property
    def cancelling(self) -> bool:
        return self.job is not None and self.job.state == jobs.CANCELLING

    # ------------------------------------------------------------------ denoising

    @staticmethod
    def _runKey(inputNode, settings: engine.DenoiseSettings) -> tuple:
        # The voxels' modification time makes an edited input start afresh instead of resuming.
        return inputNode.GetID(), inputNode.GetImageData().GetMTime(), settings.arguments()

    def canResume(self, inputNode, settings: engine.DenoiseSettings) -> bool:
        return self._resumable is not None and self._resumable[0] == self._runKey(inputNode, settings)

    def discardResumableRun(self) -> None:
        if self._resumable is not None:
            self._removeOwnedFolder(self._resumable[1], force=True)
            self._resumable = None

    def startDenoising(self, inputNode, settings: engine.DenoiseSettings | None = None, onEvent=None,
                       onFinished=None, useTimer: bool = True) -> jobs.EngineJob:
        """Start the engine on ``inputNode`` in the background; resumes a cancelled identical run."""
        if self.busy:
            raise RuntimeError("a DDM2 run is already in progress")
        if inputNode is None or inputNode.GetImageData() is None:
            raise ValueError("select a diffusion-weighted volume with voxel data")
        settings = settings or engine.DenoiseSettings()
        key = self._runKey(inputNode, settings)
        resume = self.canResume(inputNode, settings)
        if resume:
            folder = self._resumable[1]
            self.log(f"Resuming the cancelled run in {folder}")
        else:
            self.discardResumableRun()
            folder = Path(slicer.util.tempDirectory("DDM2"))
            scene.writeDwiNode(inputNode, folder / "input.nrrd")
        self._resumable = None
        runDirectory = folder / "run"
        command = engine.denoiseCommand(engine.pythonExecutable(), folder / "input.nrrd", runDirectory, settings,
                                        resume=resume)
        self.log("Running: " + " ".join(command))

        self._ownedFolders.add(folder)

        def finished(result: jobs.JobResult) -> None:
            if result.state == jobs.CANCELLED:
                self._resumable = (key, folder)
            elif result.state == jobs.FAILED:
                self.log(f"Failed: {result.errorMessage}")
                self._removeOwnedFolder(folder)
            # A DONE run's folder goes once loadResults has read it.
            if onFinished:
                onFinished(result)

        environment = engine.engineEnvironment(slicer.util.startupEnvironment(), forceCpu=settings.device == "CPU")
        self.job = jobs.EngineJob(command, runDirectory, environment, onEvent=onEvent, onLog=self.log,
                                  onFinished=finished)
        self.job.start(useTimer=useTimer)
        return self.job

    def cancel(self) -> None:
        if self.busy:
            self.job.cancel()

    def _removeOwnedFolder(self, folder: Path, force: bool = False) -> None:
        """Remove a temporary folder of this logic, unless the user asked to keep them."""
        if folder in self._ownedFolders and (force or not self.keepTemporaryFiles):
            shutil.rmtree(folder, ignore_errors=True)
            self._ownedFolders.discard(folder)

    def process(self, inputNode, outputNode=None, settings: engine.DenoiseSettings | None = None,
                residualNode=None, faNode=None, loadFullResidual: bool = False,
                timeout: float | None = None) -> dict:
        """Denoise ``inputNode`` and load the results; blocks until the engine is done.

        Returns the loaded nodes by output name ("denoised", "residual_rms", "fa", "fa_input", ...).
        Raises RuntimeError with the engine's own message when it fails or is cancelled.
        """
        job = self.startDenoising(inputNode, settings, useTimer=False)
        result = job.waitForFinished(timeout)
        if result.state != jobs.DONE:
            raise RuntimeError(f"DDM2 denoising {result.state}: {result.errorMessage}".rstrip(": "))
        return self.loadResults(result, inputNode, outputNode, residualNode, faNode, loadFullResidual)

    @staticmethod
    def _outputPath(result: jobs.JobResult, key: str, fileName: str) -> Path:
        return Path(result.outputs.get(key) or result.runDirectory / fileName)

    def loadResults(self, result: jobs.JobResult, inputNode, outputNode=None, residualNode=None, faNode=None,
                    loadFullResidual: bool = False) -> dict:
        """Load a finished run's outputs as nodes (into the given nodes where provided)."""
        baseName = inputNode.GetName()
        denoisedVoxels = scene.readVoxels(self._outputPath(result, "denoised_nrrd", "denoised.nrrd"), inputNode)
        if outputNode is None:
            outputNode = scene.newDwiNode(inputNode, denoisedVoxels, f"{baseName} denoised")
        else:
            scene.fillDwiNode(outputNode, inputNode, denoisedVoxels)
        nodes = {"denoised": outputNode}
        residual = scene.loadScalarVolume(self._outputPath(result, "residual_rms", "residual_rms.nii.gz"),
                                          f"{baseName} residual RMS", residualNode)
        scene.styleResidualRms(residual)
        nodes["residual_rms"] = residual
        if loadFullResidual:
            # input - denoised, exactly what residual.nii.gz holds, kept as a DWI so that it keeps the
            # gradient table and can be browsed volume by volume like the input.
            inputVoxels = slicer.util.arrayFromVolume(inputNode).astype(np.float32)
            nodes["residual"] = scene.newDwiNode(inputNode, inputVoxels - denoisedVoxels, f"{baseName} residual")
        for mapName in scene.MAP_NAMES:
            for key, label in ((mapName, "denoised"), (f"{mapName}_input", "input")):
                target = faNode if key == "fa" else None
                node = scene.loadScalarVolume(self._outputPath(result, key, f"{key}.nii.gz"),
                                              f"{baseName} {label} {mapName.upper()}", target)
                scene.styleMap(node, mapName)
                nodes[key] = node
        self._removeOwnedFolder(result.runDirectory.parent)
        return nodes

    # ------------------------------------------------------------------ maps without training

    def startMaps(self, dwiNode, onFinished=None, useTimer: bool = True) -> jobs.EngineJob:
        """Compute FA/MD/AD/RD of any DWI in the background; ``onFinished(nodes or None, result)``."""
        if self.busy:
            raise RuntimeError("a DDM2 run is already in progress")
        folder = Path(slicer.util.tempDirectory("DDM2maps"))
        self._ownedFolders.add(folder)
        scene.writeDwiNode(dwiNode, folder / "input.nrrd")
        command = engine.mapsCommand(engine.pythonExecutable(), folder / "input.nrrd", folder / "maps")
        environment = engine.engineEnvironment(slicer.util.startupEnvironment())

        def finished(result: jobs.JobResult) -> None:
            nodes = None
            try:
                if result.state == jobs.DONE:
                    nodes = self.loadMaps(folder / "maps", dwiNode)
                else:
                    self.log(f"Maps failed: {result.errorMessage}")
            finally:
                self._removeOwnedFolder(folder)
            if onFinished:
                onFinished(nodes, result)

        self.job = jobs.EngineJob(command, folder / "maps", environment, onLog=self.log, onFinished=finished)
        self.job.start(useTimer=useTimer)
        return self.job

    def computeMaps(self, dwiNode, timeout: float | None = None) -> dict:
        """FA/MD/AD/RD maps of ``dwiNode`` as scalar volumes; blocks until done."""
        loaded = {}
        job = self.startMaps(dwiNode, onFinished=lambda nodes, result: loaded.update(nodes or {}), useTimer=False)
        result = job.waitForFinished(timeout)
        if result.state != jobs.DONE:
            raise RuntimeError(f"DTI maps {result.state}: {result.errorMessage}")
        return loaded

    def loadMaps(self, directory: str | os.PathLike, dwiNode) -> dict:
        nodes = {}
        for mapName in scene.MAP_NAMES:
            node = scene.loadScalarVolume(Path(directory) / f"{mapName}.nii.gz",
                                          f"{dwiNode.GetName()} {mapName.upper()}")
            scene.styleMap(node, mapName)
            nodes[mapName] = node
        return nodes

    # ------------------------------------------------------------------ views and environment

    def setupCompareView(self, inputNode, denoisedNode, residualNode=None, faNode=None,
                         overlayOpacity: float = 0.4, diffusionComponent: int | None = None) -> dict:
        """Input | denoised | residual, linked, FA overlaid; both DWIs show the same gradient volume.

        The default component is the first diffusion-weighted volume: the b = 0 volume shows almost
        no noise difference, the diffusion-weighted ones are where denoising matters.
        """
        if inputNode is None or denoisedNode is None:
            raise ValueError("the comparison needs the input and the denoised DWI")
        if diffusionComponent is None:
            _, bValues = scene.gradientTable(inputNode)
            weighted = np.flatnonzero(bValues > 50.0)
            diffusionComponent = int(weighted[0]) if weighted.size else 0
        return views.setupCompare(inputNode, denoisedNode, residualNode, faNode, overlayOpacity, diffusionComponent)

    def detectDevice(self, onDetected, useTimer: bool = True) -> jobs.EngineJob:
        """Ask a PythonSlicer subprocess which GPU torch sees; ``onDetected(info)`` on the GUI thread."""
        folder = Path(slicer.util.tempDirectory("DDM2probe"))
        self._ownedFolders.add(folder)
        detected = {}

        def finished(result: jobs.JobResult) -> None:
            self._removeOwnedFolder(folder, force=True)
            onDetected(detected or {"torch": None, "error": result.errorMessage})

        command = [engine.pythonExecutable(), "-c", dependencies.DEVICE_PROBE]
        self._deviceJob = jobs.EngineJob(command, folder, engine.engineEnvironment(slicer.util.startupEnvironment()),
                                         onEvent=detected.update, onFinished=finished)
        self._deviceJob.start(useTimer=useTimer)
        return self._deviceJob


class DDM2SlicerTest(ScriptedLoadableModuleTest):
    """Runs the whole flow on a tiny synthetic DWI with CPU settings (seconds to a minute)."""

    # The smallest run that still goes through every stage (the quick preview samples with one step).
    tinySettings = engine.DenoiseSettings(neighbours=2, stage1Steps=2, stage3Steps=2, preset="quick preview",
                                          device="CPU", seed=0)

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_DenoiseTinyDwiKeepsGradientsAndGeometry()
        self.setUp()
        self.test_CancelThenResume()
        self.setUp()
        self.test_MapsWithoutTraining()

    @staticmethod
    def createSyntheticDwi(name: str = "tiny DWI", shape=(16, 16, 4), seed: int = 0):
        """A DWI node: 1 b=0 + 7 directions at b=1000, an anisotropic tensor, Rician noise.

        Oblique geometry and a non-identity measurement frame make every conversion show.
        """
        rng = np.random.default_rng(seed)
        directions = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1], [1, -1, 1]], float)
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        gradients = np.vstack([np.zeros(3), directions])
        bValues = np.array([0.0] + [1000.0] * 7)
        tensor = np.diag([1.7e-3, 0.3e-3, 0.3e-3])
        signal = np.exp(-bValues * np.einsum("ni,ij,nj->n", gradients, tensor, gradients))
        columns, rows, slices = shape
        intensity = np.ones((slices, rows, columns))
        intensity[:, rows // 4: 3 * rows // 4, columns // 4: 3 * columns // 4] = 2.0
        clean = 400.0 * intensity[..., None] * signal
        noisy = np.abs(clean + rng.normal(0, 20.0, clean.shape) + 1j * rng.normal(0, 20.0, clean.shape))

        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLDiffusionWeightedVolumeNode", name)
        angle = np.deg2rad(10.0)
        ijkToRas = np.array([[-np.cos(angle) * 1.5, np.sin(angle) * 1.5, 0, 12.0],
                             [-np.sin(angle) * 1.5, -np.cos(angle) * 1.5, 0, 20.0],
                             [0, 0, 2.5, -4.0], [0, 0, 0, 1]])
        node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijkToRas))
        frame = vtk.vtkMatrix4x4()
        for row, values in enumerate(((0, 1, 0), (1, 0, 0), (0, 0, -1))):
            for column, value in enumerate(values):
                frame.SetElement(row, column, value)
        node.SetMeasurementFrameMatrix(frame)
        node.SetNumberOfGradients(len(bValues))
        for index, (gradient, bValue) in enumerate(zip(gradients, bValues)):
            node.SetDiffusionGradient(index, gradient)
            node.SetBValue(index, bValue)
        slicer.util.updateVolumeFromArray(node, noisy.astype(np.float32))
        node.CreateDefaultDisplayNodes()
        return node

    def test_DenoiseTinyDwiKeepsGradientsAndGeometry(self) -> None:
        self.delayDisplay("Denoising a tiny synthetic DWI on the CPU")
        inputNode = self.createSyntheticDwi()
        logic = DDM2SlicerLogic()
        logic.logCallback = print
        nodes = logic.process(inputNode, settings=self.tinySettings, timeout=600)
        denoised = nodes["denoised"]
        self.assertEqual(denoised.GetClassName(), "vtkMRMLDiffusionWeightedVolumeNode")
        inputGradients, inputBValues = scene.gradientTable(inputNode)
        outputGradients, outputBValues = scene.gradientTable(denoised)
        np.testing.assert_allclose(outputGradients, inputGradients)
        np.testing.assert_allclose(outputBValues, inputBValues)
        np.testing.assert_allclose(scene.ijkToRasArray(denoised), scene.ijkToRasArray(inputNode))
        np.testing.assert_allclose(scene.measurementFrameArray(denoised), scene.measurementFrameArray(inputNode))
        self.assertEqual(slicer.util.arrayFromVolume(denoised).shape, slicer.util.arrayFromVolume(inputNode).shape)
        fa = slicer.util.arrayFromVolume(nodes["fa"])
        self.assertTrue(0.0 <= fa.min() and fa.max() <= 1.0 + 1e-6)
        composites = logic.setupCompareView(inputNode, denoised, nodes["residual_rms"], nodes["fa"], 0.3)
        self.assertEqual(composites["Yellow"].GetBackgroundVolumeID(), denoised.GetID())
        self.delayDisplay("Denoising passed")

    def test_CancelThenResume(self) -> None:
        self.delayDisplay("Cancelling a run, then resuming it")
        inputNode = self.createSyntheticDwi()
        logic = DDM2SlicerLogic()
        # Enough steps that Cancel lands mid-training, few enough for a CPU test.
        settings = engine.DenoiseSettings(neighbours=2, stage1Steps=100, stage3Steps=50, preset="quick preview",
                                          device="CPU", seed=0)
        events = []
        job = logic.startDenoising(inputNode, settings, onEvent=events.append, useTimer=False)
        while job.poll() and not any(event.get("stage") == "stage1" for event in events):
            time.sleep(0.05)
        logic.cancel()
        result = job.waitForFinished(120)
        self.assertEqual(result.state, jobs.CANCELLED)
        self.assertTrue(logic.canResume(inputNode, settings))
        resumed = logic.startDenoising(inputNode, settings, useTimer=False)
        self.assertIn("--resume", resumed.command)
        result = resumed.waitForFinished(900)
        self.assertEqual(result.state, jobs.DONE)
        self.delayDisplay("Cancel and resume passed")

    def test_MapsWithoutTraining(self) -> None:
        self.delayDisplay("Computing DTI maps without training")
        nodes = DDM2SlicerLogic().computeMaps(self.createSyntheticDwi(), timeout=300)
        self.assertEqual(sorted(nodes), sorted(scene.MAP_NAMES))
        md = slicer.util.arrayFromVolume(nodes["md"])
        self.assertTrue(np.median(md[md > 0]) > 1e-4)
        self.delayDisplay("Maps passed")
