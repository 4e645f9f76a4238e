"""Where the tests find the project's shared data: ../shared beside the clone (as in CI)."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
PHILIPS = SHARED / "data" / "philips-dwi" / "philips_dwi.nii.gz"

# like the Slicer API manifest: a clone without ../shared beside it skips what needs the real scan
needs_philips = pytest.mark.skipif(not PHILIPS.exists(), reason="the Philips scan (../shared/data/philips-dwi) "
                                   "is not checked out beside the repository")
