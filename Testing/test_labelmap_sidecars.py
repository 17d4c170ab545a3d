"""Labelmap outputs carry their label table in forms people and Slicer read."""
import json

import nibabel as nib
import numpy as np
import slicer

from biomedseg.io import read_volume, write_segmentation
from biomedseg.volume import Volume


def _volume():
    return Volume(np.zeros((10, 12, 14), np.int16), np.diag([1.5, 1.2, 2.0, 1.0]), name="ref")


def test_csv_colour_table_is_read_by_slicers_storage_node(tmp_path):
    vol = _volume()
    a = np.zeros(vol.shape, bool)
    a[2:5, 2:5, 2:5] = True
    written = write_segmentation(tmp_path / "labels.nii.gz", vol,
                                 {"liver": a, "left kidney": np.roll(a, 4, 0), "weird thing": np.roll(a, 5, 2)})
    assert [p.name for p in written] == ["labels.nii.gz", "labels.labels.json", "labels.labels.csv"]
    scene = slicer.vtkMRMLScene()
    table = slicer.vtkMRMLColorTableNode()
    scene.AddNode(table)
    storage = slicer.vtkMRMLColorTableStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(tmp_path / "labels.labels.csv"))
    assert storage.ReadData(table) == 1
    names = [table.GetColorName(i) for i in range(table.GetNumberOfColors())]
    assert names == ["Background", "liver", "left kidney", "weird thing"]
    rgba = [0.0] * 4
    table.GetColor(1, rgba)
    assert np.allclose(rgba[:3], np.array([221, 130, 101]) / 255, atol=1 / 255)
    assert "SCT^10200004^Liver" in table.GetTerminologyAsString(1)
    assert "SCT^7771000^Left" in table.GetTerminologyAsString(2)
    assert "SCT^85756007^Tissue" in table.GetTerminologyAsString(3)  # unknown target: Tissue
    # the labelmap's values are the table's label values
    data = np.asanyarray(nib.load(str(tmp_path / "labels.nii.gz")).dataobj).transpose(2, 1, 0)
    assert set(np.unique(data)) == {0, 1, 2, 3}
    assert np.array_equal(data == 1, a)


def test_json_sidecar_and_overlap_rule(tmp_path, caplog):
    vol = _volume()
    a = np.zeros(vol.shape, bool)
    a[2:6, 2:6, 2:6] = True
    b = np.zeros(vol.shape, bool)
    b[4:8, 4:8, 4:8] = True
    write_segmentation(tmp_path / "out.nrrd", vol, {"liver": a, "tumor": b})
    table = json.loads((tmp_path / "out.labels.json").read_text())
    assert table["labelmap"] == "out.nrrd"
    assert [(r["label"], r["name"]) for r in table["labels"]] == [(1, "liver"), (2, "tumor")]
    assert table["labels"][1]["terminology"]["type"][2] == "Neoplasm"
    back = read_volume(tmp_path / "out.nrrd").array
    assert np.array_equal(back == 2, b) and np.array_equal(back == 1, a & ~b)  # later segment wins
    assert "overlaps 8 voxels" in caplog.text and ".seg.nrrd" in caplog.text
