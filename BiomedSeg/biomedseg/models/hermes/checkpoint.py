"""Loading Hermes-R weights from the files the authors' training script writes.

Their ``train.py`` saves ``{'epoch', 'model_state_dict', 'ema_model_state_dict',
'optimizer_state_dict'}``, unwrapped from DDP and ``torch.compile`` (no ``module.`` or
``_orig_mod.`` prefix); ``ema_model_state_dict`` is None when EMA is off. Their
evaluation uses the EMA network (the released config sets ``ema: True``), so EMA
weights are preferred when present. The released file's exact layout is not
documented, so plain state dicts and the usual ``model`` / ``state_dict`` wrappers are
accepted too, and DDP / compile prefixes are stripped. Files are read with
``torch.load(weights_only=True)``: tensors and plain containers only, never code.
"""
from __future__ import annotations

from pathlib import Path

from biomedseg.errors import InputError

#: Where the network weights may sit inside a checkpoint dict, best first.
EMA_KEYS = ("ema_model_state_dict", "state_dict_ema", "model_ema", "ema_state_dict", "ema")
MODEL_KEYS = ("model_state_dict", "state_dict", "model", "net", "network")
PREFIXES = ("module.", "_orig_mod.")


def _is_state_dict(obj) -> bool:
    import torch

    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def read_checkpoint(path, *, prefer_ema: bool = True) -> tuple[dict, str]:
    """Return (state dict, where it was found) from a checkpoint file, without a model."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise InputError(f"Hermes checkpoint '{path}' does not exist.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "unsupported global" not in str(err).lower():  # e.g. an HTML error page saved as .pth
            raise InputError(f"'{path}' is not a readable PyTorch checkpoint (not a torch file, or a damaged "
                             "or partial download).") from err
        raise InputError(f"'{path}' holds Python objects other than tensors and plain containers, so it is not "
                         "loaded (weights_only=True).",
                         hint="Re-save just the state dict: torch.save(ckpt['model_state_dict'], path).") from err
    except Exception as err:  # truncated download, not a torch file, ...
        raise InputError(f"'{path}' is not a readable PyTorch checkpoint ({type(err).__name__}: {err}).") from err
    return extract_state_dict(obj, prefer_ema=prefer_ema, source=str(path))


def extract_state_dict(obj, *, prefer_ema: bool = True, source: str = "checkpoint") -> tuple[dict, str]:
    """Find the network weights in a loaded checkpoint object; strip wrapper prefixes."""
    if _is_state_dict(obj):
        return strip_prefixes(obj), "state dict"
    if not isinstance(obj, dict):
        raise InputError(f"'{source}' holds a {type(obj).__name__}, not a state dict or a checkpoint dict.")
    order = (EMA_KEYS + MODEL_KEYS) if prefer_ema else (MODEL_KEYS + EMA_KEYS)
    for key in order:
        if _is_state_dict(obj.get(key)):
            return strip_prefixes(obj[key]), key
    keys = ", ".join(sorted(map(str, obj))[:12])
    raise InputError(f"'{source}' has no network weights under any of {', '.join(order)} (its keys: {keys}).")


def strip_prefixes(state_dict: dict) -> dict:
    """Remove 'module.' (DDP) and '_orig_mod.' (torch.compile) when every key carries them."""
    changed = True
    while changed:
        changed = False
        for prefix in PREFIXES:
            if state_dict and all(k.startswith(prefix) for k in state_dict):
                state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
                changed = True
    return state_dict


def check_compatible(net, state_dict: dict, source: str = "checkpoint") -> None:
    """Raise InputError naming missing keys, unexpected keys and shape mismatches."""
    expected = net.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    if not (missing or unexpected or shapes):
        return

    def listing(title, items):
        more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
        return f"{len(items)} {title}: {', '.join(items[:5])}{more}"

    parts = [listing(t, i) for t, i in (("missing", missing), ("unexpected", unexpected),
                                         ("with the wrong shape", shapes)) if i]
    raise InputError(f"'{source}' does not fit Hermes-R: " + "; ".join(parts) + ".",
                     hint="Is it the Hermes-R (ResUNet) checkpoint and not Hermes-M or another model?")


def load_weights(net, state_dict: dict, source: str = "checkpoint"):
    """Strictly load ``state_dict`` into ``net`` after a readable compatibility check."""
    check_compatible(net, state_dict, source)
    net.load_state_dict(state_dict, strict=True)
    return net


def load_hermes_r(path, device: str = "cpu", *, prefer_ema: bool = True):
    """Build Hermes-R, load the checkpoint at ``path`` strictly, and return it in eval mode."""
    from .network import build_hermes_r

    state_dict, _where = read_checkpoint(path, prefer_ema=prefer_ema)
    net = build_hermes_r()
    load_weights(net, state_dict, source=str(path))
    return net.to(device).eval()
