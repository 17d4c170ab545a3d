"""One set of modality rules for the panel's suggestion and every backend's default."""
import numpy as np
import pytest

from biomedseg.imaging_guess import guess_modality, modality_from_tags, modality_from_voxels
from biomedseg.volume import Volume


def volume(array, **meta):
    return Volume(np.asarray(array), np.diag([0.8, 0.8, 2.0, 1.0]), meta=meta)


@pytest.mark.parametrize("code, description, expected", [
    ("CT", "", "CT"), ("PT", "", "PET"), ("US", "", "Ultrasound"), ("DX", "", "X-Ray"), ("SM", "", "Pathology"),
    ("MR", "", "MRI"), ("MR", "AX T1 POST GAD", "MRI-T1-Gd"), ("MR", "T1 MPRAGE sag", "MRI-T1"),
    ("MR", "t2_flair_tra", "MRI-FLAIR"), ("MR", "ep2d_diff ADC", "MRI-ADC"), ("MR", "T2 TSE ax", "MRI-T2"),
    ("MR", "cine SSFP 4ch", "MRI-cine"), (" mr ", "", "MRI"), ("OT", "", None), ("", "T1", None), (None, None, None),
])
def test_modality_from_dicom_tags(code, description, expected):
    assert modality_from_tags(code, description) == expected


def test_modality_from_voxels():
    ct = np.full((4, 20, 20), -1000, np.int16)
    ct[:, 5:15, 5:15] = 40
    assert modality_from_voxels(volume(ct))[0] == "CT"
    assert modality_from_voxels(volume(ct[:1]))[0] == "CT"  # one CT slice is still CT
    assert modality_from_voxels(volume(np.abs(ct[:1])))[0] == "X-Ray"
    assert modality_from_voxels(volume(np.abs(ct)))[0] == "MRI"
    rgb = Volume(np.zeros((1, 8, 8, 3), np.uint8), np.eye(4), channels_last=True)
    assert modality_from_voxels(rgb)[0] == "Pathology"


def test_tags_win_over_voxels_and_say_why():
    ct_values = np.full((4, 20, 20), -1000, np.int16)
    assert guess_modality(volume(ct_values, modality="MR", series_description="FLAIR")) == (
        "MRI-FLAIR", "DICOM modality MR ('FLAIR')")
    name, why = guess_modality(volume(ct_values, modality="OT"))
    assert name == "CT" and "'OT' names no imaging modality" in why


def test_panel_and_backends_read_an_image_the_same_way():
    """A T1 MPRAGE series: the panel proposes MRI-T1, Hermes uses its T1 prior, BiomedParse its MRI."""
    from biomedseg.models.biomedparse import targets
    from biomedseg.models.hermes.backend import modality_from
    from biomedseg.panel_logic import guess_modality_site

    t1 = volume(np.ones((30, 40, 40), np.int16), modality="MR", series_description="T1 MPRAGE")
    assert guess_modality_site(t1).modality == "MRI-T1"
    assert modality_from(t1, {})[0] == 2
    assert targets.resolve_modality(guess_modality(t1)[0]) == "MRI"
