"""The DDM2Slicer module on the Slicer stand-in, driving the real engine with tiny CPU settings.

One engine run is shared (module fixture): Apply from the panel, Cancel during Stage I, Resume, done.
The other tests read that run's scene or start short runs of their own (maps, a failing input).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import slicer_standin

slicer = slicer_standin.install()
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "DDM2Slicer"))

import DDM2Slicer as module  # noqa: E402
from DDM2SlicerLib import engine, jobs, scene, views  # noqa: E402
from PySide6 import QtWidgets  # noqa: E402


def spinUntil(condition, timeout: float) -> None:
    """Run the Qt event loop (the module's timers) until ``condition()`` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        QtWidgets.QApplication.processEvents()
        time.sleep(0.02)
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout} s")


@pytest.fixture(scope="module")
def panelRun():
    """Apply -> Cancel during Stage I -> Resume -> done, all through the panel's widgets."""
    slicer.mrmlScene.Clear()
    widget = module.DDM2SlicerWidget()
    widget.setup()
    inputNode = module.DDM2SlicerTest.createSyntheticDwi()
    inputNode.SetAttribute("DWMRI_gradient_0099", "1 0 0")  # a stale key that must not reach the output
    ui = widget.ui
    record = {"noiseSigmaText": ui.noiseSigmaSpinBox.text,  # 0: measured on the background
              "neighboursText": ui.neighboursSpinBox.text,  # 0: auto
              "b0GuideText": ui.b0GuideComboBox.currentText}
    ui.neighboursSpinBox.value = 2
    ui.stage1StepsSpinBox.value = 6
    ui.stage3StepsSpinBox.value = 2
    ui.noiseSigmaSpinBox.value = 20.0  # the synthetic DWI's noise: it has no background to measure it on
    ui.deviceComboBox.currentIndex = list(engine.DEVICE_ARGUMENTS).index("CPU")
    ui.b0GuideComboBox.currentIndex = list(engine.B0_GUIDE_ARGUMENTS).index("off")
    settingsFromPanel = widget.currentSettings
    widget.currentSettings = lambda: engine.DenoiseSettings(**{**vars(settingsFromPanel()), "seed": 0})
    events = []
    showEvent = widget.onEngineEvent
    widget.onEngineEvent = lambda event: (events.append(event), showEvent(event))
    record["applyTextBeforeRun"] = ui.applyButton.text

    ui.applyButton.click()
    record["applyTextWhileRunning"] = ui.applyButton.text
    spinUntil(lambda: any(e.get("stage") == "stage1" for e in events), 120)
    record["progressFormat"] = ui.progressBar.format
    ui.applyButton.click()  # Cancel
    spinUntil(lambda: not widget.logic.busy, 120)
    record["cancelled"] = widget.logic.job.result
    record["cancelledEventCount"] = len(events)
    record["applyTextAfterCancel"] = ui.applyButton.text
    ui.applyButton.click()  # Resume
    record["resumeCommand"] = widget.logic.job.command
    spinUntil(lambda: not widget.logic.busy, 300)
    record["done"] = widget.logic.job.result
    spinUntil(lambda: "GPU" in ui.deviceLabel.text or "CPU" in ui.deviceLabel.text, 60)
    return widget, inputNode, events, record


def test_apply_becomes_cancel_and_shows_stage_progress(panelRun):
    widget, _, events, record = panelRun
    assert record["applyTextBeforeRun"] == "Apply"
    assert record["noiseSigmaText"] == "measured" and record["neighboursText"] == "auto"
    assert record["b0GuideText"] == "auto"
    assert record["applyTextWhileRunning"] == "Cancel"
    assert "Stage I" in record["progressFormat"]
    fractions = [e["fraction"] for e in events if e["event"] == "progress"]
    assert fractions and all(0.0 <= f <= 1.0 for f in fractions)
    assert fractions[-1] == pytest.approx(1.0)


def test_cancel_leaves_a_resumable_run_that_resume_finishes(panelRun):
    widget, _, events, record = panelRun
    assert record["cancelled"].state == jobs.CANCELLED
    assert record["cancelled"].exitCode == engine.EXIT_CANCELLED
    assert record["applyTextAfterCancel"] == "Resume"
    assert "--resume" in record["resumeCommand"]
    command = record["resumeCommand"]
    assert command[command.index("--noise-sigma") + 1] == "20.0"  # from the panel's field
    assert command[command.index("--b0-guide") + 1] == "off"  # from the panel's combo box
    assert "noise sigma 20 (given): Stage III estimates the signal" in widget.ui.logTextEdit.plainText
    assert record["done"].state == jobs.DONE
    assert [e["event"] for e in events].count("start") == 2
    assert widget.ui.applyButton.text == "Apply"
    assert widget.ui.progressBar.value == 100


def test_denoised_dwi_keeps_the_input_gradients_geometry_and_no_stale_attributes(panelRun):
    widget, inputNode, _, _ = panelRun
    denoised = widget._parameterNode.outputVolume
    assert denoised.GetClassName() == "vtkMRMLDiffusionWeightedVolumeNode"
    assert denoised is not inputNode
    inputGradients, inputBValues = scene.gradientTable(inputNode)
    outputGradients, outputBValues = scene.gradientTable(denoised)
    np.testing.assert_allclose(outputGradients, inputGradients, atol=1e-12)
    np.testing.assert_allclose(outputBValues, inputBValues, atol=1e-9)
    np.testing.assert_allclose(scene.ijkToRasArray(denoised), scene.ijkToRasArray(inputNode), atol=1e-12)
    np.testing.assert_allclose(scene.measurementFrameArray(denoised), scene.measurementFrameArray(inputNode))
    assert not [name for name in denoised.GetAttributeNames() if name.startswith("DWMRI_")]
    noisy = slicer.util.arrayFromVolume(inputNode)
    clean = slicer.util.arrayFromVolume(denoised)
    assert clean.shape == noisy.shape == (4, 16, 16, 8)
    assert np.isfinite(clean).all() and not np.array_equal(clean, noisy)


def test_residual_and_maps_are_loaded_with_their_displays(panelRun):
    widget, inputNode, _, _ = panelRun
    parameters = widget._parameterNode
    residual = slicer.util.arrayFromVolume(parameters.residualVolume)
    assert residual.shape == (4, 16, 16) and residual.max() > 0
    fa = slicer.util.arrayFromVolume(parameters.faVolume)
    assert 0.0 <= fa.min() and fa.max() <= 1.0 + 1e-6 and fa.max() > 0.05
    display = parameters.faVolume.GetDisplayNode()
    assert "Inferno" in display.GetColorNodeID()
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == pytest.approx((0.0, 1.0))
    names = {node.GetName() for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")}
    for mapName in ("FA", "MD", "AD", "RD"):
        assert f"tiny DWI input {mapName}" in names and f"tiny DWI denoised {mapName}" in names
    md = slicer.mrmlScene.GetFirstNodeByName("tiny DWI denoised MD")
    assert md.GetDisplayNode().GetWindowLevelMax() == pytest.approx(3.0e-3)
    # The run folder is removed once its results are in the scene.
    assert not Path(widget.logic.job.result.runDirectory).exists()


def test_compare_sets_linked_side_by_side_views_with_the_same_gradient(panelRun):
    widget, inputNode, _, _ = panelRun
    parameters = widget._parameterNode
    widget.ui.overlayOpacitySlider.value = 0.25
    widget.ui.compareButton.click()
    layoutNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLLayoutNode")
    assert layoutNode.GetViewArrangement() == views.COMPARE_LAYOUT_ID
    composites = views.compositeNodes()
    assert composites["Red"].GetBackgroundVolumeID() == inputNode.GetID()
    assert composites["Yellow"].GetBackgroundVolumeID() == parameters.outputVolume.GetID()
    assert composites["Green"].GetBackgroundVolumeID() == parameters.residualVolume.GetID()
    for name in ("Red", "Yellow"):
        assert composites[name].GetForegroundVolumeID() == parameters.faVolume.GetID()
        assert composites[name].GetForegroundOpacity() == pytest.approx(0.25)
    assert all(composite.GetLinkedControl() for composite in composites.values())
    components = {node.GetDisplayNode().GetDiffusionComponent() for node in (inputNode, parameters.outputVolume)}
    assert components == {1}  # the first diffusion-weighted volume, in both views
    widget.ui.overlayOpacitySlider.value = 0.6
    assert composites["Red"].GetForegroundOpacity() == pytest.approx(0.6)
    screenshots = os.environ.get("DDM2_SCREENSHOT_DIR")
    viewport = slicer.app.layoutManager().viewport()
    viewport.resize(1200, 430)
    image = viewport.grab().toImage()
    assert image.pixelColor(600, 200) != image.pixelColor(5, 5)  # the views drew something
    if screenshots:
        viewport.grab().save(str(Path(screenshots) / "slicer_compare.png"))
        widget.parent.resize(430, 980)
        widget.parent.grab().save(str(Path(screenshots) / "slicer_panel.png"))


def test_device_label_names_the_device_found_by_the_probe(panelRun):
    widget, _, _, _ = panelRun
    text = widget.ui.deviceLabel.text
    assert text.startswith("GPU:") or text.startswith("No CUDA GPU found")
    assert "torch" in text


def test_compute_maps_without_training_for_any_selected_dwi(panelRun):
    widget, inputNode, _, _ = panelRun
    before = slicer.mrmlScene.GetNumberOfNodes()
    widget._parameterNode.mapsInputVolume = inputNode
    widget.ui.computeMapsButton.click()
    spinUntil(lambda: not widget.logic.busy, 120)
    assert widget.logic.job.result.state == jobs.DONE
    fa = slicer.mrmlScene.GetFirstNodeByName("tiny DWI FA")
    assert fa is not None and slicer.mrmlScene.GetNumberOfNodes() > before
    inputFa = slicer.mrmlScene.GetFirstNodeByName("tiny DWI input FA")
    np.testing.assert_allclose(slicer.util.arrayFromVolume(fa), slicer.util.arrayFromVolume(inputFa), atol=1e-5)


def test_engine_warnings_are_shown_with_the_results(panelRun, monkeypatch):
    """A warning event (the background sigma's doubt) goes under the results, not only into the log."""
    widget, _, _, _ = panelRun
    assert widget.ui.statusLabel.text == "Denoised: the results are in the scene."  # the run warned of nothing
    parameters = widget._parameterNode
    loaded = {"denoised": parameters.outputVolume, "residual_rms": parameters.residualVolume,
              "fa": parameters.faVolume}
    monkeypatch.setattr(widget.logic, "loadResults", lambda *arguments: loaded)  # its run folder is gone
    widget.onEngineEvent({"event": "warning", "message": "the background may not be pure noise"})
    widget.onDenoisingFinished(widget.logic.job.result)
    assert widget.ui.statusLabel.text == ("Denoised: the results are in the scene. "
                                          "Check: the background may not be pure noise.")


def test_engine_failure_raises_the_engines_own_message():
    inputNode = module.DDM2SlicerTest.createSyntheticDwi("two volumes")
    voxels = slicer.util.arrayFromVolume(inputNode)[..., :2].copy()
    gradients, bValues = scene.gradientTable(inputNode)
    inputNode.SetNumberOfGradients(2)
    for index in range(2):
        inputNode.SetDiffusionGradient(index, gradients[index])
        inputNode.SetBValue(index, bValues[index])
    slicer.util.updateVolumeFromArray(inputNode, voxels)
    logic = module.DDM2SlicerLogic()
    with pytest.raises(RuntimeError) as failure:
        logic.process(inputNode, settings=engine.DenoiseSettings(neighbours=2, stage1Steps=1, stage3Steps=1,
                                                                 device="CPU"), timeout=120)
    # The engine's own line, naming the problem and the fix, not a bare exit code.
    assert "DDM2 denoising failed" in str(failure.value)
    assert "fewer than n + 1 = 3" in str(failure.value) and "--n" in str(failure.value)
