"""The module's own in-Slicer self-test (DDM2SlicerTest) runs to the end on the stand-in."""

from __future__ import annotations

import sys
from pathlib import Path

import slicer_standin

slicer = slicer_standin.install()
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "DDM2Slicer"))

import DDM2Slicer as module  # noqa: E402


def test_the_in_slicer_self_test_passes_on_the_stand_in():
    test = module.DDM2SlicerTest()
    messages = []
    test.delayDisplay = lambda message, msec=None: messages.append(message)
    test.runTest()  # its assertions fail the test: denoise, cancel + resume, maps
    assert messages.count("Denoising passed") == 1
    assert "Cancel and resume passed" in messages and "Maps passed" in messages
