"""CLI calls with and without a `biomedseg serve` server on the same machine: what staying warm saves.

Each plain `biomedseg segment` call starts a worker, loads the model and encodes the slices; with
`--server` the server's worker keeps BiomedParse v1 loaded, its feature cache (keyed by the slices'
content) and the volume, so a second call with another prompt runs only the decoder. Deterministic
weights (shared/parity/detweights.py) in a temporary checkpoint; a synthetic CT (bench/biomedparse.py's)
written as .nii.gz. Each figure is the whole process's wall time.
Prints ``cli_first_s``, ``cli_reprompt_s`` (a fresh process again), ``server_first_s``,
``server_reprompt_s`` and ``warm_speedup`` (cli_reprompt_s / server_reprompt_s).
Usage: python bench/warm_cli.py [--slices 4] [--size 256]
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, load_detweights  # noqa: F401  (also puts the engine on sys.path)


def timed(command: list[str], env: dict) -> float:
    t = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:6])}... failed:\n{done.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, default=4)
    parser.add_argument("--size", type=int, default=256, help="model input edge (256 keeps CPU runs short)")
    args = parser.parse_args()
    import torch

    from biomedparse import synthetic_ct
    from biomedseg.io import write_volume
    from biomedseg.models.biomedparse.checkpoint import expected_shapes

    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()},"
          f" torch {torch.__version__}")
    with tempfile.TemporaryDirectory(prefix="warm-cli-") as tmp:
        tmp = Path(tmp)
        checkpoint = tmp / "biomedparse_v1.pt"
        torch.save(load_detweights().det_state_dict(expected_shapes()), checkpoint)
        image = write_volume(tmp / "ct.nii.gz", synthetic_ct(args.slices, 512))
        print(f"volume: {args.slices} axial slices of 512x512, model input {args.size}x{args.size}")
        env = dict(os.environ, BIOMEDSEG_CONFIG_DIR=str(tmp / "cfg"), PYTHONPATH=str(ROOT / "BiomedSeg"))

        def segment(prompt: str, out: str, *extra) -> list[str]:
            return [sys.executable, "-m", "biomedseg.cli", "segment", str(image), "--model", "biomedparse-v1",
                    "--prompt", prompt, "--weights", str(checkpoint), "--modality", "CT", "--site", "abdomen",
                    "--option", f"image_size={args.size}", "--option", "p_value=0", "-o", str(tmp / out),
                    "--overwrite", "-q", *extra]

        print(f"cli_first_s: {timed(segment('liver', 'a.seg.nrrd'), env):.2f}")
        t_cli = timed(segment('left kidney', 'b.seg.nrrd'), env)
        print(f"cli_reprompt_s: {t_cli:.2f}")
        server = subprocess.Popen([sys.executable, "-m", "biomedseg.cli", "serve", "--port", "0"], env=env,
                                  stdout=subprocess.PIPE, text=True)
        try:
            url = server.stdout.readline().split()[-1]
            server.stdout.readline()
            print(f"server_first_s: {timed(segment('liver', 'c.seg.nrrd', '--server', url), env):.2f}")
            t_warm = timed(segment('left kidney', 'd.seg.nrrd', '--server', url), env)
            print(f"server_reprompt_s: {t_warm:.2f}")
        finally:
            server.terminate()
            server.wait(timeout=30)
        import nrrd

        for local, remote in (("a", "c"), ("b", "d")):
            same = (nrrd.read(str(tmp / f"{local}.seg.nrrd"))[0] == nrrd.read(str(tmp / f"{remote}.seg.nrrd"))[0]).all()
            print(f"same_result_{local}_{remote}: {bool(same)}")
    print(f"warm_speedup: {t_cli / t_warm:.1f}")


if __name__ == "__main__":
    main()
