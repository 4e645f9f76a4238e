"""`python -m ddm2 ...` (what the Slicer module runs with PythonSlicer)."""

import sys

from ddm2.cli import main

sys.exit(main())
