"""`biomedseg batch` throughput: deepbet over N copies of Colin27, one local worker against Ray with 2 workers.

Prints cases per minute (the batch's wall time, model loads included; the Ray cluster's start is
timed on its own) and the overhead per case: the time one worker spends per case (wall time x
workers / cases) minus the model's own time as the engine reports it (reading, checks, transport,
writing the .seg.nrrd and the summary).
Usage: python bench/batch.py [--copies 4] [--workers 2]
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (puts the engine on sys.path)

from biomedseg.batch import BatchSettings, run_batch

COLIN = "/usr/share/mricron/templates/ch2.nii.gz"


def measure(inputs: Path, outdir: Path, runner, workers: int) -> dict:
    settings = BatchSettings(model="deepbet", outdir=outdir, device="cpu")
    started = time.perf_counter()
    summary, names = run_batch(str(inputs), settings, runner)
    wall = time.perf_counter() - started
    records = [summary.records[n] for n in names]
    assert all(r["status"] == "ok" for r in records), [r.get("error") for r in records]
    model = sum(r["model_seconds"] for r in records) / len(records)
    return {"wall_s": wall, "cases_per_min": 60 * len(records) / wall, "model_s_per_case": model,
            "overhead_s_per_case": wall * workers / len(records) - model}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    import ray

    from biomedseg.batch.local import run_local
    from biomedseg.batch.ray_runner import run_ray

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {sys.version.split()[0]}, ray {ray.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp) / "in"
        inputs.mkdir()
        for n in range(args.copies):
            shutil.copy(COLIN, inputs / f"colin{n}.nii.gz")
        print(f"cases: {args.copies} x Colin27 (181x217x181), deepbet on cpu")
        local = measure(inputs, Path(tmp) / "local", lambda *a: run_local(*a), workers=1)
        started = time.perf_counter()
        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
        print(f"ray_start_s: {time.perf_counter() - started:.2f}")
        try:
            on_ray = measure(inputs, Path(tmp) / "ray", lambda *a: run_ray(*a), workers=args.workers)
        finally:
            ray.shutdown()
    for name, figures in (("local", local), (f"ray_{args.workers}_workers", on_ray)):
        for key, value in figures.items():
            print(f"{name}_{key}: {value:.2f}")
    print(f"ray_speedup_vs_local: {on_ray['cases_per_min'] / local['cases_per_min']:.2f}")


if __name__ == "__main__":
    main()
