"""A CT-sized volume to a BiomedSeg server and a labelmap back, over loopback, against the other ways.

512x512x300 int16 up, ``volume > 0`` as a uint8 labelmap down, computed by the server's worker:
  remote          -- RemoteWorkerClient.echo: hash, blosc2 pack, PUT, the server's worker (shared
                     memory), labelmap packed, GET, checksum checked (the volume is new each time)
  remote, seen    -- the same volume again: the server has it, only the labelmap comes down
  local shm       -- WorkerClient.echo: the local worker through shared memory (the floor)
  .nii.gz upload  -- the peers' way: encode the volume as .nii.gz, send it over the same HTTP
                     connection, decode it on the other side; the labelmap back the same way
                     (each step timed; the server reads the upload and drops it)
The default volume is real CT (slicerio's CTChest4) resampled to 512x512x300 with 15 HU of noise
(as a real scan has); ``--data random`` sends incompressible noise instead (the worst case).
Prints each figure, then ``speedup_vs_niigz_upload: X`` and ``remote_vs_shared_memory: Y``.
Usage: python bench/remote.py [--repeat 3] [--data ct|random] [--shape 300 512 512] [--codec zstd|lz4]
"""
from __future__ import annotations

import argparse
import gzip
import io
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import common  # noqa: F401  (puts the engine on sys.path)
from common import best_of

from biomedseg.remote import arrays  # noqa: E402
from biomedseg.remote.client import RemoteWorkerClient  # noqa: E402
from biomedseg.worker.client import WorkerClient  # noqa: E402



def ct_volume(shape) -> np.ndarray:
    import nrrd
    import slicerio
    from scipy import ndimage

    data, _ = nrrd.read(os.path.join(os.path.dirname(slicerio.__file__), "data", "CTChest4.nrrd"))
    kji = np.transpose(data, (2, 1, 0)).astype(np.float32)
    zoomed = ndimage.zoom(kji, [s / n for s, n in zip(shape, kji.shape)], order=1)
    zoomed += np.random.default_rng(0).normal(0, 15, zoomed.shape).astype(np.float32)
    return np.clip(np.rint(zoomed), -1024, 3071).astype(np.int16)


def start_server(folder: Path):
    env = dict(os.environ, BIOMEDSEG_CONFIG_DIR=str(folder), PYTHONPATH=str(common.ROOT / "BiomedSeg"),
               BIOMEDSEG_EXTRA_MODELS=str(common.ROOT / "Testing" / "worker_models"))
    proc = subprocess.Popen([sys.executable, "-m", "biomedseg.cli", "serve", "--port", "0", "--max-upload-mb", "4096"],
                            stdout=subprocess.PIPE, text=True, env=env)
    url = proc.stdout.readline().split()[-1]
    proc.stdout.readline()
    return proc, url, (folder / "server-token").read_text().strip()


def niigz_bytes(array: np.ndarray) -> bytes:
    """The .nii.gz file of ``array`` (gzip level 6, as nibabel writes), in memory."""
    import nibabel as nib

    image = nib.Nifti1Image(np.transpose(array, (2, 1, 0)), np.diag([0.8, 0.8, 1.5, 1.0]))
    return gzip.compress(image.to_bytes(), compresslevel=6)


def niigz_read(data: bytes) -> np.ndarray:
    import nibabel as nib

    image = nib.Nifti1Image.from_stream(io.BytesIO(gzip.decompress(data)))
    return np.transpose(np.asanyarray(image.dataobj), (2, 1, 0))


def cancel_latencies(client, n: int) -> str:
    """Seconds from ``cancel()`` to the job having ended, for a running job of the stand-in test model (its
    steps check the cancel flag), through the server: worst and median of ``n``."""
    os.environ["BIOMEDSEG_EXTRA_MODELS"] = str(common.ROOT / "Testing" / "worker_models")
    from biomedseg.catalog import load_catalog
    from biomedseg.volume import Volume

    load_catalog.cache_clear()
    volume = Volume(np.zeros((16, 16, 16), np.int16), np.eye(4))
    times = []
    for _ in range(n):
        job = client.submit(volume, "test-model", ["ball"], options={"mode": "slow", "steps": 400, "step_s": 0.05})
        while job.state != "running":
            client.poll(0.05)
        time.sleep(0.3)
        t = time.perf_counter()
        client.cancel(job)
        while not job.finished:
            client.poll(0.01)
        times.append(time.perf_counter() - t)
        assert job.state == "cancelled", job.state
    return f"{max(times):.3f} worst, {sorted(times)[len(times) // 2]:.3f} median of {n}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--data", choices=["ct", "random"], default="ct")
    parser.add_argument("--shape", type=int, nargs=3, default=[300, 512, 512], help="k j i")
    parser.add_argument("--codec", choices=sorted(arrays.CODECS), default="zstd", help="how the volume goes up")
    args = parser.parse_args()
    shape = tuple(args.shape)
    volume = ct_volume(shape) if args.data == "ct" else np.random.default_rng(0).integers(
        -1024, 2000, size=shape, dtype=np.int16)
    expected = (volume > 0).astype(np.uint8)
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")
    print(f"codec: {args.codec}")
    print(f"volume: {shape} int16 {args.data} = {volume.nbytes / 1e6:.0f} MB, labelmap uint8 = {expected.nbytes / 1e6:.0f} MB")
    packed_up, packed_down = arrays.pack(volume, codec=args.codec), arrays.pack(expected)
    print(f"compressed_ratio_up: {volume.nbytes / len(packed_up):.2f}  ({len(packed_up) / 1e6:.1f} MB)")
    print(f"compressed_ratio_down: {expected.nbytes / len(packed_down):.1f}  ({len(packed_down) / 1e6:.2f} MB)")

    local = WorkerClient()
    try:
        local.echo(volume)
        t_shm = best_of(args.repeat, lambda: local.echo(volume))
    finally:
        local.close()
    print(f"shared_memory_s: {t_shm:.3f}")

    with tempfile.TemporaryDirectory() as folder:
        proc, url, token = start_server(Path(folder))
        client = RemoteWorkerClient(url, token, codec=args.codec)
        try:
            client.echo(np.zeros((4, 4, 4), np.int16))  # the server's worker started and warm
            variants = [volume.copy() for _ in range(args.repeat + 1)]
            for i, v in enumerate(variants):
                v.flat[i] += 1  # a new content id each time: a volume the server has not seen
            t = time.perf_counter()
            out = client.echo(variants[0])
            print(f"remote_first_call_s: {time.perf_counter() - t:.3f}")
            assert np.array_equal(out, (variants[0] > 0).astype(np.uint8)), "remote result differs"
            rest = iter(variants[1:])
            t_remote = best_of(args.repeat, lambda: client.echo(next(rest)))
            print(f"remote_s: {t_remote:.3f}")
            t_seen = best_of(args.repeat, lambda: client.echo(variants[0]))
            print(f"remote_seen_volume_s: {t_seen:.3f}  (already on the server: only the labelmap comes down)")

            def niigz_upload():
                up = niigz_bytes(volume)
                client.http.put(f"{url}/v1/arrays/{'0' * 64}", data=up, headers=client._headers(), timeout=600)
                labels = (niigz_read(up) > 0).astype(np.uint8)  # the server's side
                down = niigz_bytes(labels)
                client.http.put(f"{url}/v1/arrays/{'0' * 64}", data=down, headers=client._headers(), timeout=600)
                return niigz_read(down)

            assert np.array_equal(niigz_upload(), expected)
            t_file = best_of(args.repeat, niigz_upload)
            print(f"niigz_upload_s: {t_file:.3f}")
            print(f"cancel_s: {cancel_latencies(client, args.repeat + 2)}")
        finally:
            client.close()
            proc.terminate()
            proc.wait(timeout=30)
    print(f"remote_vs_shared_memory: {t_remote / t_shm:.2f}x")
    print(f"speedup_vs_niigz_upload: {t_file / t_remote:.1f}")


if __name__ == "__main__":
    main()
