"""Choosing the torch device, with the reason when the one asked for is not available."""
from __future__ import annotations

from ..errors import InputError


def resolve_device(requested: str = "auto") -> tuple[str, str]:
    """Return (device string, sentence explaining the choice).

    'auto' prefers CUDA, then Apple MPS, then CPU. An explicit device that is not
    available is an error that says why, instead of a silent fallback.
    """
    import torch

    requested = (requested or "auto").lower()
    cuda_ok = torch.cuda.is_available()
    mps_ok = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if requested == "auto":
        if cuda_ok:
            return "cuda:0", f"CUDA GPU {torch.cuda.get_device_name(0)}"
        if mps_ok:
            return "mps", "Apple GPU (MPS)"
        why = "torch was built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        return "cpu", f"CPU ({why})"
    if requested == "cpu":
        return "cpu", "CPU (requested)"
    if requested.startswith("cuda"):
        if not cuda_ok:
            why = ("this torch build has no CUDA support (CPU-only wheel)" if torch.version.cuda is None
                   else "no CUDA GPU is visible (driver missing or CUDA_VISIBLE_DEVICES empty)")
            raise InputError(f"Device '{requested}' is not available: {why}.", hint="Use --device cpu or auto.")
        index = int(requested.split(":")[1]) if ":" in requested else 0
        if index >= torch.cuda.device_count():
            raise InputError(f"Device '{requested}' is not available: only {torch.cuda.device_count()} CUDA "
                             "device(s) are visible.", hint="Use cuda:0 or auto.")
        return f"cuda:{index}", f"CUDA GPU {torch.cuda.get_device_name(index)} (requested)"
    if requested == "mps":
        if not mps_ok:
            raise InputError("Device 'mps' is not available: Apple MPS needs macOS on Apple silicon and a "
                             "torch build with MPS.", hint="Use --device cpu or auto.")
        return "mps", "Apple GPU (MPS, requested)"
    raise InputError(f"Unknown device '{requested}'; use auto, cpu, cuda, cuda:N or mps.")


def device_kind(device: str) -> str:
    """'cuda', 'mps' or 'cpu' for a device string such as 'cuda:1' (keys of per-device tables)."""
    return "cuda" if device.startswith("cuda") else ("mps" if device.startswith("mps") else "cpu")


def free_memory_bytes(device: str) -> int:
    """Free memory where tensors on ``device`` live: the GPU's for CUDA, else available RAM."""
    if device_kind(device) == "cuda":
        import torch

        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    import psutil

    return int(psutil.virtual_memory().available)


def is_out_of_memory(exc: BaseException) -> bool:
    """An allocation failure: torch's CUDA/MPS 'out of memory', a CPU 'can't allocate memory', numpy's
    MemoryError ('Unable to allocate ...')."""
    text = str(exc).lower()
    return (isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or "out of memory" in text
            or "can't allocate memory" in text)


def release_memory(device: str) -> None:
    """Give dropped tensors back: collect garbage, and empty the CUDA cache on a GPU."""
    import gc

    gc.collect()
    if device_kind(device) == "cuda":
        import torch

        torch.cuda.empty_cache()
