"""DDM2: self-supervised denoising of diffusion MRI with denoising diffusion models (ICLR 2023).

The engine of the DDM2Slicer extension. It never imports slicer, qt, ctk or vtk, so it runs the same
inside Slicer's Python, on a workstation and under torchrun.
"""

__version__ = "0.1.0"
