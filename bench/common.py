"""What the benchmarks share: the engine on sys.path and the parity fixtures' deterministic weights."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "BiomedSeg"))


def load_detweights():
    """shared/parity/detweights.py (beside the repository, or $BIOMEDSEG_PARITY_DIR) as a module."""
    parity = Path(os.environ.get("BIOMEDSEG_PARITY_DIR") or ROOT.parent / "shared" / "parity")
    path = parity / "detweights.py"
    if not path.is_file():
        raise SystemExit(f"{path} not found: the benchmarks need the parity fixtures (set BIOMEDSEG_PARITY_DIR)")
    spec = importlib.util.spec_from_file_location("detweights", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def best_of(repeat: int, fn) -> float:
    """The fastest of ``repeat`` calls of ``fn``, in seconds."""
    import time

    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)

