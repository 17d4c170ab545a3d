"""Beyond one machine: `biomedseg serve` (the worker behind HTTP) and its client.

``remote.client`` is what Slicer and the CLI import (requests and blosc2, no torch, no server
packages); ``remote.app``, ``remote.relay`` and ``remote.server`` run on the GPU machine.
"""
