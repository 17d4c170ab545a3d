"""The offline default model on a real T1 (Colin27) against its BET mask."""
import numpy as np
import pytest

from biomedseg.errors import CancelledError, InputError
from biomedseg.engine import segment
from biomedseg.io import read_volume
from biomedseg.volume import Volume
from geometry_cases import reoriented


def dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.fixture(scope="module")
def colin(colin_path):
    return read_volume(colin_path)


@pytest.fixture(scope="module")
def colin_result(colin):
    return segment(colin, "deepbet", ["brain"], device="cpu")


def test_brain_dice_against_bet(colin_result, colin_bet_path):
    reference = read_volume(colin_bet_path).array > 0
    (brain,) = colin_result.segments
    assert brain.name == "brain"
    assert dice(brain.mask, reference) >= 0.90
    assert colin_result.absent == []
    assert brain.terminology["type"][1] == "12738006"  # SNOMED CT: Brain


@pytest.mark.parametrize("perm,flips", [((2, 0, 1), (True, False, False)), ((1, 2, 0), (False, True, True))])
def test_result_follows_patient_space_not_array_order(colin, colin_result, perm, flips):
    vol, back = reoriented(colin, perm, flips)
    # sanity: the same RAS point holds the same intensity in both storages
    for ijk in ([3, 5, 7], [90, 100, 80], [150, 20, 170]):
        ras = vol.ijk_to_ras @ (ijk + [1])
        old = np.rint(np.linalg.inv(colin.ijk_to_ras) @ ras).astype(int)
        assert vol.array[ijk[2], ijk[1], ijk[0]] == colin.array[old[2], old[1], old[0]]
    result = segment(vol, "deepbet", ["brain"], device="cpu")
    mapped = back(result.segments[0].mask)
    assert mapped.shape == colin.shape
    assert dice(mapped, colin_result.segments[0].mask) > 0.999


def test_cancel_stops_and_returns_nothing(colin):
    calls = []

    def cancelled():
        calls.append(1)
        return len(calls) > 1

    with pytest.raises(CancelledError, match="nothing was written"):
        segment(colin, "deepbet", ["brain"], device="cpu", cancelled=cancelled)


def test_unknown_prompt_suggests(colin):
    with pytest.raises(InputError, match="has no target 'brian'. Did you mean 'brain'") as err:
        segment(colin, "deepbet", ["brian"], device="cpu")
    assert "biomedseg models deepbet" in err.value.hint


def test_constant_image_is_refused():
    vol = Volume(np.full((40, 40, 40), 7, np.int16), np.eye(4))
    with pytest.raises(InputError, match="constant intensity"):
        segment(vol, "deepbet", ["brain"], device="cpu")


def test_unavailable_device_says_why(colin):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(InputError, match="cuda.*not available"):
        segment(colin, "deepbet", ["brain"], device="cuda")


def test_2d_input_refused_by_3d_model():
    vol = Volume(np.random.default_rng(0).random((1, 64, 64)).astype(np.float32), np.eye(4), name="photo")
    with pytest.raises(InputError, match="needs a 3D volume.*'photo'"):
        segment(vol, "deepbet", ["brain"], device="cpu")
