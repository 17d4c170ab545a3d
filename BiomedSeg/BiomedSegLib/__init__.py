"""Slicer-side parts of the module that are not the widget itself (they may import slicer and qt)."""
