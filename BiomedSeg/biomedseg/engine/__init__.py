"""The engine: load, plan and run any model (see ``models.base`` for the contract it keeps).

``segment`` is the one entry point the worker and ``--in-process`` runs call. Importing this
package does not import torch; model code loads when a model is first used.
"""
from .loading import load_backend, unload_all, warm_models
from .running import segment
from .sessions import SESSIONS

__all__ = ["segment", "load_backend", "unload_all", "warm_models", "SESSIONS"]
