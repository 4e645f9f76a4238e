"""The engine's Python packages in Slicer's Python: check, install, and the GPU the engine would use.

Nothing here imports torch (or any checked package) into Slicer's process: presence and versions come
from package metadata, and the GPU is asked of a short-lived PythonSlicer subprocess.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util

# import name -> pip requirement. Versions match the engine's pyproject; torch is left to the
# PyTorch extension so that it can pick the CUDA build that matches the driver.
REQUIREMENTS = {
    "torch": "torch>=2.1",
    "dipy": "dipy>=1.9",
    "nibabel": "nibabel>=5.0",
    "nrrd": "pynrrd>=1.0",
    "skimage": "scikit-image>=0.22",
    "matplotlib": "matplotlib>=3.7",
}
DISTRIBUTIONS = {"nrrd": "pynrrd", "skimage": "scikit-image"}

# Run by PythonSlicer: prints one JSON event describing the device torch would use.
DEVICE_PROBE = """
import json
try:
    import torch
except Exception as error:
    print(json.dumps({"event": "device", "torch": None, "cuda": False, "error": str(error)}))
else:
    info = {"event": "device", "torch": torch.__version__, "cuda": bool(torch.cuda.is_available()),
            "cudaVersion": torch.version.cuda}
    if info["cuda"]:
        properties = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(name=properties.name, memoryGb=round(properties.total_memory / 2**30, 1),
                    capability=f"{properties.major}.{properties.minor}")
    print(json.dumps(info))
"""


class InstallError(RuntimeError):
    """Installing failed or needs a restart; the message says which and what to do."""

    def __init__(self, message: str, restartRequired: bool = False) -> None:
        super().__init__(message)
        self.restartRequired = restartRequired


def installedVersions(importNames=REQUIREMENTS) -> dict[str, str | None]:
    """Version of each package (None when absent), read from metadata without importing it."""
    versions = {}
    for name in importNames:
        if importlib.util.find_spec(name) is None:
            versions[name] = None
            continue
        try:
            versions[name] = importlib.metadata.version(DISTRIBUTIONS.get(name, name))
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "unknown version"
    return versions


def missingPackages(versions: dict[str, str | None]) -> list[str]:
    return [name for name, version in versions.items() if version is None]


def describeVersions(versions: dict[str, str | None]) -> str:
    return ", ".join(f"{name} {version or 'missing'}" for name, version in versions.items())


def describeDevice(info: dict) -> str:
    """One line for the panel: the GPU (name, memory, CUDA) or why the engine will use the CPU."""
    if not info.get("torch"):
        return "PyTorch is not installed yet (it is installed on first Apply)"
    if not info.get("cuda"):
        return f"No CUDA GPU found: the CPU will be used (torch {info['torch']})"
    return (f"GPU: {info.get('name', '?')}, {info.get('memoryGb', '?')} GB, "
            f"compute {info.get('capability', '?')} (torch {info['torch']}, CUDA {info.get('cudaVersion')})")


def installPackages(missing: list[str]) -> None:
    """Install what is missing: torch through the PyTorch extension when present, the rest with pip."""
    import slicer

    if "torch" in missing:
        try:
            import PyTorchUtils
        except ImportError:
            PyTorchUtils = None
        if PyTorchUtils is not None:
            # The PyTorch extension picks the wheel (CUDA or CPU) that matches this computer's driver.
            if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False) is None:
                raise InstallError("PyTorch could not be installed: install it in the PyTorch Utils module")
        else:
            slicer.util.pip_install(REQUIREMENTS["torch"])
    others = [REQUIREMENTS[name] for name in missing if name != "torch"]
    if others:
        slicer.util.pip_install(" ".join(others))
    still = missingPackages(installedVersions(missing))
    if still:
        raise InstallError(f"still missing after installing: {', '.join(still)}; restart Slicer and retry",
                           restartRequired=True)
