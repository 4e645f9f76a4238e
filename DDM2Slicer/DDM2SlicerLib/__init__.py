"""Slicer-side helpers of the DDM2Slicer module.

``engine`` (command lines and progress events) and ``jobs`` (the background process) need no MRML;
``nrrdio`` writes a DWI NRRD from plain arrays; ``scene``, ``views`` and ``dependencies`` talk to Slicer.
The engine itself (``ddm2``) is never imported here: it runs in a separate PythonSlicer process.
"""
