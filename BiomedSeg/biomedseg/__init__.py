"""BiomedSeg engine: biomedical foundation models on 3D Slicer volumes and files.

Importing this package is cheap (no torch, no model code): the Slicer process imports it
at start-up, the worker imports model code lazily.
"""
__version__ = "0.1.0"

from .errors import BiomedSegError, InputError  # noqa: E402
from .volume import Volume  # noqa: E402

__all__ = ["__version__", "BiomedSegError", "InputError", "Volume"]
