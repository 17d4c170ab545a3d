"""The generic volumetric runner with a model that is not Hermes: any 3D predictor plugs in."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from biomedseg.errors import CancelledError, InputError  # noqa: E402
from biomedseg.runtime.sliding_window import (count_forward_passes, sliding_window, unique_windows,  # noqa: E402
                                                window_grid)

WINDOW = (16, 16, 16)


def local_mean(windows, samples):
    """A translation-equivariant 'model': two channels, a 3x3x3 mean and a thresholded copy."""
    smooth = torch.nn.functional.avg_pool3d(windows, 3, stride=1, padding=1, count_include_pad=False)
    return torch.cat([smooth, (windows > 0.5).float()], dim=1)


def test_pointwise_model_is_stitched_back_exactly():
    """Every window sees the same voxel value, so averaging the windows returns it unchanged,
    in both engines, for axes shorter than, equal to and longer than the window."""
    image = torch.rand(2, 1, 40, 16, 11, generator=torch.Generator().manual_seed(0))

    def pointwise(windows, samples):
        return torch.cat([windows, windows * 2], dim=1)

    for engine in ("authors", "monai"):
        out = sliding_window(pointwise, image, WINDOW, sw_batch_size=3, engine=engine)
        assert out.shape == (2, 2, 40, 16, 11) and out.dtype == torch.float32
        torch.testing.assert_close(out[:, :1], image, rtol=0, atol=1e-6)
        torch.testing.assert_close(out[:, 1:], image * 2, rtol=0, atol=1e-6)


def test_overlaps_average_the_windows_and_engines_agree_without_repeats():
    """Axis lengths that are not multiples of w/2 have no repeated window: both engines give the
    same uniform average, which differs from one whole-volume pass only near window borders."""
    image = torch.rand(1, 1, 37, 29, 20, generator=torch.Generator().manual_seed(1))
    authors = sliding_window(local_mean, image, WINDOW, engine="authors")
    monai = sliding_window(local_mean, image, WINDOW, engine="monai")
    torch.testing.assert_close(authors, monai, rtol=0, atol=1e-6)
    whole = local_mean(image, torch.zeros(1, dtype=torch.long))
    # the centre of the first window is covered by that window alone
    torch.testing.assert_close(authors[..., 1:7, 1:7, 1:3], whole[..., 1:7, 1:7, 1:3], rtol=0, atol=1e-6)
    assert (authors - whole).abs().max() > 1e-3  # window borders do differ: the average is real


def test_samples_reach_the_predictor_with_their_windows():
    """A per-sample 'prompt' (here: an offset per sample) must follow each crop in both engines."""
    image = torch.zeros(3, 1, 20, 20, 20)
    offsets = torch.tensor([1.0, 2.0, 3.0])

    def per_sample(windows, samples):
        return windows + offsets[samples].view(-1, 1, 1, 1, 1)

    for engine in ("authors", "monai"):
        out = sliding_window(per_sample, image, WINDOW, sw_batch_size=4, engine=engine)
        for s in range(3):
            assert torch.all(out[s] == offsets[s]), engine


def test_progress_counts_every_call_in_order_and_cancel_stops_between_windows():
    image = torch.rand(1, 1, 40, 40, 24)
    events = []
    sliding_window(local_mean, image, WINDOW, sw_batch_size=2, stage="demo",
                   progress=lambda stage, done, total: events.append((stage, done, total)))
    total = count_forward_passes((40, 40, 24), WINDOW, 2)
    assert events == [("demo", i, total) for i in range(1, total + 1)]
    # 24 is a multiple of w/2 = 8: the authors' loop repeats the last window there; it runs once
    assert len(window_grid((40, 40, 24), WINDOW)) == 75 and total == -(-len(unique_windows((40, 40, 24), WINDOW)) // 2)

    calls = []

    def counted(windows, samples):
        calls.append(1)
        return local_mean(windows, samples)

    with pytest.raises(CancelledError, match="Demo model was cancelled"):
        sliding_window(counted, image, WINDOW, cancelled=lambda: len(calls) >= 2, what="Demo model")
    assert len(calls) == 2


def test_bad_engine_and_batch_are_refused():
    image = torch.zeros(1, 1, 16, 16, 16)
    with pytest.raises(InputError, match="engine"):
        sliding_window(local_mean, image, WINDOW, engine="fast")
    with pytest.raises(InputError, match="at least 1"):
        sliding_window(local_mean, image, WINDOW, sw_batch_size=0)


def test_accumulator_can_live_elsewhere_and_numpy_round_trip():
    image = torch.from_numpy(np.random.default_rng(2).random((1, 1, 24, 18, 16), dtype=np.float32))
    out = sliding_window(local_mean, image, WINDOW, accumulate_device=torch.device("cpu"))
    assert out.device.type == "cpu" and out.shape == (1, 2, 24, 18, 16)
