"""Background worker: models run in their own process, the client stays light.

``biomedseg.worker.client`` imports neither torch nor model code, so Slicer starts fast;
``python -m biomedseg.worker`` is the process that does the GPU work.
"""
