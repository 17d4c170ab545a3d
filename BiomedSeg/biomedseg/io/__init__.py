"""File boundary of the engine: everything that reads or writes images and results."""
from .readers import READABLE, list_dicom_series, read_dicom_series, read_volume, suffix_of
from .writers import SEGMENTATION_SUFFIXES, write_segmentation, write_volume

__all__ = ["READABLE", "SEGMENTATION_SUFFIXES", "list_dicom_series", "read_dicom_series", "read_volume",
           "suffix_of", "write_segmentation", "write_volume"]
