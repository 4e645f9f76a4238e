"""Where the tests find the project's shared data: ../shared beside the clone (as in CI)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
PHILIPS = SHARED / "data" / "philips-dwi" / "philips_dwi.nii.gz"
