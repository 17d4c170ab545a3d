"""Moving a CT-sized volume to the worker and a labelmap back: shared memory vs files.

Three ways to get a 512x512x300 int16 volume to another process and a uint8 labelmap
(volume > 0) back:
  plain copy  -- in one process: copy the volume, compute the labelmap, copy it (the floor)
  shared mem  -- BiomedSeg's worker: one copy into shared memory, labelmap back the same way
  .nii.gz     -- what peers do: write .nii.gz, the worker reads it and writes the result
                 .nii.gz, the client reads it back
Shared-memory blocks are pooled by the client, so after the first call (also printed)
no fresh pages are touched. Prints each time (best of N) and, last, ``speedup_vs_niigz: X`` (file time / shared-memory time).
Usage: python bench/transport.py [--repeat 3] [--shape 300 512 512]
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

import common  # noqa: E402,F401  (puts the engine on sys.path)
from common import best_of  # noqa: E402

from biomedseg.worker.client import WorkerClient  # noqa: E402



def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--shape", type=int, nargs=3, default=[300, 512, 512], help="k j i")
    args = parser.parse_args()
    import nibabel as nib

    rng = np.random.default_rng(0)
    volume = rng.integers(-1024, 2000, size=tuple(args.shape), dtype=np.int16)
    expected = (volume > 0).astype(np.uint8)
    affine = np.diag([0.8, 0.8, 1.5, 1.0])
    print(f"machine: {platform.node()} {platform.machine()}, python {platform.python_version()}")
    print(f"volume: {volume.shape} int16 = {volume.nbytes / 1e6:.0f} MB, labelmap uint8 = {expected.nbytes / 1e6:.0f} MB")

    def plain():
        copied = volume.copy()
        labels = (copied > 0).astype(np.uint8)
        return labels.copy()

    t_plain = best_of(args.repeat, plain)
    print(f"plain_copy_s: {t_plain:.3f}")

    client = WorkerClient()
    try:
        client.start()
        client.request("ping", timeout=60)
        t = time.perf_counter()
        out = client.echo(volume)
        print(f"shared_memory_first_call_s: {time.perf_counter() - t:.3f}  (fresh blocks: page faults)")
        assert np.array_equal(out, expected), "shared-memory result differs"
        t_shm = best_of(args.repeat, lambda: client.echo(volume))
        print(f"shared_memory_s: {t_shm:.3f}")

        with tempfile.TemporaryDirectory() as d:
            src, dst = Path(d) / "input.nii.gz", Path(d) / "result.nii.gz"

            def files():
                nib.save(nib.Nifti1Image(np.transpose(volume, (2, 1, 0)), affine), str(src))
                reply = client.request("echo_file", timeout=600, input_path=str(src), output_path=str(dst))
                assert reply["event"] == "echoed", reply
                return np.transpose(np.asanyarray(nib.load(str(dst)).dataobj), (2, 1, 0))

            assert np.array_equal(files(), expected), "file round trip result differs"
            t_file = best_of(args.repeat, files)
        print(f"niigz_roundtrip_s: {t_file:.3f}")
    finally:
        client.close()
    print(f"shared_memory_vs_plain_copy: {t_shm / t_plain:.2f}x")
    print(f"speedup_vs_niigz: {t_file / t_shm:.1f}")


if __name__ == "__main__":
    main()
