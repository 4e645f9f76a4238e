"""Render the README's comparison screenshot from a finished `ddm2 demo` run, offscreen, on the stand-in.

(The panel screenshot comes from the module's tests: DDM2_SCREENSHOT_DIR=Resources ./dev test -k compare.)

    QT_QPA_PLATFORM=offscreen .venv/bin/python Testing/render_screenshots.py runs/demo Resources

Loads the phantom and the run's outputs into the stand-in scene through the module's own helpers, sets
the comparison layout with the module's logic, and saves Resources/slicer_compare.png. Not a test: the
stand-in draws the middle voxel slice of each volume, so the picture shows what the layout holds.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

import slicer_standin

slicer = slicer_standin.install()
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "DDM2Slicer"))

import DDM2Slicer as module  # noqa: E402
from DDM2SlicerLib import scene  # noqa: E402
from ddm2 import dwi as dwi_io  # noqa: E402


def dwi_node(dwi: dwi_io.DWI, name: str):
    """A DWI node holding a ddm2 DWI (gradients in RAS, identity measurement frame)."""
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLDiffusionWeightedVolumeNode", name)
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(dwi.affine))
    node.SetNumberOfGradients(dwi.n_volumes)
    for index, (gradient, b_value) in enumerate(zip(dwi.bvecs, dwi.bvals)):
        node.SetDiffusionGradient(index, gradient if b_value > 50 else np.zeros(3))
        node.SetBValue(index, b_value)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(np.transpose(dwi.data, (2, 1, 0, 3))))
    node.CreateDefaultDisplayNodes()
    return node


def main(run_dir: Path, out_dir: Path) -> None:
    widget = module.DDM2SlicerWidget()
    widget.setup()
    noisy = dwi_io.load(run_dir / "phantom" / "noisy.nii.gz")
    input_node = dwi_node(noisy, "phantom")
    denoised_node = scene.newDwiNode(input_node, scene.readVoxels(run_dir / "denoised.nrrd", input_node),
                                     "phantom denoised")
    residual = scene.loadScalarVolume(run_dir / "residual_rms.nii.gz", "phantom residual RMS")
    scene.styleResidualRms(residual)
    fa = scene.loadScalarVolume(run_dir / "fa.nii.gz", "phantom denoised FA")
    scene.styleMap(fa, "fa")
    widget.logic.setupCompareView(input_node, denoised_node, residual, fa, overlayOpacity=0.35)
    viewport = slicer.app.layoutManager().viewport()
    viewport.resize(1200, 430)
    viewport.grab().save(str(out_dir / "slicer_compare.png"))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
