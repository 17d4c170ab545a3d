"""How much memory BiomedParse v1 needs: slices per forward pass, and where (or whether) the per-slice
features of a volume can be kept for re-prompting."""
from __future__ import annotations

from biomedseg.runtime.device import device_kind, free_memory_bytes
from biomedseg.runtime.memory import batch_that_fits

from .preprocess import MODEL_SIZE

#: Feature floats the decoder needs per model-input pixel: mask features (512 at 1/4) and the
#: three multi-scale maps (512 at 1/8, 1/16, 1/32).
FEATURE_FLOATS_PER_PIXEL = 512 * (1 / 16 + 1 / 64 + 1 / 256 + 1 / 1024)
#: Peak working memory of one slice through backbone and pixel decoder at 1024x1024, scaled with
#: the pixel count for other sizes. CPU float32: measured on the dev VM (0.95 GB above the loaded
#: model for one 1024^2 slice, 0.35 GB at 512^2), with a margin; CUDA: estimates from those
#: (half-precision activations under autocast), not measured on a GPU yet.
SLICE_BYTES_1024 = {"cpu": 1.2e9, "cuda_amp": 0.8e9, "cuda": 1.2e9, "mps": 1.2e9}
#: Most slices per pass. CPU: 1 -- two slices per pass took exactly twice as long as one on the
#: dev VM, so batching only adds memory there; a GPU wants full batches.
MAX_BATCH = {"cpu": 1, "mps": 4, "cuda": 16}
#: Shares of the free memory for activations and for the feature cache.
MEMORY_SHARE = 0.5
CACHE_SHARE = 0.4


def auto_batch_size(device: str, image_size: int = MODEL_SIZE, amp: bool = True, free_bytes: int | None = None) -> int:
    """Slices per pass that fit in ``MEMORY_SHARE`` of the free memory (at least 1, at most ``MAX_BATCH``)."""
    kind = device_kind(device)
    key = "cuda_amp" if kind == "cuda" and amp else kind
    per_slice = SLICE_BYTES_1024[key] * (image_size / MODEL_SIZE) ** 2
    return batch_that_fits(device, per_slice, MAX_BATCH, MEMORY_SHARE, free_bytes)


def feature_bytes(image_size: int, bytes_per_float: int) -> int:
    """Cached bytes per slice: decoder features plus the 8-bit RGB model image."""
    return int(FEATURE_FLOATS_PER_PIXEL * image_size ** 2 * bytes_per_float + 3 * image_size ** 2)


def cache_placement(device: str, n_slices: int, image_size: int, amp: bool, held_bytes: int = 0):
    """Where the features of ``n_slices`` slices go: ("device" | "float32" | "float16" | None, note).

    CPU: float32 in RAM if ``CACHE_SHARE`` of the available memory holds them, else float16, else
    none. CUDA: on the GPU (in the autocast dtype) if they fit there, else CPU float16, else none.
    ``held_bytes`` (what the cache holds now) counts as available: the new volume replaces it."""
    import psutil

    kind = device_kind(device)
    ram = (psutil.virtual_memory().available + (held_bytes if kind == "cpu" else 0)) * CACHE_SHARE
    if kind == "cuda":
        import torch

        free = (torch.cuda.mem_get_info(torch.device(device))[0] + held_bytes) * CACHE_SHARE
        need = n_slices * feature_bytes(image_size, 2 if amp else 4)
        if need <= free:
            return "device", f"on the GPU ({need / 1e9:.2f} GB)"
    elif kind == "cpu":
        need = n_slices * feature_bytes(image_size, 4)
        if need <= ram:
            return "float32", f"float32 in RAM ({need / 1e9:.2f} GB)"
    need = n_slices * feature_bytes(image_size, 2)
    if need <= ram:
        return "float16", f"float16 in RAM ({need / 1e9:.2f} GB)"
    return None, f"off: {n_slices} slices need {need / 1e9:.1f} GB (more than {ram / 1e9:.1f} GB)"


def to_cpu_half(features: dict) -> dict:
    """The cache's offload for "float16": floating tensors to CPU float16, the rest (model image) as they are."""
    import torch

    return {k: v.to("cpu", torch.float16) if v.is_floating_point() else v.to("cpu") for k, v in features.items()}


def cache_bytes(cache) -> int:
    """Bytes a ``FeatureCache`` holds now."""
    return sum(v.element_size() * v.nelement() for entry in cache.entries.values()
               for per_slice in entry.values() for v in per_slice.values())
