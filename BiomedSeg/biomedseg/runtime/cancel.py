"""Cancel inside a network's forward pass, not only between slices or windows.

A CPU forward of a large model runs for tens of seconds; waiting for its end breaks the
promise that Cancel stops within a second. ``interruptible`` hooks every submodule of the
given torch modules so that each one checks ``cancelled()`` before it runs and stops the
pass with ``CancelledError``: the model stays loaded and warm, and the next job uses it.
TorchScript modules cannot carry Python hooks; for them the client's grace kill remains.
"""
from __future__ import annotations

import contextlib

from ..errors import CancelledError


@contextlib.contextmanager
def interruptible(modules, cancelled, what: str = "Segmentation"):
    """While inside, every forward of a submodule of ``modules`` first checks ``cancelled()``."""
    def check(module, inputs):
        if cancelled():
            raise CancelledError(f"{what} was cancelled; nothing was written.")

    handles = []
    for module in modules or []:
        for sub in module.modules():
            try:
                handles.append(sub.register_forward_pre_hook(check))
            except (RuntimeError, AttributeError, TypeError):  # TorchScript: no Python hooks
                break
    try:
        yield len(handles)
    finally:
        for handle in handles:
            handle.remove()
